"""Reliability and security: no code runs from files, no torn files, nothing lost on a crash, clear errors.

Every test here records the fault it injected (or the bad input it gave) and the outcome it observed;
`pytest tests --reliability-doc docs/RELIABILITY.md` writes them (and those of the data and config tests) as a table.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import svdtrain
from conftest import TINY_RUN, rel_err
from svdtrain.cli import main
from svdtrain.recipes import folder as run_folder
from svdtrain.recipes import run as run_module
from svdtrain.recipes.config import ConfigError, RunConfig, read_config_file
from svdtrain.recipes.data import DataError
from svdtrain.recipes.datasets import _read_cifar_batch, read_idx
from svdtrain.recipes.run import load_exported
from svdtrain.recipes.files import CheckpointError, load_weights, write_atomic
from svdtrain.recipes.train import layer_drifts, orthogonality_drift

ROOT = Path(__file__).parents[1]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def outcome(folder: Path) -> dict:
    """What must come out the same after a crash and --resume: accuracies, FLOPs, parameters, ranks."""
    report = json.loads((folder / "report.json").read_text())
    return {"final": {k: report["final"][k] for k in ("accuracy", "flops", "params")}, "layers": report["layers"],
            "stages": {name: stage["accuracy"] for name, stage in report["stages"].items()}}


def assert_no_torn_files(folder: Path):
    """Every weights file loads, every JSON parses, no temporary file is left behind."""
    assert not list(folder.rglob("*.tmp"))
    for path in folder.rglob("*.pt"):
        load_weights(path)
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted run: what every crashed-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", *TINY_RUN, f"out_dir={out}"]) == 0
    (folder,) = out.iterdir()
    return folder


# --- 1. loading never runs code ----------------------------------------------------------------------------------

class _RunsCode:
    """Pickles as a call to os.system: unpickling it with plain pickle would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_code_file(path: Path, marker: Path):
    torch.save({"conv1.weight": _RunsCode(marker)}, path)


@pytest.mark.parametrize("place", ["dense_checkpoint", "stage final.pt", "exported model.pt"])
def test_a_file_that_runs_code_is_refused(place, finished, tmp_path, capsys, observed):
    marker = tmp_path / "code-ran"
    folder = Path(shutil.copytree(finished, tmp_path / "run"))
    if place == "dense_checkpoint":
        evil = tmp_path / "dense.pt"
        _write_code_file(evil, marker)
        code, _, err = cli(["run", *TINY_RUN, "train_epochs=0", f"dense_checkpoint={evil}",
                            f"out_dir={tmp_path / 'out'}"], capsys)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    elif place == "stage final.pt":
        _write_code_file(folder / "sparsify" / "final.pt", marker)
        code, _, err = cli(["prune", str(folder)], capsys)
    else:
        _write_code_file(folder / "export" / "model.pt", marker)
        with pytest.raises(CheckpointError) as e:
            load_exported(folder)
        code, err = 2, f"svdtrain: error: {e.value}"
    assert code == 2 and "refused" in err and "nothing was executed" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    observed("Loading never runs code", f"{place} replaced by a pickle that calls os.system",
             f"exit {code}, nothing ran: `{err.strip()[:160]}…`")


def test_a_checkpoint_that_runs_code_is_passed_over_on_resume(finished, tmp_path, capsys, observed):
    marker = tmp_path / "code-ran"
    folder = Path(shutil.copytree(finished, tmp_path / "run"))
    _write_code_file(folder / "sparsify" / "epoch_002.pt", marker)
    for stage in ("sparsify", "prune", "finetune", "export", "report"):
        (folder / stage / "result.json").unlink()
    code, out, _ = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and not marker.exists()
    assert "refused" in out and "using the checkpoint before it" in out
    assert outcome(folder) == outcome(finished)
    observed("Loading never runs code", "the newest epoch checkpoint replaced by a pickle that calls os.system, "
             "then --resume", "refused with a warning, resumed from the epoch before; same final accuracy, ranks "
             "and FLOPs as the uninterrupted run; nothing ran")


@pytest.mark.parametrize("content, what", [(b"", "an empty file"), (b"PK\x03\x04 torn", "a truncated zip"),
                                           (os.urandom(300), "random bytes")], ids=["empty", "torn-zip", "random"])
def test_unreadable_weights_are_one_clear_error(content, what, tmp_path, observed):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable torch weights file") as e:
        load_weights(path)
    observed("Loading never runs code", f"weights file: {what}", f"CheckpointError: `{e.value}`")


# --- 2. writing is atomic; the run folder is checked first -------------------------------------------------------

def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch, observed):
    path = tmp_path / "result.json"
    write_atomic(path, "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        write_atomic(path, "new" * 1000)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    observed("Writing is atomic", "the disk fills up while a file is replaced", "the old file is intact, the "
             "temporary file is removed")


