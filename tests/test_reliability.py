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
from svdtrain.recipes import pipeline
from svdtrain.recipes.config import ConfigError, RunConfig, read_config_file
from svdtrain.recipes.data import DataError, _read_cifar_batch, read_idx
from svdtrain.recipes.pipeline import load_exported
from svdtrain.recipes.train import CheckpointError, load_weights, orthogonality_drift, write_atomic

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
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 10:
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
    observed("Nothing is lost on a crash", "the disk fills up at the 10th file written (mid-sparsify), then "
             "--resume", f"exit 2 `{err.strip()[:120]}…`; no torn file; the resumed run equals the uninterrupted one")


# --- 3. SIGKILL at any point, then --resume ---------------------------------------------------------------------

# Runs the CLI with os.replace / os.fsync hooked to SIGKILL the process when they touch a given path: a
# kill exactly between "temporary file written" and "renamed into place", or between two stages.
_KILLER = """
import os, signal, sys
kind, pattern = sys.argv[1], sys.argv[2]
real = getattr(os, kind)
def hooked(*args, **kwargs):
    target = os.readlink(f"/proc/self/fd/{args[0]}") if kind == "fsync" else str(args[1])
    if pattern in target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, kind, hooked)
from svdtrain.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, pattern, moment, resumed", [
    ("fsync", "sparsify/.epoch_002.pt", "mid-save: an epoch checkpoint's temporary file written, not renamed",
     "[sparsify] resuming after epoch 1"),
    ("replace", "train/result.json", "between stages: train's weights saved, its result.json not yet",
     "[train] resuming after epoch 1"),
    ("replace", "prune/final.pt", "in the prune stage, before its weights are renamed into place",
     "== sparsify: done"),
    ("replace", "export/model.pt2", "mid-export: model.pt written, model.pt2 not yet", "== finetune: done"),
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
    done = subprocess.run([sys.executable, "-c", _KILLER, "fsync", "sparsify/.epoch_002.pt", "run", *gradual,
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
    while not list(tmp_path.glob("*/sparsify/epoch_001.pt")) and time.time() < deadline:
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
    build, calls = pipeline.build_model, [0]

    def poisoned(*args, **kwargs):
        model = build(*args, **kwargs)

        def hook(module, inputs):
            if module.training:
                calls[0] += 1
                if calls[0] == at_call:
                    return (inputs[0] * float("nan"),)

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(pipeline, "build_model", poisoned)


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
"""

BAD_INPUTS = [
    ("a misspelled config key", ["lamda_s=0.1"], "did you mean 'lambda_s'"),
    ("a value of the wrong type", ["lr=fast"], "'lr'"),
    ("an integer key given a fraction", ["batch_size=1.5"], "'batch_size'"),
    ("energy = 1 (allowed: [0, 1))", ["energy=1"], "'energy'"),
    ("a negative λ", ["lambda_s=-0.1"], "'lambda_s'"),
    ("a FLOPs budget no ranks can reach", ["prune_flops=0.001"], "impossible"),
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
             "no_images": lambda: _folders(tmp_path / "images", "train/cat", "val/cat")}
    args = [a.format(**{k: make() for k, make in files.items() if "{" + k + "}" in a}) for a in args]
    config = [a for a in args if "=" not in a]
    code, _, err = cli(["run", *config, *TINY_RUN, *[a for a in args if "=" in a], f"out_dir={tmp_path / 'out'}"],
                       capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
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
