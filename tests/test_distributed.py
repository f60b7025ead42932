"""The tool under torch.distributed: two gloo processes on the CPU, spawned here as torchrun would start them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY_RUN, rel_err
from svdtrain.cli import main

# TINY_RUN's LeNet-5 has no batch norm, so two processes with half a batch each must compute what one
# process does; augmentation is on, so its random draws must be shared out alike too. It uses SGD because
# Adam divides by the root of tiny second moments and so turns float rounding (the order in which DDP
# sums) into 1e-4 differences.
TINY = TINY_RUN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: list[str], dumps: str):
    """One process of the group: the CLI, with the model each stage trained saved per rank for the test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import svdtrain.recipes.pipeline as pipeline

    fit = pipeline.fit

    def fit_and_dump(model, data, cfg, stage, folder, echo, cluster):
        history = fit(model, data, cfg, stage, folder, echo, cluster)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, Path(dumps) / f"{stage.name}-rank{rank}.pt")
        return history

    pipeline.fit = fit_and_dump
    if main(args) != 0:
        raise SystemExit(f"rank {rank}: svdtrain failed")


def _spawn(args: list[str], dumps: Path, world: int = 2):
    dumps.mkdir(exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), args, str(dumps)), nprocs=world, join=True)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _spawn(["run", *TINY, f"out_dir={root / 'runs'}"], root / "dumps")
    (folder,) = (root / "runs").iterdir()  # one run folder: only rank 0 made it
    return folder, root / "dumps"


@pytest.mark.slow
def test_processes_stay_identical(two_process_run):
    _, dumps = two_process_run
    for stage in ("train", "sparsify", "finetune"):
        a, b = (torch.load(dumps / f"{stage}-rank{r}.pt", weights_only=True) for r in (0, 1))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)


@pytest.mark.slow
def test_two_processes_equal_one(two_process_run, tmp_path):
    folder, _ = two_process_run
    assert main(["run", *TINY, f"out_dir={tmp_path}"]) == 0
    (single,) = tmp_path.iterdir()
    for stage in ("train", "sparsify", "finetune"):
        a = torch.load(folder / stage / "final.pt", weights_only=True)
        b = torch.load(single / stage / "final.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert rel_err(a[key], b[key]) <= 1e-5, (stage, key, rel_err(a[key], b[key]))
    ranks = [{row["name"]: row["rank_after"] for row in json.loads((f / "prune" / "prune_report.json").read_text())["layers"]}
             for f in (folder, single)]
    assert ranks[0] == ranks[1] and ranks[0]["fc2"] < 84  # pruning removed rank
    for f in (folder, single):
        rows = (f / "sparsify" / "log.csv").read_text().splitlines()
        assert len(rows) == 3  # header + 2 epochs, written once
    logs = [[line.split(",") for line in (f / "sparsify" / "log.csv").read_text().splitlines()] for f in (folder, single)]
    header = logs[0][0]
    for column in ("loss", "task_loss", "orthogonality", "sparsity", "train_accuracy", "test_accuracy"):
        i = header.index(column)
        assert float(logs[0][2][i]) == pytest.approx(float(logs[1][2][i]), rel=1e-5), column


@pytest.mark.slow
def test_resume_under_two_processes(two_process_run, tmp_path):
    """A finished fine-tuning stage is undone: both processes resume from rank 0's epoch checkpoint."""
    folder, _ = two_process_run
    before = json.loads((folder / "report.json").read_text())["final"]
    for stage in ("finetune", "export", "report"):
        (folder / stage / "result.json").unlink()
    _spawn(["run", "--resume", str(folder)], tmp_path)
    after = json.loads((folder / "report.json").read_text())["final"]
    assert after["accuracy"] == before["accuracy"] and after["flops"] == before["flops"]
    a, b = (torch.load(tmp_path / f"finetune-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_launches_the_cli(tmp_path):
    """The documented launch: torchrun starts the processes and the run ends with one folder."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "svdtrain.cli", "run", *TINY, "sparsify_epochs=1", f"out_dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = tmp_path.iterdir()
    assert done.stdout.strip().splitlines()[-1] == str(folder)
    assert done.stdout.count("== train") == 1  # rank 1 says nothing
    assert json.loads((folder / "report.json").read_text())["final"]["accuracy"] > 0


@pytest.mark.slow
def test_gpu_path_options_on_the_cpu(tmp_path):
    """bf16 autocast, channels_last and torch.compile together through every stage (what gpu_check.sh turns on)."""
    assert main(["run", *TINY, "amp=bf16", "channels_last=true", "compile=true", "max_batches=3",
                 f"out_dir={tmp_path}"]) == 0
    (folder,) = tmp_path.iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["config"]["compile"] and report["final"]["flops"] < report["dense"]["flops"]
    log = (folder / "sparsify" / "log.csv").read_text().splitlines()
    assert "images_per_second" in log[0].split(",") and len(log) == 3