def test_unwritable_or_full_run_folder_is_reported_before_training(tmp_path, capsys, monkeypatch, observed):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = cli(["run", *TINY_RUN, f"out_dir={blocker / 'runs'}"], capsys)
    assert code == 2 and "cannot write to" in err and len(err.strip().splitlines()) == 1
    observed("Writing is atomic", "out_dir inside a regular file (not writable)", f"exit 2 before training: "
             f"`{err.strip()}`")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20))
    code, out, err = cli(["run", *TINY_RUN, f"out_dir={tmp_path / 'full'}"], capsys)
    assert code == 2 and "MB free" in err and "[train]" not in out
    assert not list((tmp_path / "full").iterdir())
    observed("Writing is atomic", "a disk with 1 MB free", f"exit 2 before training, no run folder: "
             f"`{err.strip()}`")


def test_disk_full_mid_run_loses_nothing(finished, tmp_path, capsys, monkeypatch, observed):
    real = os.fsync

    def fsync(fd):  # the disk is full when sparsify saves its second epoch checkpoint
        if "sparsify.new/.epoch_002.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = cli(["run", *TINY_RUN, f"out_dir={tmp_path}"], capsys)
    monkeypatch.setattr(os, "fsync", real)
    assert code == 2 and "No space left on device" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1
    (folder,) = tmp_path.iterdir()
    assert_no_torn_files(folder)
    code, out, _ = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and "== train: done" in out and "[sparsify] resuming after epoch" in out
    assert outcome(folder) == outcome(finished)
    observed("Nothing is lost on a crash", "the disk fills up as sparsify saves its epoch 2 checkpoint, then "
             "--resume", f"exit 2 `{err.strip()[:120]}…`; no torn file; the resumed run equals the uninterrupted one")


# --- 3. SIGKILL at any point, then --resume ---------------------------------------------------------------------

