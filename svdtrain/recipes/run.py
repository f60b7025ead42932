"""A run: its folder (folder.py), data, models and training, and the cuts toward its budget (cuts.py)."""

from __future__ import annotations

import copy
import json
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

import svdtrain
from svdtrain.channels import resize_to_state_
from svdtrain.config import name_matches
from svdtrain.latency import check_backend

from .baselines import FILTER_METHODS
from .config import RunConfig
from .cuts import Cuts
from .data import Dataset
from .datasets import load_dataset
from .files import load_into, load_weights
from .folder import RunFolder, check_name, check_room, new_folder, resolve_paths
from .models import ModelError, build_model, one_line
from .train import StageSettings, evaluate, fit

# A speed target is refused before a run only when the export is predicted to miss it by more than this: the
# prediction of the fastest export moves with the machine's load. A run nearer its edge cuts to the fastest ranks
# there are and says what it measured.
SPEED_MARGIN = 1.15


class Run(RunFolder, Cuts):
    """A run folder with what its stages need: data, models, training, and the cuts toward its budget.

    Under torchrun there is one Run per process; rank 0 alone writes (see recipes/distributed.py).
    """

    def __init__(self, folder: Path, cfg: RunConfig, echo=print):
        super().__init__(folder, cfg, echo)
        self.cuts: list[dict] = []  # the gradual cuts made since this process started the sparsify stage

    @classmethod
    def create(cls, cfg: RunConfig, echo=print) -> "Run":
        """A new folder out_dir/<name>-<time>, made only once the config and data are known to be good."""
        check_name(cfg.name)
        cfg = cfg.replace(**resolve_paths({"model": cfg.model, "data_dir": cfg.data_dir,
                                           "dense_checkpoint": cfg.dense_checkpoint}))
        run = cls(Path(), cfg, echo)
        run.preflight()  # bad data, model, checkpoint or budget: an error now, and no folder
        run.folder = run.cluster.on_main(lambda: new_folder(cfg, run.space_needed(), run.config_json()))
        return run

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
        self.cluster.on_main(lambda: check_room(self.folder, self.space_needed()))

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
        """The model a stage left: SVD form with its ranks, or dense; at the widths it left (channels removed)."""
        state = load_weights(self.stage_dir(stage) / "final.pt")
        model = self.dense_model()
        if self.result(stage)["form"] == "svd":
            self.decompose(model)
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


def load_exported(run_folder: Path, run: Run | None = None, trust_code: bool = False) -> nn.Module:
    """The exported plain model of a run, on the CPU, rebuilt from config.json, layout.json and model.pt (no code
    unpickled); works on a machine without the GPU the run trained on. `run`: that run, already open. A run of a
    model given by reference (user code) is refused unless `trust_code`: rebuilding it runs that code."""
    run = run or Run.open(run_folder, {"device": "cpu"}, trust_code=trust_code)
    layout = json.loads((run.stage_dir("export") / "layout.json").read_text())
    state = load_weights(run.stage_dir("export") / "model.pt")
    model = run.dense_model()
    if layout["kind"] == "svd":
        svdtrain.rebuild(model, {row["name"]: row for row in layout["layers"]}, state)
    else:
        resize_to_state_(model, state)
    load_into(model, state, f"{run_folder}/export/model.pt")
    return model.eval()
