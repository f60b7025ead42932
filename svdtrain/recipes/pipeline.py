"""The staged pipeline of METHOD.md §4, one folder per run.

train → sparsify → prune → finetune → export → report. Each stage reads what the
previous one left in the run folder and writes `<stage>/result.json` last, so a
stage with a result.json is done; `resume` skips done stages and continues an
interrupted one from its last epoch checkpoint.

A run folder is data, and a failed command changes nothing in it: a stage is built
in a hidden folder beside its old output (`.<stage>.new`) and swapped in only when it
has finished; each result.json names the output of the stage before it that it was
made from (`made_from`), so a stage whose input was rebuilt since is not taken as done;
and opening a folder whose config names user code runs that code only when the user
says so (`trust_code`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import time
import uuid
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

import svdtrain
from svdtrain.export import TIE, export_decisions
from svdtrain.latency import check_backend, threads
from svdtrain.layers import svd_layers
from svdtrain.prune import PruneReport

from svdtrain.config import name_matches

from .baselines import (FILTER_METHODS, filter_prune_, group_sparsity_pruner, input_covariances, normalize_v_,
                        one_shot, resize_to_state_, weigh_by_inputs_, whiten_)
from .config import ConfigError, RunConfig, check_keys
from .data import Dataset, load_dataset
from .distributed import Cluster, start
from .models import ModelError, build_model, is_reference, resolve_reference, one_line
from .train import StageSettings, evaluate, fit, load_into, load_weights, save_atomic, write_atomic

STAGES = ("train", "sparsify", "prune", "finetune", "export", "report")
BUILT_FROM = ".built_from"  # in a stage's build folder: the id of the input it is built from
# Keys a run folder made before they existed lacks, with the value under which such a run behaves as it did.
BEFORE_THEIR_TIME = {"target_speedup": 0.0, "group_sl_lr": 0.0}
# A speed target is refused before a run when the export is predicted to miss it by more than this: the predicted
# fastest export of the quick recipe's model moved between 0.485 and 0.567 of dense with the machine's load. A run
# nearer its edge cuts to the fastest ranks there are and says what it measured.
SPEED_MARGIN = 1.15
SPEED_CORRECTIONS = 2  # further cuts the prune stage makes while the measured speed-up falls short of the target
REPORT_FILES = ("report.json", "report.md", "spectra.png", "ranks.png", "curves.png")  # copied to the run folder


class UntrustedCodeError(ValueError):
    """A run folder whose config names user code, opened without trust_code; the message says what to do."""


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


class Run:
    """A run folder: its config, data, and the models each stage leaves.

    Under torchrun there is one Run per process; rank 0 alone writes (see recipes/distributed.py).
    """

    def __init__(self, folder: Path, cfg: RunConfig, echo=print):
        self.folder, self.cfg, self._echo = Path(folder), cfg, echo
        self.building: dict[str, Path] = {}  # stage -> the hidden folder it is being built in (see run_stage)
        self.cuts: list[dict] = []  # the gradual cuts made since this process started the sparsify stage

    def echo(self, text: str):
        if self.cluster.main:
            self._echo(text)

    @cached_property
    def cluster(self) -> Cluster:
        return start(self.cfg.device)

    @classmethod
    def create(cls, cfg: RunConfig, echo=print) -> "Run":
        """A new folder out_dir/<name>-<time>, made only once the config and data are known to be good."""
        if not cfg.name or cfg.name in (".", "..") or any(c in cfg.name for c in "/\\\0"):
            # checked here, where a folder is made, so that older runs with such names still open
            raise ConfigError(f"config key 'name': got {cfg.name!r}; allowed: a plain folder name (no / or \\, "
                              "not . or ..): the run folder is made inside out_dir")
        cfg = cfg.replace(**resolve_paths({"model": cfg.model, "data_dir": cfg.data_dir,
                                           "dense_checkpoint": cfg.dense_checkpoint}))
        run = cls(Path(), cfg, echo)
        run.preflight()  # bad data, model, checkpoint or budget: an error now, and no folder

        def make_folder() -> Path:
            out = Path(cfg.out_dir)
            _check_writable(out, run.space_needed())
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for i in range(1000):
                folder = out / (f"{cfg.name}-{stamp}" + (f"-{i}" if i else ""))
                try:
                    folder.mkdir(parents=True, exist_ok=False)
                    break
                except FileExistsError:
                    continue
            try:
                write_atomic(folder / "config.json", run.config_json())
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # no folder without its config
                raise
            return folder

        run.folder = run.cluster.on_main(make_folder)
        return run

    @classmethod
    def open(cls, folder: Path, overrides: dict | None = None, echo=print, trust_code: bool = False) -> "Run":
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

    def alone(self) -> "Run":
        """This run as a single process (for the stages rank 0 runs alone: no collective may be called there)."""
        run = copy.copy(self)
        run.cluster = Cluster(device=self.cluster.device)
        return run

    def finish_swaps(self):
        """What a crash mid-swap left (`_swap_in`) put right: before a command reads which stages are done."""
        self.cluster.on_main(lambda: _finish_swaps(self.folder))

    def write_in(self, stage: str, name: str, text: str):
        """A file of `stage`'s output, atomically, by rank 0."""
        self.cluster.on_main(lambda: write_atomic(self.stage_dir(stage) / name, text))

    def preflight(self):
        """What would otherwise fail hours later: the data loads, the model builds and takes its images, the
        dense checkpoint fits it, it has layers to decompose, and a FLOPs / params budget is reachable."""
        cfg, example = self.cfg, self.example_input(2)
        if cfg.export_strategy == "latency":
            check_backend(cfg.export_backend)  # its extras or compiler, before hours of training
        model = self.starting_model().eval()
        try:
            with torch.no_grad():
                out = model(example)
        except Exception as e:  # noqa: BLE001 -- a user's model may raise anything: one line naming it
            raise ModelError(f"model {cfg.model!r} cannot take {cfg.data} images of shape "
                             f"{tuple(example.shape[1:])}: {one_line(e)[:200]}") from None
        wanted = (len(example), self.data.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != wanted:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ModelError(f"model {cfg.model!r} returned {got} for {len(example)} {cfg.data} images; allowed: "
                             f"logits of shape {wanted} ({self.data.num_classes} classes), as they are, first in a "
                             "tuple, or as an output's `.logits`")
        if cfg.method in FILTER_METHODS:
            self.filter_prune(model)  # raises when the budget is out of reach
        else:
            self.decompose(model)
            if cfg.target_speedup:
                try:  # refused only when out of reach by more than timing noise moves the prediction
                    self.prune(model, self.budget_fraction * SPEED_MARGIN, reach=False)
                except ValueError as e:
                    raise ValueError(f"target_speedup={cfg.target_speedup:g} is out of reach, even allowing "
                                     f"{SPEED_MARGIN - 1:.0%} for timing noise: {e}") from None
            elif cfg.budget:
                self.prune(model)  # raises when the budget is out of reach

    def space_needed(self) -> int:
        """Bytes a run writes at most: per training stage its kept epoch checkpoints plus the one being saved
        (weights + optimizer state, up to 3× the weights) and final.pt; prune's final.pt; three exports;
        50 MB of logs and plots."""
        weights = sum(t.numel() * t.element_size() for t in self.dense_model().state_dict().values())
        return 3 * (3 * (self.cfg.keep_checkpoints + 1) + 1) * weights + 4 * weights + 50 * 2**20

    def check_writable(self):
        """An error now, not after hours of training, when the run folder cannot take the run's files."""
        self.cluster.on_main(lambda: _check_writable(self.folder, self.space_needed()))

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

    @cached_property
    def data(self) -> Dataset:
        """The run's splits (train_subset, val_subset, test_subset drawn across classes), in memory, on the GPU
        when training runs there (a batch is then a slice, nothing is copied); an image folder too large for
        memory is decoded per batch by `workers` processes."""
        cfg = self.cfg
        full = load_dataset(cfg.data, cfg.data_dir, cfg.image_size, cfg.workers)
        data = full.drawn(cfg.train_images, cfg.val_subset, cfg.test_subset)
        evaluated = "validation images held out of training" if cfg.val_subset else "test images"
        self._data_summary = {
            "name": cfg.data, "folder": cfg.data_dir or None, "classes": data.num_classes,
            "train_images": len(data.train), "of_train_images": len(full.train), "eval_split": data.eval_split,
            "eval_images": len(data.test),
            "line": f"data: {cfg.data}{f' ({cfg.data_dir})' if cfg.data_dir else ''}, {data.num_classes} classes: "
                    f"training on {len(data.train):,} of {len(full.train):,} training images"
                    + (" (each class its share)" if len(data.train) < len(full.train) else "")
                    + f", evaluating on {len(data.test):,} {evaluated}"}
        return data.to(self.cluster.device)

    @property
    def data_summary(self) -> dict:
        """What the run trains and evaluates on: counts of the drawn splits against the whole, and a line."""
        self.data  # noqa: B018 -- drawing the splits makes the summary
        return self._data_summary

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

    # --- models
    def dense_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        c, h, _ = self.data.image_shape
        return build_model(self.cfg.model, self.data.num_classes, c, h, self.cfg.bottleneck, self.cfg.model_args)

    def starting_model(self) -> nn.Module:
        """The dense model, with the weights of `dense_checkpoint` when one is given."""
        model = self.dense_model()
        if self.cfg.dense_checkpoint:
            path = self.cfg.dense_checkpoint
            load_into(model, load_weights(Path(path)), f"dense_checkpoint {path}")
        return model

    def svd_config(self, init: str = "svd") -> svdtrain.SVDConfig:
        return svdtrain.SVDConfig(decomposition=self.cfg.decomposition, init=init,
                                  exclude_modules=self.cfg.exclude_modules)

    def decompose(self, model: nn.Module, init: str = "svd") -> nn.Module:
        report = svdtrain.decompose_(model, self.svd_config(init))
        if not report.replaced:
            raise ValueError(f"model {self.cfg.model!r} has nothing to decompose with exclude_modules="
                             f"{list(self.cfg.exclude_modules)}")
        return model

    def model_after(self, stage: str) -> nn.Module:
        """The model a stage left: SVD form with its ranks, or dense (filter-pruned layers resized)."""
        state = load_weights(self.stage_dir(stage) / "final.pt")
        model = self.dense_model()
        if self.result(stage)["form"] == "svd":
            self.decompose(model)
        else:
            resize_to_state_(model, state)
        load_into(model, state, f"{stage}/final.pt")
        return model

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """The first `batch` test images (repeated if there are fewer), on the CPU."""
        return self.data.normalize(self.data.test.images[torch.arange(batch) % len(self.data.test)]).cpu()

    def accuracy(self, model: nn.Module) -> float:
        """Test accuracy of `model`, evaluated (as a copy) on the run's device, where the data is."""
        on_device = copy.deepcopy(model).to(self.cluster.device)
        return evaluate(on_device, self.data, self.data.test, self.cfg)[0]

    def fit(self, model: nn.Module, stage: str, epochs: int, lr: float, lambda_o: float, lambda_s: float,
            cut=None, **settings) -> float:
        """Train for one stage (if epochs > 0); returns the test accuracy at its end."""
        if not epochs:
            return self.accuracy(model)
        history = fit(model, self.data, self.cfg, StageSettings(stage, epochs, lr, lambda_o, lambda_s, **settings),
                      self.stage_dir(stage), self.echo, self.cluster, cut, self.teacher(stage))
        return history[-1]["test_accuracy"]

    def teacher(self, stage: str) -> nn.Module | None:
        """The model the train stage left, frozen on the run's device, for stages after it to distill from."""
        if not self.cfg.distill or stage == "train":
            return None
        model = self.model_after("train").to(self.cluster.device).eval().requires_grad_(False)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    @property
    def budget_fraction(self) -> float | None:
        """The run's budget as a fraction of the dense model: its latency (1 / target_speedup), FLOPs or params."""
        cfg = self.cfg
        return 1 / cfg.target_speedup if cfg.target_speedup else cfg.prune_flops or cfg.prune_params or None

    def prune(self, model: nn.Module, fraction: float | None = None, reach: bool = True) -> PruneReport:
        """prune_ by the run's budget (`fraction` of the dense model in place of it), else by energy.

        target_speedup is a latency budget on the deployment: the ranks are chosen on a CPU copy from per-layer
        times measured on export_backend at export_batch on export_threads, then cut to in `model`. With `reach`
        a latency no ranks are predicted to meet gets the fastest ranks there are (timings wander by a few per
        cent from cut to cut), else it is an error. With rank_score=output each singular value counts by its
        share of the layer's output on whiten_images training images rather than by its size."""
        if self.cfg.rank_score != "output":
            return self._prune_by_size(model, fraction, reach)
        weighed = weigh_by_inputs_(model, input_covariances(model, self.calibration_batches(model, self.cfg.whiten_images)))
        try:
            return self._prune_by_size(model, fraction, reach)
        finally:
            normalize_v_(model, weighed)

    def _prune_by_size(self, model: nn.Module, fraction: float | None, reach: bool) -> PruneReport:
        cfg = self.cfg
        options = dict(min_rank=cfg.min_rank, rank_multiple=cfg.rank_multiple or None)
        if cfg.target_speedup:
            with threads(cfg.export_threads):
                report = svdtrain.prune_(copy.deepcopy(model).cpu(), latency=fraction or self.budget_fraction,
                                         example_inputs=self.example_input(cfg.export_batch),
                                         backend=cfg.export_backend, reach=reach, **options)
            for (_, layer), row in zip(svd_layers(model), report.layers):
                if row["rank_after"] < layer.rank:
                    layer.truncate_(row["rank_after"])
            return report
        knob = ({"flops": fraction or cfg.prune_flops} if cfg.prune_flops else
                {"params": fraction or cfg.prune_params} if cfg.prune_params else {"energy": cfg.energy})
        device = next(model.parameters()).device
        return svdtrain.prune_(model, **knob, example_inputs=self.example_input().to(device), **options)

    def scheduled_fraction(self, progress: float) -> float:
        """The cubic schedule (Zhu & Gupta's gradual pruning): at `progress` p of the stage the model may keep
        budget + (1 − budget)·(1 − p)³ of the dense latency / FLOPs / params, so most goes early, while the network
        still has many steps to adapt, and the last cut (p = 1) lands on the budget."""
        budget = self.budget_fraction
        return budget + (1 - budget) * (1 - progress) ** 3

    def gradual_cut(self, model: nn.Module, progress: float) -> bool:
        """One rank cut of the cubic schedule (`scheduled_fraction`)."""
        report = self.prune(model, self.scheduled_fraction(progress))
        if report.cut:
            said, anchor = [], report.latency_anchor
            if report.latency_after_ms is not None:
                measured = "" if not anchor else (
                    f"; {'before the cut' if anchor['at'] == 'as it stands' else anchor['at']} measured "
                    f"{anchor['measured']:.3f}, layer times said {anchor['predicted']:.3f}")
                said.append(f"latency {report.latency_after_ms / report.dense_latency_ms:.3f} of dense (predicted on "
                            f"{report.backend}{measured})")
            if report.flops_after is not None:
                said.append(f"FLOPs {report.flops_after / report.dense_flops:.3f} of dense")
            said.append(f"params {report.params_after / report.dense_params:.3f} of dense")
            self.echo(f"  rank cut at {progress:.0%} of the stage: {', '.join(said[:2])}")
            self.log_cut(model, progress, flops=report.flops_after and report.flops_after / report.dense_flops,
                         latency=report.latency_after_ms and report.latency_after_ms / report.dense_latency_ms)
        return report.cut

    def log_cut(self, model: nn.Module, progress: float, **measured):
        """A gradual cut's row of sparsify/cuts.json; with cut_eval_images, the model's accuracy right after it: as
        training goes on with it ("accuracy_before_bn_recalibration") and, on a copy whose batch-norm statistics are
        re-estimated as the prune stage's are ("accuracy"), so that the curve shows what the cut itself cost."""
        row = {"progress": progress, **measured}
        if self.cfg.cut_eval_images:
            training = model.training
            split = self.data.test.subset(self.cfg.cut_eval_images, "cut_eval_images")
            row["accuracy"] = evaluate(model, self.data, split, self.cfg, self.cluster)[0]
            model.train(training)  # evaluation leaves it in eval mode; training goes on
            if self.cfg.bn_recalibrate:
                recalibrated = copy.deepcopy(model)
                self.recalibrate_bn(recalibrated)
                row["accuracy_before_bn_recalibration"] = row["accuracy"]
                row["accuracy"] = evaluate(recalibrated, self.data, split, self.cfg, self.cluster)[0]
            self.echo(f"  accuracy right after the cut: {row['accuracy']:.2f} % on {len(split):,} images")
        self.cuts.append(row)

    def measured_speedup(self, model: nn.Module) -> dict:
        """{speedup, speedup_iqr}: `model` (SVD form) exported for the deployment against its dense form, as the
        export's own whole-model check timed them alternately there (export_backend at export_batch on
        export_threads; median of the paired ratios); 1× when the export is the dense model."""
        cfg = self.cfg
        with threads(cfg.export_threads):
            _, decisions = export_decisions(copy.deepcopy(model).cpu().eval(), self.example_input(cfg.export_batch),
                                            "latency", cfg.export_backend)
        whole = decisions["whole"]
        if whole is None or not whole["kept_thin"]:
            return {"speedup": 1.0, "speedup_iqr": [1.0, 1.0]}
        return {"speedup": whole["speedup"], "speedup_iqr": whole["speedup_iqr"]}

    def speed_line(self, speed: dict) -> str:
        cfg = self.cfg
        low, high = speed["speedup_iqr"]
        where = f"{cfg.export_threads} thread{'s' * (cfg.export_threads > 1)}" if cfg.export_threads else \
            "the run's threads"
        return (f"measured at the deployment ({cfg.export_backend}, batch {cfg.export_batch}, {where}): "
                f"{speed['speedup']:.2f}× the dense model's speed (IQR {low:.2f}–{high:.2f}), target "
                f"{cfg.target_speedup:g}×")

    def filter_prune(self, model: nn.Module, fraction: float | None = None, reference: nn.Module | None = None) -> dict:
        """filter_prune_ to the run's budget (`fraction` of the dense latency or FLOPs in place of it): target_speedup
        measured on the deployment, or prune_flops; measured against `reference` (the dense model) when given."""
        cfg = self.cfg
        fraction = fraction or self.budget_fraction
        target = {"speedup": 1 / fraction} if cfg.target_speedup else {"flops": fraction}
        with threads(cfg.export_threads if cfg.target_speedup else 0):
            return filter_prune_(model, self.example_input(cfg.export_batch if cfg.target_speedup else 1),
                                 self.excluded(model), **target, backend=cfg.export_backend,
                                 importance="l1" if cfg.method == "filter_pruning" else "group",
                                 round_to=cfg.round_to or None, reference=reference)

    def gradual_channel_cut(self, model: nn.Module, progress: float, dense: nn.Module) -> bool:
        """One cut of the cubic schedule (`scheduled_fraction`) for the filter prunings: channels are removed until
        the model keeps at most that fraction of the dense FLOPs, or runs at least its inverse times the dense
        model's speed, measured on the deployment against `dense` (the train stage's model). Decided by rank 0 on a
        CPU copy; every process then takes its weights. Returns whether channels were removed (the parameters are
        then new)."""
        cfg, fraction = self.cfg, self.scheduled_fraction(progress)

        def decide():
            candidate = copy.deepcopy(model).cpu()
            out = self.filter_prune(candidate, fraction, reference=dense)
            return out, candidate.state_dict() if out["cut"] else None

        out, state = self.cluster.on_main(decide)
        if state is None:
            return False
        device, training = next(model.parameters()).device, model.training
        resize_to_state_(model, state)
        load_into(model, state, "a gradual channel cut")
        model.to(device).train(training)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        reached = f"{out['speedup']:.2f}× the dense model's speed measured on {cfg.export_backend}" \
            if "speedup" in out else f"FLOPs {out['flops'] / out['dense_flops']:.3f} of dense"
        removed = _channels_removed(out, "dense channels")
        self.echo(f"  channel cut at {progress:.0%} of the stage: {removed}, {reached}")
        self.log_cut(model, progress, flops=out["flops"] / out["dense_flops"], speedup=out.get("speedup"))
        return True

    def excluded(self, model: nn.Module) -> list[nn.Module]:
        """The modules exclude_modules names: left dense by SVD training, left whole by filter pruning."""
        return [module for name, module in model.named_modules()
                if name and name_matches(name, self.cfg.exclude_modules)]

    def calibration_batches(self, model: nn.Module, images: int):
        """About `images` training images (no augmentation, a fixed seeded draw), in batches on the model's device."""
        batches = self.data.batches(self.data.train, self.cfg.batch_size, torch.Generator().manual_seed(self.cfg.seed),
                                    max_batches=-(-images // self.cfg.batch_size))
        device = next(model.parameters()).device
        return (x.to(device) for x, _ in batches)

    def recalibrate_bn(self, model: nn.Module) -> int:
        """Batch-norm statistics re-estimated on `bn_recalibrate` training images; returns the number of layers
        recalibrated."""
        if not self.cfg.bn_recalibrate:
            return 0
        return svdtrain.recalibrate_bn(model, self.calibration_batches(model, self.cfg.bn_recalibrate))


def _check_writable(folder: Path, needed: int):
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


class RunFolderError(ValueError):
    """The run folder cannot be written (permissions, missing parent, no space); the message says what to do."""


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Each SVD layer's |s|, sorted descending (all groups together)."""
    return {name: layer.s.detach().abs().flatten().sort(descending=True).values.tolist()
            for name, layer in svd_layers(model)}


# --- the stages --------------------------------------------------------------------------------------------------

def stage_train(run: Run) -> dict:
    """Dense training, or SVD form from scratch with orthogonality only; or start from a dense checkpoint."""
    cfg = run.cfg
    model = run.starting_model()
    form = "svd" if cfg.train_mode == "svd" else "dense"
    if form == "svd":
        run.decompose(model, init="svd" if cfg.dense_checkpoint else "random")
    started = time.perf_counter()
    accuracy = run.fit(model, "train", cfg.train_epochs, cfg.lr, cfg.lambda_o if form == "svd" else 0.0, 0.0)
    result = {"form": form, "accuracy": accuracy, "seconds": time.perf_counter() - started}
    run.finish("train", result, model)
    return result


def stage_sparsify(run: Run) -> dict:
    """svd: convert to SVD form (exact SVD) if dense, then train with orthogonality + sparsity.
    trp: dense training with periodic SVD truncation and the nuclear norm. group_sl, and filter_pruning with
    prune_cuts: see `_sparsify_filters`. Other methods: nothing to do."""
    cfg = run.cfg
    model = run.model_after("train")
    started = time.perf_counter()
    if cfg.method == "svd":
        if not svd_layers(model):
            run.decompose(model, init="svd")
        run.write_in("sparsify", "spectra_before.json", json.dumps(spectra(model)))
        accuracy = run.fit(model, "sparsify", cfg.sparsify_epochs, cfg.lr, cfg.lambda_o, cfg.lambda_s,
                           cut=run.gradual_cut, rank_cuts=cfg.prune_cuts)
        run.write_in("sparsify", "spectra_after.json", json.dumps(spectra(model)))
    elif cfg.method == "trp":
        accuracy = run.fit(model, "sparsify", cfg.sparsify_epochs, cfg.lr, 0.0, 0.0, nuclear=cfg.trp_nuclear,
                           truncate_every=cfg.trp_period, truncate_energy=cfg.trp_energy)
    elif cfg.method in FILTER_METHODS and not one_shot(cfg.method, cfg.prune_cuts):
        accuracy = _sparsify_filters(run, model)
    else:
        accuracy = run.result("train")["accuracy"]
    if run.cuts:
        run.write_in("sparsify", "cuts.json", json.dumps(run.cuts, indent=1) + "\n")
    form = "svd" if svd_layers(model) else "dense"
    result = {"form": form, "accuracy": accuracy, "seconds": time.perf_counter() - started}
    run.finish("sparsify", result, model)
    return result


def _sparsify_filters(run: Run, model: nn.Module) -> float:
    """The filter prunings' sparsify stage: group_sl's sparsity learning (SGD with momentum at group_sl_lr, its
    regularizer on the gradients before each step, as DepGraph's is published), and with prune_cuts the channels
    cut toward the budget on the cubic schedule (filter_pruning: plain training at lr meanwhile)."""
    cfg = run.cfg
    dense = copy.deepcopy(model).cpu().eval()  # the budget's reference: the train stage's model
    learner = {}

    def regularize(m: nn.Module):
        if "pruner" not in learner:  # built on the model as it is now: a cut replaces the layers it spans
            training = m.training
            m.eval()  # the trace runs a forward pass, which must not move the batch-norm statistics
            example = run.example_input().to(next(m.parameters()).device)
            learner["pruner"] = group_sparsity_pruner(m, example, run.excluded(m), cfg.group_sl_reg)
            m.train(training)
        learner["pruner"].regularize(m)

    def cut(m: nn.Module, progress: float) -> bool:
        changed = run.gradual_channel_cut(m, progress, dense)
        if changed:
            learner.clear()
        return changed

    if cfg.method == "group_sl":
        settings = {"regularize": regularize, **({"optimizer": "sgd"} if cfg.group_sl_lr else {})}
        lr = cfg.group_sl_lr or cfg.lr
    else:
        settings, lr = {}, cfg.lr
    return run.fit(model, "sparsify", cfg.sparsify_epochs, lr, 0.0, 0.0, cut=cut, rank_cuts=cfg.prune_cuts,
                   **settings)


def stage_prune(run: Run) -> dict:
    """Prune singular values by energy or to a FLOPs / parameter budget; filter_pruning prunes channels instead."""
    cfg = run.cfg
    model = run.model_after("sparsify")
    example = run.example_input()
    if cfg.method in FILTER_METHODS:
        # After gradual cuts the model may meet the budget already (then nothing is cut) or fall short of it by
        # what the last cut's timing missed: measured against the dense model, it is cut to the budget.
        dense = run.model_after("train").eval()
        dense_flops = svdtrain.count_flops(dense, example)
        pruned = run.filter_prune(model, reference=dense)
        run.echo(f"filter pruning: {_channels_removed(pruned)}"
                 + (" (the gradual cuts during sparsify reached the budget)" if cfg.prune_cuts and not pruned["cut"]
                    else "")
                 + (f"; {run.speed_line(pruned)}" if cfg.target_speedup else ""))
        result = {"form": "dense", **_recalibrated(run, model), **pruned,
                  "flops": svdtrain.count_flops(model, example), "dense_flops": dense_flops}
        run.finish("prune", result, model)
        return result
    if not svd_layers(model):
        run.decompose(model, init="svd")
    if cfg.method == "whitened_svd":
        whitened = whiten_(model, input_covariances(model, run.calibration_batches(model, cfg.whiten_images)))
        run.echo(f"whitened SVD: {len(whitened)} of {len(svd_layers(model))} layers, by the input covariance over "
                 f"{cfg.whiten_images} training images")
    speed = {}
    if cfg.target_speedup and cfg.prune_cuts:
        # The gradual cuts aimed at the target by predicted latency; measured, the model may already meet it, and a
        # cut for the prediction's last per cent can cost many points (a trained ResNet-20 at target 2, measured
        # at 2.06× and cut to the prediction anyway: 88.39 → 72.86 % after batch-norm recalibration).
        speed = run.measured_speedup(model)
        run.echo(run.speed_line(speed))
    def meets(speed: dict) -> bool:
        return bool(speed) and speed["speedup"] * TIE >= cfg.target_speedup

    report = run.prune(model, 1.0 if meets(speed) else None)  # a budget of the dense latency: the report, nothing cut
    if cfg.target_speedup:
        # The ranks were chosen by predicted latency; the whole model, measured, may fall short of it (timing
        # noise, work a lone layer does not show): cut further, by the measured shortfall, a few times at most.
        for attempt in range(SPEED_CORRECTIONS + 1):
            if not speed or report.cut:  # not measured yet, or cut since
                speed = run.measured_speedup(model)
                run.echo(run.speed_line(speed))
            if meets(speed) or attempt == SPEED_CORRECTIONS:
                break
            aim = report.latency_after_ms / report.dense_latency_ms * speed["speedup"] / cfg.target_speedup
            further = run.prune(model, aim)
            if not further.cut:
                run.echo("  short of the target, and no lower rank is predicted faster: this is the fastest export "
                         "of these layers on the deployment")
                break
            run.echo(f"  short of the target: cut to {aim:.3f} of the dense latency (predicted)")
            report = _merged(report, further)
    run.echo(str(report))
    if cfg.method == "whitened_svd":
        normalize_v_(model, whitened)  # fine-tuning's scale (see normalize_v_); the same function
    if cfg.prune_cuts and not report.cut:
        run.echo("nothing left to cut: the gradual cuts during sparsify reached the budget")
    run.write_in("prune", "prune_report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    result = {"form": "svd", **_recalibrated(run, model), "energy": report.energy,
              "flops": report.flops_after, "dense_flops": report.dense_flops, **speed}
    run.finish("prune", result, model)
    return result


def _channels_removed(pruned: dict, of: str = "channels") -> str:
    """What one filter pruning removed, as filter_prune_ returned it."""
    steps = pruned.get("global_steps")
    return (f"{pruned['channel_ratio']:.3f} of each layer's {of} removed"
            + (f", then {steps} global step{'s' * (steps > 1)} of the least important" if steps else ""))


def _merged(first: PruneReport, second: PruneReport) -> PruneReport:
    """One report for two prunes in a row: the ranks and costs before the first, after the second."""
    for row, before in zip(second.layers, first.layers):
        row["rank_before"] = before["rank_before"]
    second.flops_before, second.params_before = first.flops_before, first.params_before
    second.latency_before_ms = first.latency_before_ms
    return second


def _recalibrated(run: Run, model: nn.Module) -> dict:
    """Accuracy of the pruned model, and after batch-norm recalibration when the run asks for it."""
    out = {"accuracy": run.accuracy(model)}
    if run.recalibrate_bn(model):
        out["accuracy_before_bn_recalibration"], out["accuracy"] = out["accuracy"], run.accuracy(model)
        run.echo(f"batch-norm statistics re-estimated on {run.cfg.bn_recalibrate} training images: accuracy "
                 f"{out['accuracy_before_bn_recalibration']:.2f} % -> {out['accuracy']:.2f} %")
    return out


def stage_finetune(run: Run) -> dict:
    """Fine-tune the pruned model: svd with orthogonality only; baselines without regularizers. Methods that
    have no sparsify phase (truncated_svd, whitened_svd, filter_pruning with prune_cuts=0) fine-tune for
    sparsify_epochs + finetune_epochs, so every method gets the same number of epochs after the dense model."""
    cfg = run.cfg
    model = run.model_after("prune")
    epochs = cfg.finetune_epochs + (cfg.sparsify_epochs if one_shot(cfg.method, cfg.prune_cuts) else 0)
    started = time.perf_counter()
    accuracy = run.fit(model, "finetune", epochs, cfg.finetune_lr, cfg.lambda_o if cfg.method == "svd" else 0.0, 0.0)
    result = {"form": "svd" if svd_layers(model) else "dense", "accuracy": accuracy,
              "seconds": time.perf_counter() - started}
    run.finish("finetune", result, model)
    return result


def stage_export(run: Run) -> dict:
    """The plain model as model.pt (state_dict) + layout.json (rebuild with `load_exported`: no code is unpickled),
    model.pt2 (torch.export) and model.onnx; forms chosen by export_strategy on export_backend (at export_batch,
    export_threads)."""
    cfg = run.cfg
    model = run.model_after("finetune")
    example = run.example_input()
    with threads(cfg.export_threads):
        small, decisions = export_decisions(model, run.example_input(cfg.export_batch), cfg.export_strategy,
                                            cfg.export_backend)
        small.eval()
    for line in dense_reasons(decisions, cfg):
        run.echo(line)
    folder = run.stage_dir("export")
    layers = [{"name": name, "rank": layer.rank, "full_rank": layer.full_rank,
               "decomposition": getattr(layer, "decomposition", "channel"),
               "form": "thin" if isinstance(small.get_submodule(name), nn.Sequential) else "dense",
               "why": decisions["layers"][name]["why"]}
              for name, layer in svd_layers(model)]
    layout = {"model": cfg.model, "kind": "svd" if layers else "dense", "strategy": cfg.export_strategy,
              "backend": cfg.export_backend, "batch": cfg.export_batch, "threads": cfg.export_threads,
              "layers": layers}
    write_atomic(folder / "layout.json", json.dumps(layout, indent=2) + "\n")
    save_atomic(small.state_dict(), folder / "model.pt")
    program = torch.export.export(small, (example,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_atomic(folder / "model.pt2", buffer.getvalue())
    onnx = _export_onnx(small, example, folder / "model.onnx") if cfg.onnx else "disabled (onnx=false)"
    result = {"form": "exported", "accuracy": run.accuracy(small), "flops": svdtrain.count_flops(small, example),
              "params": svdtrain.count_params(small), "onnx": onnx, "layers": layers}
    run.finish("export", result)
    return result


def dense_reasons(decisions: dict, cfg: RunConfig) -> list[str]:
    """What `export_decisions` kept dense on the deployment and why (measured times), and what would pay there; no
    line when every layer is thin."""
    if cfg.export_strategy != "latency":
        return []
    where = f"{cfg.export_backend} at batch {cfg.export_batch}"
    layers, whole = decisions["layers"], decisions["whole"]
    dense = {name: e for name, e in layers.items() if e["form"] == "dense"}
    lines = []
    if dense:
        why = [f"{name} (rank {e['rank']}: thin pair measured no faster, dense {e['dense_ms']:.3f} ms, thin "
               f"{e['thin_ms']:.3f} ms; " + (f"it pays at rank ≤ {e['thin_pays_at_rank']})"
                                             if e.get("thin_pays_at_rank") else "no lower rank pays)")
               if "dense_ms" in e else f"{name} ({e['why']})" for name, e in dense.items()]
        lines.append(f"export: {len(dense)} of {len(layers)} layers stay dense on {where}: " + "; ".join(why))
    if whole is not None and not whole["kept_thin"]:
        lines.append(f"export: with its thin pairs the whole model measured {whole['thin_ms']:.3f} ms against "
                     f"{whole['dense_ms']:.3f} ms dense on {where}, not 3 % faster, so the export is the dense "
                     "model")
    if lines:
        deeper = [name for name, e in dense.items() if e.get("thin_pays_at_rank")]
        lines.append("  what would pay: " + (f"lower ranks in {', '.join(deeper)} (a deeper budget: target_speedup, "
                                             "prune_flops or a larger energy), " if deeper else "")
                     + "a larger export_batch, or another export_backend (svdtrain bench latency compares them)")
    return lines


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return "skipped: pip install 'svdtrain[tool]' for onnx and onnxscript"
    import logging
    import warnings

    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # it warns about torchvision ops it cannot find: irrelevant here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
    finally:
        onnx_log.setLevel(level)
    write_atomic(path, program.model_proto.SerializeToString())
    return str(path.name)


def load_exported(run_folder: Path, run: Run | None = None, trust_code: bool = False) -> nn.Module:
    """The exported plain model of a run, on the CPU, rebuilt from config.json, layout.json and model.pt (no code
    unpickled); works on a machine without the GPU the run trained on. `run`: that run, already open. A run of a
    model given by reference (user code) is refused unless `trust_code`: rebuilding it runs that code."""
    run = run or Run.open(run_folder, {"device": "cpu"}, trust_code=trust_code)
    layout = json.loads((run.stage_dir("export") / "layout.json").read_text())
    state = load_weights(run.stage_dir("export") / "model.pt")
    model = run.dense_model()
    if layout["kind"] == "svd":
        svdtrain.rebuild(model, {row["name"]: row for row in layout["layers"]})
    else:
        resize_to_state_(model, state)
    load_into(model, state, f"{run_folder}/export/model.pt")
    return model.eval()


def stage_report(run: Run) -> dict:
    from .report import write_report

    return write_report(run)


STAGE_FUNCTIONS = {"train": stage_train, "sparsify": stage_sparsify, "prune": stage_prune,
                   "finetune": stage_finetune, "export": stage_export, "report": stage_report}
# Stages that decide (which ranks) or measure (latency) run on rank 0 alone, so every process goes on
# with the same model: the others wait and then read what rank 0 wrote.
RANK0_STAGES = ("prune", "export", "report")


def run_stage(run: Run, stage: str, resume: bool = False) -> dict:
    """Run one stage, built in a hidden folder beside its old output and swapped in only when it has finished:
    a stage that fails leaves the run folder as it was. Without `resume` the build starts afresh; with it, an
    interrupted build continues from its last epoch checkpoint."""
    folder, building = run.folder / stage, run.folder / f".{stage}.new"
    run.finish_swaps()
    run.check_inputs(stage)

    def prepare():
        i = STAGES.index(stage)
        source = run.result(STAGES[i - 1]).get("id") or "" if i else ""  # the input this build is made from
        stamp = building / BUILT_FROM
        outdated = stamp.is_file() and stamp.read_text() != source
        if building.exists() and not resume and not outdated and any(building.glob("epoch_*.pt")):
            raise RunFolderError(f"{building} holds an interrupted {stage} stage with epoch checkpoints; continue "
                                 f"it with `svdtrain {stage} {run.folder} --resume`, or delete that folder to "
                                 "start the stage over")
        if building.exists() and (not resume or outdated):
            shutil.rmtree(building)  # a fresh start, or an interrupted build from an input since replaced
        if resume and not building.exists() and folder.is_dir() and not run.done(stage):
            folder.rename(building)  # an interrupted stage of a folder from before stages were built aside
        building.mkdir(exist_ok=True)
        write_atomic(stamp, source)
        for leftover in [*run.folder.glob(".*.tmp"), *building.glob(".*.tmp")]:
            leftover.unlink()  # a temporary file a crash left mid-save; the file it was to replace is whole

    run.cluster.on_main(prepare)  # and no process reads the folder before it is ready
    if run.cfg.threads:
        torch.set_num_threads(run.cfg.threads)
    run.echo(f"== {stage}")
    run.building[stage] = building
    try:
        if stage in RANK0_STAGES:
            result = run.cluster.on_main(lambda: STAGE_FUNCTIONS[stage](run.alone()))
        else:
            result = STAGE_FUNCTIONS[stage](run)
            run.cluster.barrier()  # what the stage wrote is complete before any process reads it
    except Exception:
        # Nothing to continue from (no epoch checkpoint): the attempt goes, and the folder is as it was.
        run.cluster.on_main(lambda: None if any(building.glob("epoch_*.pt")) else shutil.rmtree(building, True))
        raise
    finally:
        del run.building[stage]
    run.cluster.on_main(lambda: _swap_in(run.folder, stage))
    return result


def _swap_in(folder: Path, stage: str):
    """folder/.stage.new becomes folder/stage; the old output goes. A crash between the two renames is finished by
    _finish_swaps at the next command."""
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


def _finish_swaps(folder: Path):
    """After a crash mid-swap: each old output back in place if the new one had not taken it, else gone (the new
    one, whole, stays in .stage.new: `--resume` of that stage finishes it)."""
    for stage in STAGES:
        old = folder / f".{stage}.old"
        if old.exists():
            if (folder / stage).exists():
                shutil.rmtree(old)
            else:
                os.replace(old, folder / stage)


def run_all(run: Run, resume: bool = False) -> dict:
    """Every stage in order; with `resume`, finished stages are skipped and an interrupted one continues (an
    interrupted stage command's too). A finished stage whose input was rebuilt since (a stage command run on its
    own) runs again, and so do those after it."""
    result, skipping = {}, resume
    run.finish_swaps()
    run.echo(run.data_summary["line"])
    for stage in STAGES:
        if skipping and run.current(stage) and not (run.folder / f".{stage}.new").exists():
            run.echo(f"== {stage}: done")
            continue
        skipping = False
        result = run_stage(run, stage, resume=resume)
    return result
