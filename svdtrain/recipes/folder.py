"""A run folder: its config, the stages' results and the lineage between them, each stage built aside and swapped in.

A run folder is data, and a failed command changes nothing in it: a stage is built in a hidden folder beside its
old output (`.<stage>.new`) and swapped in only when it has finished; each result.json names the output of the
stage before it that it was made from (`made_from`), so a stage whose input was rebuilt since is not taken as done;
and opening a folder whose config names user code runs that code only when the user says so (`trust_code`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from functools import cached_property
from pathlib import Path

from torch import nn

from .config import ConfigError, RunConfig, check_keys
from .distributed import Cluster, start
from .files import save_atomic, write_atomic
from .models import is_reference, resolve_reference

STAGES = ("train", "sparsify", "prune", "finetune", "export", "report")
BUILT_FROM = ".built_from"  # in a stage's build folder: the id of the input it is built from
# Keys a run folder made before they existed lacks, with the value under which such a run behaves as it did.
BEFORE_THEIR_TIME = {"target_speedup": 0.0, "group_sl_lr": 0.0}
REPORT_FILES = ("report.json", "report.md", "spectra.png", "ranks.png", "curves.png")  # copied to the run folder


class UntrustedCodeError(ValueError):
    """A run folder whose config names user code, opened without trust_code; the message says what to do."""


class RunFolderError(ValueError):
    """The run folder cannot be written (permissions, missing parent, no space); the message says what to do."""


def resolve_paths(values: dict) -> dict:
    """`values` (config keys) with the paths a run keeps made absolute: data_dir, dense_checkpoint and a model
    file, so that --resume and the stage commands find them from any folder."""
    out = dict(values)
    for key in ("data_dir", "dense_checkpoint"):
        if out.get(key):
            out[key] = str(Path(out[key]).expanduser().resolve())
    if out.get("model"):
        out["model"] = resolve_reference(out["model"])
    return out


def check_name(name: str):
    """A run's name makes its folder inside out_dir: checked where a folder is made, so older runs still open."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"config key 'name': got {name!r}; allowed: a plain folder name (no / or \\, "
                          "not . or ..): the run folder is made inside out_dir")


def new_folder(cfg: RunConfig, needed: int, config_json: str) -> Path:
    """A new folder out_dir/<name>-<time> holding config.json, after checking it can take `needed` bytes."""
    out = Path(cfg.out_dir)
    check_room(out, needed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        folder = out / (f"{cfg.name}-{stamp}" + (f"-{i}" if i else ""))
        try:
            folder.mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:
            continue
    try:
        write_atomic(folder / "config.json", config_json)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no folder without its config
        raise
    return folder


def check_room(folder: Path, needed: int):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / ".svdtrain-write-test", b"")
        (folder / ".svdtrain-write-test").unlink()
    except OSError as e:
        raise RunFolderError(f"cannot write to {folder} ({e.strerror or e}); set out_dir= to a writable folder") \
            from None
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise RunFolderError(f"{folder} has {free / 2**20:.0f} MB free; this run may write up to "
                             f"{needed / 2**20:.0f} MB; free some space or set out_dir= elsewhere")