# Runs the CLI with os.replace / os.fsync hooked to SIGKILL the process when they touch a given path: a
# kill exactly between "temporary file written" and "renamed into place", or between two stages.
_KILLER = """
import os, signal, sys
kind, pattern = sys.argv[1], sys.argv[2]
real = getattr(os, kind)
def hooked(*args, **kwargs):
    target = os.readlink(f"/proc/self/fd/{args[0]}") if kind == "fsync" else f"{args[0]} -> {args[1]}"
    if pattern in target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, kind, hooked)
from svdtrain.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, pattern, moment, resumed", [
    ("fsync", ".sparsify.new/.epoch_002.pt", "mid-save: an epoch checkpoint's temporary file written, not renamed",
     "[sparsify] resuming after epoch 1"),
    ("replace", ".train.new/result.json", "between stages: train's weights saved, its result.json not yet",
     "[train] resuming after epoch 1"),
    ("replace", ".prune.new/final.pt", "in the prune stage, before its weights are renamed into place",
     "== sparsify: done"),
    ("replace", ".export.new/model.pt2", "mid-export: model.pt written, model.pt2 not yet", "== finetune: done"),
])
def test_sigkill_then_resume_equals_an_uninterrupted_run(kind, pattern, moment, resumed, finished, tmp_path, capsys,
                                                         observed):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _KILLER, kind, pattern, "run", *TINY_RUN, f"out_dir={tmp_path}"],
                          env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (folder,) = tmp_path.iterdir()
    assert not (folder / "report.json").exists()
    code, out, _ = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and resumed in out
    assert_no_torn_files(folder)
    assert outcome(folder) == outcome(finished)
    observed("Nothing is lost on a crash", f"SIGKILL {moment}, then --resume", f"continued from there "
             f"(`{resumed}`); same final accuracy, FLOPs, parameters, ranks and stage accuracies as the "
             "uninterrupted run; no torn or temporary file left")


@pytest.mark.slow
def test_sigkill_between_gradual_rank_cuts_then_resume(tmp_path, capsys, observed):
    """With prune_cuts the ranks fall during sparsify: a resume starts from a checkpoint at reduced ranks and
    must make the remaining cuts exactly as the uninterrupted run did."""
    gradual = [*TINY_RUN, "prune_flops=0.5", "prune_cuts=4", "bn_recalibrate=60"]
    assert main(["run", *gradual, f"out_dir={tmp_path / 'whole'}"]) == 0
    (whole,) = (tmp_path / "whole").iterdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _KILLER, "fsync", ".sparsify.new/.epoch_002.pt", "run", *gradual,
                           f"out_dir={tmp_path / 'killed'}"], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (folder,) = (tmp_path / "killed").iterdir()
    code, out, _ = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and "[sparsify] resuming after epoch 1" in out and "rank cut at" in out  # epoch 2 cut again
    assert outcome(folder) == outcome(whole)
    observed("Nothing is lost on a crash", "SIGKILL mid-save of sparsify epoch 2 with gradual rank cuts "
             "(`prune_cuts=4`), then --resume", "resumed at the reduced ranks of epoch 1, made the remaining cuts; "
             "same final numbers and ranks as the uninterrupted run")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(finished, tmp_path, capsys, observed):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "svdtrain.cli", "run", *TINY_RUN, "sparsify_epochs=2",
                             f"out_dir={tmp_path}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/.sparsify.new/epoch_001.pt")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (folder,) = tmp_path.iterdir()
    assert not (folder / "sparsify" / "result.json").exists()
    code, out, _ = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and "== train: done" in out and "[sparsify] resuming after epoch 1" in out
    assert outcome(folder) == outcome(finished)
    observed("Nothing is lost on a crash", "SIGKILL during sparsify epoch 2 (timed from outside), then --resume",
             "resumed after epoch 1; same final numbers as the uninterrupted run")


# --- 4. numerical faults ----------------------------------------------------------------------------------------

def _poison_training_input(monkeypatch, at_call: int):
    """Models whose `at_call`-th training forward (counted over the whole run) gets a NaN input."""
    build, calls = run_module.build_model, [0]

    def poisoned(*args, **kwargs):
        model = build(*args, **kwargs)

        def hook(module, inputs):
            if module.training:
                calls[0] += 1
                if calls[0] == at_call:
                    return (inputs[0] * float("nan"),)

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(run_module, "build_model", poisoned)


def test_non_finite_loss_stops_with_where_and_last_checkpoint(tmp_path, capsys, monkeypatch, observed):
    _poison_training_input(monkeypatch, at_call=9 + 3)  # train has 9 steps: sparsify epoch 1, step 3
    code, _, err = cli(["run", *TINY_RUN, f"out_dir={tmp_path}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "non-finite loss in stage sparsify, epoch 1, step 3" in err and "last good checkpoint" in err
    observed("Numerical faults", "a NaN input at sparsify epoch 1, step 3", f"exit 2: `{err.strip()}`")


def test_non_finite_steps_can_be_skipped(tmp_path, capsys, monkeypatch, observed):
    _poison_training_input(monkeypatch, at_call=9 + 3)
    code, out, _ = cli(["run", *TINY_RUN, "on_nonfinite=skip", f"out_dir={tmp_path}"], capsys)
    assert code == 0 and "1 step(s) skipped" in out
    folder = Path(out.strip().splitlines()[-1])
    header, first = (line.split(",") for line in (folder / "sparsify" / "log.csv").read_text().splitlines()[:2])
    assert float(first[header.index("skipped_steps")]) == 1
    final = load_weights(folder / "finetune" / "final.pt")
    assert all(torch.isfinite(t).all() for t in final.values())
    observed("Numerical faults", "the same NaN input with on_nonfinite=skip", "the step is skipped and "
             "counted (skipped_steps = 1 in sparsify/log.csv, a warning on the epoch line); the run finishes "
             "with finite weights")


def test_orthogonality_drift_is_measured_and_logged(finished, observed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    svdtrain.decompose_(model, svdtrain.SVDConfig())
    drift, _ = orthogonality_drift(model)
    assert drift < 1e-5
    with torch.no_grad():
        model[2].U.mul_(1.5)  # columns of norm 1.5: UᵀU = 2.25 I
    drift, layer = orthogonality_drift(model)
    assert drift == pytest.approx(1.25, rel=1e-4) and layer == "2"
    drifts = layer_drifts(model)  # every layer's, so a warning can name each one above 0.2
    assert drifts["2"] == pytest.approx(1.25, rel=1e-4) and drifts["0"] < 1e-5
    header, *rows = [line.split(",") for line in (finished / "sparsify" / "log.csv").read_text().splitlines()]
    drifts = [float(row[header.index("orthogonality_drift")]) for row in rows]
    assert all(0 <= d < 0.1 for d in drifts)
    observed("Numerical faults", "U of a layer scaled by 1.5 (factors no longer orthonormal)",
             f"orthogonality_drift = {drift:.2f} for that layer; logged per epoch (this run's sparsify: "
             f"{', '.join(f'{d:.1e}' for d in drifts)}); above 0.2 the epoch line warns")


# --- 5. bad input: one line, what is allowed, no run folder ------------------------------------------------------

def _idx_folder(tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + bytes(n * 784)
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    target = folder / "train-images-idx3-ubyte"
    data = target.read_bytes()
    target.write_bytes(b"\x00\x00\x09\x03" + data[4:] if damage == "magic" else data[:-100])
    return folder


def _cifar_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(os.urandom(500))
    return folder.parent


def _other_model_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "resnet20.pt"
    torch.save(svdtrain.recipes.models.resnet20(10, 1).state_dict(), path)
    return path


MODEL_FILE = b"""
from torch import nn
def not_a_model(num_classes):
    return "a string"