class RunFolder:
    """A run folder and its config; the stages' results in it. Under torchrun there is one per process, and rank 0
    alone writes (see recipes/distributed.py)."""

    def __init__(self, folder: Path, cfg: RunConfig, echo=print):
        self.folder, self.cfg, self._echo = Path(folder), cfg, echo
        self.building: dict[str, Path] = {}  # stage -> the hidden folder it is being built in (see start_building)

    def echo(self, text: str):
        if self.cluster.main:
            self._echo(text)

    @cached_property
    def cluster(self) -> Cluster:
        return start(self.cfg.device)

    @classmethod
    def open(cls, folder: Path, overrides: dict | None = None, echo=print, trust_code: bool = False) -> "RunFolder":
        """An existing run folder, with `overrides` to its config (saved into it only by `save_config`, once
        they are known to be good). A folder whose config names user code (model=file.py:fn or package:fn) is
        refused unless `trust_code` or the overrides name the model: opening it would run that code."""
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a run folder (no config.json); start one with `svdtrain run`")
        try:
            values = json.loads(path.read_text())
            if not isinstance(values, dict):
                raise ValueError(f"a JSON {type(values).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable run config ({e})") from None
        check_keys(values)
        overrides = resolve_paths(overrides or {})
        model = values.get("model", "")
        if is_reference(model) and not trust_code and "model" not in overrides:  # naming it anew is saying so
            raise UntrustedCodeError(
                f"{path} names user code (model={model!r}), which opening this run would run; if you trust it, "
                "add --trust-code (in Python: trust_code=True)")
        try:
            cfg = RunConfig(**{**BEFORE_THEIR_TIME, **values})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        return cls(folder, cfg.replace(**overrides), echo)

    def alone(self) -> "RunFolder":
        """This run as a single process (for the stages rank 0 runs alone: no collective may be called there)."""
        run = copy.copy(self)
        run.cluster = Cluster(device=self.cluster.device)
        return run

    def finish_swaps(self):
        """What a crash mid-swap left (`swap_in`) put right: before a command reads which stages are done."""
        self.cluster.on_main(lambda: finish_swaps(self.folder))

    def write_in(self, stage: str, name: str, text: str):
        """A file of `stage`'s output, atomically, by rank 0."""
        self.cluster.on_main(lambda: write_atomic(self.stage_dir(stage) / name, text))

    def config_json(self) -> str:
        return json.dumps(self.cfg.to_dict(), indent=2) + "\n"

    def save_config(self):
        """config.json rewritten when the config differs from it (overrides that passed the preflight); rank 0
        compares and writes, so every process makes the same collective calls."""
        def save():
            path = self.folder / "config.json"
            if json.loads(path.read_text()) != json.loads(self.config_json()):
                write_atomic(path, self.config_json())

        self.cluster.on_main(save)

    def stage_dir(self, stage: str) -> Path:
        """Where `stage`'s output is: its folder, or the hidden one it is being built in."""
        return self.building.get(stage, self.folder / stage)

    def done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "result.json").is_file()

    def current(self, stage: str) -> bool:
        """`stage` has finished, from the output the stage before it has now (not one rebuilt since)."""
        if not self.done(stage):
            return False
        i = STAGES.index(stage)
        return i == 0 or (self.done(STAGES[i - 1]) and
                          self.result(stage).get("made_from") == self.result(STAGES[i - 1]).get("id"))

    def check_inputs(self, stage: str):
        """An error unless every stage before `stage` has finished and follows from the one before it."""
        for before in STAGES[:STAGES.index(stage)]:
            if not self.done(before):
                raise FileNotFoundError(f"stage {before!r} has not finished in {self.folder}; run `svdtrain "
                                        f"{before} {self.folder}` first (or `svdtrain run --resume {self.folder}`)")
            if not self.current(before):
                previous = STAGES[STAGES.index(before) - 1]
                raise FileNotFoundError(
                    f"{before}/ in {self.folder} was made from an earlier {previous}/ ({previous} ran again since); "
                    f"run `svdtrain {before} {self.folder}` first (or `svdtrain run --resume {self.folder}`, which "
                    "runs every stage after a changed one again)")

    def result(self, stage: str) -> dict:
        path = self.stage_dir(stage) / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage!r} has not finished in {self.folder}; run `svdtrain {stage} "
                                    f"{self.folder}` (or `svdtrain run --resume {self.folder}`)")
        return json.loads(path.read_text())

    def finish(self, stage: str, result: dict, model: nn.Module | None = None):
        """The stage's weights (final.pt), then its result.json: a stage with a result.json is done. The result
        gets an id of its own and the id of the previous stage's result it was made from."""
        def save():
            if model is not None:
                save_atomic(model.state_dict(), self.stage_dir(stage) / "final.pt")
            i = STAGES.index(stage)
            lineage = {"id": uuid.uuid4().hex[:12],
                       **({"made_from": self.result(STAGES[i - 1]).get("id")} if i else {})}
            write_atomic(self.stage_dir(stage) / "result.json", json.dumps({**result, **lineage}, indent=2) + "\n")

        self.cluster.on_main(save)

    def start_building(self, stage: str, resume: bool) -> Path:
        """The hidden folder `stage` is built in, made ready (by rank 0): without `resume` a fresh one; with it, an
        interrupted build continues unless its input was replaced since."""
        folder, building = self.folder / stage, self.folder / f".{stage}.new"
        i = STAGES.index(stage)
        source = self.result(STAGES[i - 1]).get("id") or "" if i else ""  # the input this build is made from
        stamp = building / BUILT_FROM
        outdated = stamp.is_file() and stamp.read_text() != source
        if building.exists() and not resume and not outdated and any(building.glob("epoch_*.pt")):
            raise RunFolderError(f"{building} holds an interrupted {stage} stage with epoch checkpoints; continue "
                                 f"it with `svdtrain {stage} {self.folder} --resume`, or delete that folder to "
                                 "start the stage over")
        if building.exists() and (not resume or outdated):
            shutil.rmtree(building)  # a fresh start, or an interrupted build from an input since replaced
        if resume and not building.exists() and folder.is_dir() and not self.done(stage):
            folder.rename(building)  # an interrupted stage of a folder from before stages were built aside
        building.mkdir(exist_ok=True)
        write_atomic(stamp, source)
        for leftover in [*self.folder.glob(".*.tmp"), *building.glob(".*.tmp")]:
            leftover.unlink()  # a temporary file a crash left mid-save; the file it was to replace is whole
        return building

    def drop_failed_build(self, stage: str):
        """After `stage` failed: its build goes unless it holds an epoch checkpoint to continue from."""
        building = self.folder / f".{stage}.new"
        if not any(building.glob("epoch_*.pt")):
            shutil.rmtree(building, True)


def swap_in(folder: Path, stage: str):
    """folder/.stage.new becomes folder/stage; the old output goes. A crash between the two renames is finished by
    finish_swaps at the next command."""
    old = folder / f".{stage}.old"
    if (folder / stage).exists():
        os.replace(folder / stage, old)
    os.replace(folder / f".{stage}.new", folder / stage)
    (folder / stage / BUILT_FROM).unlink()  # after the renames: a build caught between them keeps its stamp
    shutil.rmtree(old, ignore_errors=True)
    if stage == "report":  # the report's files, also where a user looks first (report/ holds them all)
        for name in REPORT_FILES:
            if (folder / stage / name).is_file():
                write_atomic(folder / name, (folder / stage / name).read_bytes())
            else:
                (folder / name).unlink(missing_ok=True)  # a plot this report did not make


def finish_swaps(folder: Path):
    """After a crash mid-swap: each old output back in place if the new one had not taken it, else gone (the new
    one, whole, stays in .stage.new: `--resume` of that stage finishes it)."""
    for stage in STAGES:
        old = folder / f".{stage}.old"
        if old.exists():
            if (folder / stage).exists():
                shutil.rmtree(old)
            else:
                os.replace(old, folder / stage)