def for_rgb(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
def three_logits(in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
class Asserts(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        assert False
class NotAModule:
    def __init__(self, num_classes):
        pass
"""

BAD_INPUTS = [
    ("a misspelled config key", ["lamda_s=0.1"], "did you mean 'lambda_s'"),
    ("a value of the wrong type", ["lr=fast"], "'lr'"),
    ("an integer key given a fraction", ["batch_size=1.5"], "'batch_size'"),
    ("energy = 1 (allowed: [0, 1))", ["energy=1"], "'energy'"),
    ("a negative λ", ["lambda_s=-0.1"], "'lambda_s'"),
    ("a FLOPs budget no ranks can reach", ["prune_flops=0.001"], "impossible"),
    ("a speed target no form reaches", ["target_speedup=50", "export_strategy=latency", "export_backend=eager"],
     "target_speedup ≤"),
    ("a speed target filter pruning cannot reach", ["method=filter_pruning", "target_speedup=50",
                                                     "export_strategy=latency", "export_backend=eager"],
     "cannot reach target_speedup=50"),
    ("an unknown method", ["method=magic"], "'method'"),
    ("an unknown model", ["model=vgg16"], "'model'"),
    ("a model file that does not exist", ["model=no_such_file.py:make"], "no file"),
    ("a model reference to a missing callable", ["model={model_file}:nope"], "has no 'nope'"),
    ("a model callable that returns no nn.Module", ["model={model_file}:not_a_model"], "allowed: a torch.nn.Module"),
    ("a model that cannot take the data's images", ["model={model_file}:for_rgb"], "cannot take synthetic images"),
    ("a model whose output is not one logit per class", ["model={model_file}:three_logits"], "logits of shape (2, 4)"),
    ("an unknown data set", ["data=mnist"], "'data'"),
    ("images too small for the model", ["image_size=8"], "12×12"),
    ("a model with nothing to decompose", ["exclude_modules=.*"], "nothing to decompose"),
    ("a dense checkpoint from a different model", ["train_epochs=0", "dense_checkpoint={other}"],
     "different model"),
    ("an IDX file with a bad magic number", ["data=fashion_mnist", "data_dir={idx_magic}"], "bad magic number"),
    ("a truncated IDX file", ["data=fashion_mnist", "data_dir={idx_truncated}"], "truncated"),
    ("CIFAR batches of random bytes", ["data=cifar10", "data_dir={cifar}"], "not a CIFAR python batch"),
    ("a data folder that does not exist", ["data=cifar10", "data_dir=/nonexistent"], "/nonexistent"),
    ("an image folder that does not exist", ["data=imagefolder", "data_dir=/nonexistent"], "no such folder"),
    ("an image folder without data_dir", ["data=imagefolder"], "imagefolder needs data_dir"),
    ("an image folder without val/", ["data=imagefolder", "data_dir={train_only}"], "no val/ folder"),
    ("an image folder whose train/ has no images", ["data=imagefolder", "data_dir={no_images}"], "holds no images"),
    ("a config file of random bytes", ["{random_config}"], "not a readable TOML config"),
    ("a YAML config file", ["{yaml_config}"], "not a readable TOML config"),
    ("a config name that does not exist", ["no_such_recipe"], "no config file"),
    ("a run name that is a path", ["name=../../elsewhere"], "a plain folder name"),
    ("a model whose forward fails with an empty message (a bare assert)", ["model={model_file}:Asserts"],
     "cannot take synthetic images of shape (1, 12, 12): AssertionError"),
    ("a model reference to a standard-library function that would run a command",
     ["model=os:system", 'model_args={{command="touch {marker}"}}'], "allowed: an nn.Module class"),
    ("a model reference to subprocess.run", ["model=subprocess:run", 'model_args={{args=["touch", "{marker}"]}}'],
     "from Python's standard library"),
    ("a model reference to a function of an installed package (torch.hub.load)", ["model=torch.hub:load"],
     "or an installed package"),
    ("a model reference to a class that is not an nn.Module", ["model={model_file}:NotAModule"],
     "is a class but not a torch.nn.Module"),
    *([("a latency export on a GPU this machine lacks", ["export_strategy=latency", "export_backend=cuda"],
        "torch.cuda.is_available")] if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("what, args, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_no_folder(what, args, message, tmp_path, capsys, observed):
    files = {"other": lambda: _other_model_checkpoint(tmp_path), "cifar": lambda: _cifar_folder(tmp_path),
             "idx_magic": lambda: _idx_folder(tmp_path, "magic"), "idx_truncated": lambda: _idx_folder(tmp_path, "cut"),
             "random_config": lambda: _file(tmp_path / "random.toml", os.urandom(200)),
             "yaml_config": lambda: _file(tmp_path / "run.yaml", b"model: resnet20\nlr: 0.1\nlayers:\n  - conv1\n"),
             "model_file": lambda: _file(tmp_path / "net.py", MODEL_FILE),
             "train_only": lambda: _folders(tmp_path / "images", "train/cat"),
             "no_images": lambda: _folders(tmp_path / "images", "train/cat", "val/cat"),
             "marker": lambda: tmp_path / "code-ran"}
    args = [a.format(**{k: make() for k, make in files.items() if "{" + k + "}" in a}) for a in args]
    config = [a for a in args if "=" not in a]
    code, _, err = cli(["run", *config, *TINY_RUN, *[a for a in args if "=" in a], f"out_dir={tmp_path / 'out'}"],
                       capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert not (tmp_path / "code-ran").exists() and not (tmp_path.parent / "elsewhere").exists()
    observed("Bad input: one line, no run folder", what, f"exit 2: `{err.strip()}`")


def _folders(root: Path, *subfolders: str) -> Path:
    for sub in subfolders:
        (root / sub).mkdir(parents=True)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_resuming_something_that_is_not_a_run(tmp_path, capsys, observed):
    code, _, err = cli(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a run folder" in err and len(err.strip().splitlines()) == 1
    observed("Bad input: one line, no run folder", "--resume of a folder that is not a run", f"exit 2: `{err.strip()}`")


# --- 6. fuzzing -------------------------------------------------------------------------------------------------

@st.composite
def module_trees(draw):
    """A random CNN or MLP (convs of any kernel, stride, padding and groups; batch norm; linears) and an input."""
    channels, side = draw(st.integers(1, 4)), draw(st.integers(5, 10))
    x_shape = (draw(st.integers(1, 3)), channels, side, side)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(0, 3))):
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0]))
        out = groups * draw(st.integers(1, 6))
        kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
        if side + 2 * padding < kernel:
            break
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding, groups=groups, bias=draw(st.booleans())))
        side, channels = (side + 2 * padding - kernel) // stride + 1, out
        layers += [nn.BatchNorm2d(channels)] if draw(st.booleans()) else []
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.Tanh(), nn.Identity()])))
    layers.append(nn.Flatten())
    width = channels * side * side
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 24))
        layers += [nn.Linear(width, out, bias=draw(st.booleans())), nn.ReLU()]
        width = out
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = nn.Sequential(*layers[:-1]).eval()
    for m in model:  # batch norm with non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model, torch.randn(x_shape)


_FUZZ_RUNS = {"trees": 0, "bytes": 0, "configs": 0}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=module_trees(), decomposition=st.sampled_from(["channel", "spatial"]),
       energy=st.floats(0, 0.6), data=st.data())
def test_fuzz_decompose_prune_export_agree(tree, decomposition, energy, data):
    """decompose_ keeps the function; the exported model computes what the pruned SVD model computes and never
    has more FLOPs than the dense model."""
    model, x = tree
    dense_out = model(x)
    dense_flops = svdtrain.count_flops(model, x)
    report = svdtrain.decompose_(model, svdtrain.SVDConfig(decomposition=decomposition))
    assert rel_err(model(x), dense_out) < 1e-4
    if report.replaced:
        svdtrain.prune_(model, energy=energy, min_rank=data.draw(st.integers(1, 2)))
    pruned_out = model(x)
    small = svdtrain.export(model, x)
    assert rel_err(small(x), pruned_out) < 1e-4
    assert svdtrain.count_flops(small, x) <= dense_flops
    assert not any(type(m).__name__.startswith("SVD") for m in small.modules())
    _FUZZ_RUNS["trees"] += 1


@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=600), header=st.sampled_from([b"", b"\x00\x00\x08\x01", b"\x00\x00\x08\x03",
                                                             b"\x1f\x8b", b"\x80\x04"]))
def test_fuzz_random_bytes_give_clean_errors(blob, header, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes", numbered=True)
    path = folder / "file"
    path.write_bytes(header + blob)
    for reader, allowed in ((read_idx, DataError), (lambda p: _read_cifar_batch(p, b"labels"), DataError),
                            (read_config_file, ConfigError), (load_weights, CheckpointError)):
        try:
            reader(path)
        except allowed:
            pass
    _FUZZ_RUNS["bytes"] += 1


_VALUES = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.lists(st.text(max_size=4),
                                                                                               max_size=3))


@settings(max_examples=200, deadline=None)
@given(values=st.dictionaries(st.sampled_from([*RunConfig.__dataclass_fields__, "lamda_s", "epochs", "x"]), _VALUES,
                              max_size=6), tail=st.text(max_size=30))
def test_fuzz_config_files_give_clean_errors(values, tail, tmp_path_factory):
    """Random TOML documents (every key, values of every type, trailing junk) through the config reader."""
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()) + tail
    path = tmp_path_factory.mktemp("config", numbered=True) / "run.toml"
    path.write_text(text)
    try:
        RunConfig(**read_config_file(path))
    except ConfigError:
        pass
    _FUZZ_RUNS["configs"] += 1


def test_fuzz_summary(observed):
    """Runs after the fuzz tests above (file order) and records what they tried."""
    if not any(_FUZZ_RUNS.values()):
        pytest.skip("the fuzz tests did not run in this session")
    observed("Fuzzing", f"{_FUZZ_RUNS['trees']} random module trees (convs with any kernel/stride/padding/groups, "
             "batch norm, linears; channel- and spatial-wise; random energy)", "decompose_ keeps the outputs "
             "(≤ 1e-4), export equals the pruned SVD model (≤ 1e-4) with ≤ the dense FLOPs")
    observed("Fuzzing", f"{_FUZZ_RUNS['bytes']} random byte strings (some with IDX, gzip or pickle headers) into "
             "the IDX, CIFAR, config and weights readers", "DataError / ConfigError / CheckpointError only")
    observed("Fuzzing", f"{_FUZZ_RUNS['configs']} random TOML configs (every key, values of every type, junk)",
             "a valid RunConfig or ConfigError only")


# --- 7. a run folder is data; a failed command changes nothing -------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), by relative path: what 'byte-identical' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A model of the user's own, in a file: building it leaves a mark, so a test sees whether its code ran.
USER_MODEL = """
from pathlib import Path
from torch import nn

MARK = Path(__file__).with_name("code-ran")

class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width=6):
        super().__init__()
        MARK.write_text("Net was built")
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))
"""


@pytest.fixture(scope="module")
def user_model_run(tmp_path_factory) -> Path:
    """A finished tiny run of a model given as a file (its code: USER_MODEL)."""
    root = tmp_path_factory.mktemp("user-model")
    (root / "net.py").write_text(USER_MODEL)
    args = [a for a in TINY_RUN if not a.startswith("model=")]
    assert main(["run", *args, f"model={root / 'net.py'}:Net", f"out_dir={root / 'runs'}"]) == 0
    (folder,) = (root / "runs").iterdir()
    return folder


def _fresh_copy(folder: Path, tmp_path: Path) -> Path:
    """`folder` copied under tmp_path, with a model file beside it when the run names one (its own copy)."""
    copy = Path(shutil.copytree(folder, tmp_path / "run"))
    config = json.loads((copy / "config.json").read_text())
    if config["model"].endswith(".py:Net"):
        shutil.copy(folder.parents[1] / "net.py", tmp_path / "net.py")
        config["model"] = f"{tmp_path / 'net.py'}:Net"
        (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def _break_the_model_file(folder: Path):
    net = folder.parent / "net.py"
    net.write_text(net.read_text().replace("width=6", "width=5"))  # weights no longer fit


FAILED_STAGE_COMMANDS = [
    ("prune with a FLOPs budget no ranks reach", "finished", ["prune", "{run}", "prune_flops=0.001"], "impossible"),
    ("finetune with data_dir naming no folder", "finished",
     ["finetune", "{run}", "data=imagefolder", "data_dir=/nope"], "no such folder"),
    ("finetune after the model file changed (weights no longer fit)", "user_model_run",
     ["finetune", "{run}", "--trust-code"], "saved from a different model"),
    ("finetune that meets a NaN input at its first step", "finished", ["finetune", "{run}"],
     "non-finite loss in stage finetune, epoch 1, step 1"),
    ("export after prune ran again (finetune/ made from the old prune/)", "finished", ["export", "{run}"],
     "was made from an earlier prune/"),
    ("finetune (no --resume) while an interrupted finetune's epoch checkpoint waits in .finetune.new", "finished",
     ["finetune", "{run}"], "holds an interrupted finetune stage with epoch checkpoints"),
]


@pytest.mark.parametrize("what, source, args, message", FAILED_STAGE_COMMANDS, ids=[c[0] for c in FAILED_STAGE_COMMANDS])
def test_a_failed_stage_command_leaves_the_folder_byte_identical(what, source, args, message, request, tmp_path,
                                                                 capsys, monkeypatch, observed):
    folder = _fresh_copy(request.getfixturevalue(source), tmp_path)
    if "model file changed" in what:
        _break_the_model_file(folder)
    if "NaN" in what:
        _poison_training_input(monkeypatch, at_call=1)
    if "prune ran again" in what:
        assert cli(["prune", str(folder), "energy=0.3"], capsys)[0] == 0
    if "interrupted" in what:
        (folder / ".finetune.new").mkdir()
        shutil.copy(folder / "finetune" / "epoch_001.pt", folder / ".finetune.new" / "epoch_001.pt")
        prune_id = json.loads((folder / "prune" / "result.json").read_text())["id"]
        (folder / ".finetune.new" / run_folder.BUILT_FROM).write_text(prune_id)
    before = snapshot(folder)
    code, _, err = cli([a.format(run=folder) for a in args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(folder) == before  # the stage's output, config.json (no rejected override) and nothing new
    if "impossible" in message:
        assert "min_rank" not in err.split("allowed:")[1]  # min_rank is 1 already: not a way out
    observed("A failed command changes nothing", f"`svdtrain {' '.join(args[:1] + args[2:])}` on a finished run: {what}",
             f"exit 2 `{err.strip()[:150]}`; every file of the run folder byte-identical, config.json included")


def test_a_good_override_is_saved_and_later_stages_follow_it(finished, tmp_path, capsys, observed):
    folder = _fresh_copy(finished, tmp_path)
    code, _, err = cli(["prune", str(folder), "energy=0.3"], capsys)
    assert code == 0, err
    assert json.loads((folder / "config.json").read_text())["energy"] == 0.3
    code, _, refused = cli(["report", str(folder)], capsys)
    assert code == 2 and "finetune/ in" in refused and "was made from an earlier prune/" in refused
    code, out, err = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and "== prune: done" in out and "[finetune] epoch 1/1" in out and "== report\n" in out, err
    report = json.loads((folder / "report.json").read_text())
    assert report["stages"]["prune"]["energy"] == 0.3 and report["final"]["flops"] < outcome(finished)["final"]["flops"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no build folder left behind
    observed("A failed command changes nothing", "`svdtrain prune RUN energy=0.3` (a good override), then "
             "`svdtrain report RUN`, then `svdtrain run --resume RUN`", f"the override is saved; report refuses "
             f"(`{refused.strip()[:110]}…`); --resume runs finetune, export and report again from the new prune/")


@pytest.mark.slow
def test_sigkill_mid_swap_puts_the_old_stage_back(finished, tmp_path, capsys, observed):
    """A stage command killed between moving the old output aside and moving the new one in: the next command
    puts the old one back, byte-identical; --resume then finishes the interrupted command and what follows it."""
    folder = _fresh_copy(finished, tmp_path)
    before = snapshot(folder / "prune")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _KILLER, "replace", ".prune.new -> ", "prune", str(folder),
                           "energy=0.3"], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (folder / "prune").exists() and (folder / ".prune.old").is_dir()
    run_folder.finish_swaps(folder)  # what the next command does first
    assert snapshot(folder / "prune") == before
    code, out, err = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0 and "== sparsify: done" in out and "== prune\n" in out and "[finetune] epoch 1/1" in out, err
    assert json.loads((folder / "prune" / "result.json").read_text())["energy"] == 0.3
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    observed("Nothing is lost on a crash", "SIGKILL in `svdtrain prune RUN energy=0.3` between moving the old prune/ "
             "aside and moving the new one in, then --resume", "the next command puts the old prune/ back "
             "byte-identical; --resume finishes the interrupted prune (energy 0.3) and runs the stages after it")


@pytest.mark.parametrize("same_input", [True, False], ids=["same-input", "input-replaced"])
def test_an_interrupted_build_resumes_only_from_its_own_input(same_input, finished, tmp_path, capsys, observed):
    """An interrupted stage command's build (.finetune.new, with an epoch checkpoint) is continued by --resume only
    while the stage before it is the one it was built from."""
    folder = _fresh_copy(finished, tmp_path)
    (folder / "finetune" / "result.json").unlink()
    (folder / "finetune").rename(folder / ".finetune.new")
    prune_id = json.loads((folder / "prune" / "result.json").read_text())["id"]
    (folder / ".finetune.new" / run_folder.BUILT_FROM).write_text(prune_id if same_input else "an-older-prune")
    code, out, err = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0, err
    assert ("[finetune] resuming after epoch 1" in out) == same_input
    assert outcome(folder) == outcome(finished)
    if not same_input:
        observed("Nothing is lost on a crash", "--resume with an interrupted finetune build made from an older "
                 "prune/", "the build is discarded and finetune starts over from the current prune/")


def test_opening_a_folder_runs_no_code_it_names(user_model_run, tmp_path, capsys, observed):
    folder = _fresh_copy(user_model_run, tmp_path)
    mark = tmp_path / "code-ran"
    mark.unlink(missing_ok=True)
    before = snapshot(folder)
    for args in (["report", str(folder)], ["prune", str(folder)], ["run", "--resume", str(folder)]):
        code, _, err = cli(args, capsys)
        assert code == 2 and "--trust-code" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(run_folder.UntrustedCodeError, match="trust_code=True"):
        load_exported(folder)
    assert not mark.exists() and snapshot(folder) == before
    observed("A run folder is data", "a run folder whose config.json names a model file, opened by `svdtrain report`, "
             "`svdtrain prune`, `svdtrain run --resume` and `load_exported`", f"each refused before any code ran "
             f"(the file's model was never built): `{err.strip()[:140]}…`")
    # Said so: the file's model is built, and the run goes on.
    assert isinstance(load_exported(folder, trust_code=True), nn.Module) and mark.exists()
    code, _, err = cli(["report", str(folder), "--trust-code"], capsys)
    assert code == 0, err
    # A config edited to name a standard-library function: refused even when trusted, before it is called.
    config = json.loads((folder / "config.json").read_text())
    config.update(model="os:system", model_args={"command": f"touch {tmp_path / 'system-ran'}"})
    (folder / "config.json").write_text(json.dumps(config))
    for trust in ([], ["--trust-code"]):
        code, _, err = cli(["report", str(folder), *trust], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
    assert "allowed: an nn.Module class" in err and not (tmp_path / "system-ran").exists()
    observed("A run folder is data", "its config.json edited to model=os:system with model_args={command=\"touch …\"}, "
             "opened with and without --trust-code", f"exit 2 both times, nothing ran: `{err.strip()}`")


def test_a_stage_command_resumes_from_any_folder(tmp_path, capsys, monkeypatch, observed):
    """data_dir (and a model file) are kept absolute in config.json: a stage command run from another folder finds
    them."""
    pytest.importorskip("PIL")
    from svdtrain.recipes.datasets import write_shapes_folder

    monkeypatch.chdir(tmp_path)
    write_shapes_folder(tmp_path / "shapes", train_per_class=6, val_per_class=2, size=16)
    args = [a for a in TINY_RUN if not a.startswith("data=")]
    code, out, err = cli(["run", *args, "data=imagefolder", "data_dir=shapes", "image_size=12", "workers=0",
                          "out_dir=runs"], capsys)
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1]).resolve()
    assert json.loads((folder / "config.json").read_text())["data_dir"] == str(tmp_path / "shapes")
    monkeypatch.chdir(folder)
    code, _, err = cli(["report", str(folder)], capsys)
    assert code == 0, err
    observed("A run folder is data", "`data_dir=shapes` (relative), then `svdtrain report RUN` from another folder",
             "config.json keeps the absolute path; the report runs")


def test_a_run_named_before_names_were_checked_still_opens(finished, tmp_path, capsys):
    folder = _fresh_copy(finished, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "name": "sweep/a"}))
    code, _, err = cli(["report", str(folder)], capsys)
    assert code == 0, err


def test_a_corrupt_config_json_names_the_file(finished, tmp_path, capsys, observed):
    folder = _fresh_copy(finished, tmp_path)
    (folder / "config.json").write_text('{"name": "quick", "lr": 0.0')
    code, _, err = cli(["report", str(folder)], capsys)
    assert code == 2 and f"{folder / 'config.json'}: not a readable run config" in err
    assert len(err.strip().splitlines()) == 1
    observed("Bad input: one line, no run folder", "a run folder whose config.json is cut short", f"exit 2: "
             f"`{err.strip()}`")


def test_the_only_checkpoint_unreadable_starts_the_stage_over(finished, tmp_path, capsys, observed):
    folder = _fresh_copy(finished, tmp_path)
    (folder / "sparsify" / "epoch_002.pt").unlink()
    (folder / "sparsify" / "epoch_001.pt").write_bytes(b"torn")
    for stage in ("sparsify", "prune", "finetune", "export", "report"):
        (folder / stage / "result.json").unlink()
    code, out, err = cli(["run", "--resume", str(folder)], capsys)
    assert code == 0, err
    assert "no checkpoint before it: the stage starts from its beginning" in out
    assert "using the checkpoint before it" not in out and "[sparsify] epoch 1/2" in out
    assert outcome(folder) == outcome(finished)
    observed("Nothing is lost on a crash", "the only epoch checkpoint of an unfinished stage torn, then --resume",
             "says the stage starts from its beginning (no checkpoint before it); same final numbers")


def test_user_shaped_half_of_a_four_class_folder_trains_all_four(tmp_path, capsys, observed):
    """A 4-class image folder listed by class, train_subset = half: all 4 classes are trained, so the model
    beats the 50 % that 2 classes would allow, and the run says what it trains on."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"blue": (40, 40, 200), "green": (40, 200, 40), "grey": (128, 128, 128), "red": (200, 40, 40)}
    for split, n in (("train", 40), ("val", 10)):
        for name, colour in colours.items():
            (tmp_path / "easy" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.array(colour)[None, None] + rng.normal(0, 40, (16, 16, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp_path / "easy" / split / name / f"{i}.png")
    args = [a for a in TINY_RUN if not a.split("=")[0] in ("data", "optimizer", "lr", "finetune_lr", "batch_size")]
    code, out, err = cli(["run", *args, "data=imagefolder", f"data_dir={tmp_path / 'easy'}", "image_size=16",
                          "train_subset=80", "train_epochs=3", "batch_size=16", "lr=3e-3", "finetune_lr=1e-3",
                          "workers=0", f"out_dir={tmp_path / 'runs'}"], capsys)
    assert code == 0, err
    assert out.startswith("data: imagefolder") and "4 classes: training on 80 of 160 training images" in out
    report = json.loads((Path(out.strip().splitlines()[-1]) / "report.json").read_text())
    assert report["data"]["train_images"] == 80 and report["data"]["classes"] == 4
    assert report["final"]["accuracy"] > 75, report["final"]["accuracy"]  # 2 classes trained: at most 50 %
    observed("Subsets and splits keep every class", "a 4-class image folder (40 training images per class, listed "
             "by class), train_subset=80 (half)", f"the run's first line: `{out.splitlines()[0]}`; final accuracy "
             f"{report['final']['accuracy']:.1f} % on the 4 classes (training on the first half, 2 classes, would "
             "allow at most 50 %)")


_WARNS = """
import sys, warnings
import svdtrain.cli
def stage(run, name, resume=False):
    warnings.warn("TypedStorage is deprecated.\\nIt will be removed in the future", UserWarning)
    if sys.argv[1] == "fail":
        raise ValueError("the stage failed")
    return {}
svdtrain.cli.run_stage = stage
sys.exit(svdtrain.cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fails", [True, False], ids=["failing", "succeeding"])
def test_warnings_never_surround_a_one_line_error(fails, finished, tmp_path, observed):
    """In a process of its own, as a user runs it: a warning (here one torch gives) and then an error print the
    error's line alone; after a success the warning is one line before the run folder."""
    folder = _fresh_copy(finished, tmp_path)
    done = subprocess.run([sys.executable, "-c", _WARNS, "fail" if fails else "ok", "report", str(folder)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    if fails:
        assert done.returncode == 2 and done.stderr == "svdtrain: error: the stage failed\n", done.stderr
        observed("Bad input: one line, no run folder", "a warning raised by torch, then an error, in one command "
                 "(its own process)", f"stderr is the error's line alone: `{done.stderr.strip()}`")
    else:
        assert done.returncode == 0, done.stderr
        assert done.stderr == "svdtrain: warning: UserWarning: TypedStorage is deprecated.\n"
        assert done.stdout.strip().splitlines()[-1] == str(folder)
