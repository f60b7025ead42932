"""RunConfig: every setting of a pipeline run, flat, frozen and validated.

The defaults are the quick Fashion-MNIST ResNet-20 recipe. A config file (TOML)
and `key=value` arguments override them; values are parsed as TOML values
(`lr=3e-4`, `exclude_modules=["fc"]`, `augment=false`) with bare words as strings.
The pruning knob a file or an argument names wins over the defaults' (`named_wins`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from svdtrain.latency import BACKENDS

from .baselines import FILTER_METHODS, METHODS
from .datasets import DATASETS
from .files import write_section
from .models import MODELS, is_reference


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BUDGETS = ("target_speedup", "prune_flops", "prune_params")  # at most one is set; none: the energy rule
QUICK_TRAIN_SUBSET = 30000  # train_subset=-1 on fashion_mnist: half its training images, the quick recipe's size


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what is allowed."""


def _choice(*values, doc="", other=None):
    """One of `values`; with `other` = (description, accepts), also any value `accepts(value)` is true for."""
    return {"choices": values, "doc": doc, **({"other": other} if other else {})}


def _model_reference(value: str) -> bool:
    return is_reference(value) and all(value.rpartition(":")[::2])  # both module / file and callable named


def _range(low=None, high=None, low_open=False, high_open=False, doc=""):
    return {"range": (low, high, low_open, high_open), "doc": doc}


def _doc(doc: str):
    return {"doc": doc}


@dataclass(frozen=True)
class RunConfig:
    name: str = field(default="quick", metadata=_doc(
        "a run's folder is out_dir/name-date-time (a plain folder name: no / or \\, not . or ..)"))
    # --- data
    data: str = field(default="fashion_mnist", metadata=_choice(*DATASETS, doc=(
        "the data set (read from packages or data_dir); imagefolder: data_dir/train/<class>/*.jpg and "
        "data_dir/val/<class>/*.jpg, normalised by the training images' statistics; imagenet: the same reader with "
        "ImageNet's")))
    data_dir: str = field(default="", metadata=_doc("the data set's folder; empty: its default folder"))
    train_subset: int = field(default=-1, metadata=_range(-1, doc=(
        "N training images, drawn across classes (each class keeps its share; the same draw whatever seed); "
        "0 = all; -1 = 30,000 for fashion_mnist (the quick recipe's half), all for other data sets")))
    test_subset: int = field(default=0, metadata=_range(0, doc="N test images, drawn across classes; 0 = all"))
    val_subset: int = field(default=0, metadata=_range(0, doc=(
        "hold out N training images, drawn across classes, and evaluate on them instead of the test set (for "
        "choosing settings); 0 = evaluate on the test set")))
    image_size: int = field(default=0, metadata=_range(0, doc="image folders / synthetic only; 0 = default"))
    workers: int = field(default=2, metadata=_range(0, doc=(
        "image folders: DataLoader worker processes (per torchrun process) decoding the images, once at load when "
        "the folder fits in memory, else each batch ahead of training; 0 = 4 threads in the training process")))
    augment: bool = field(default=True, metadata=_doc("random crop with padding + horizontal flip while training"))
    # --- model
    model: str = field(default="resnet20", metadata=_choice(*MODELS, other=(
        "package.module:callable or path/to/file.py:callable", _model_reference), doc=(
        "the network: a reference model, or your own callable (called with num_classes, in_channels, image_size "
        "where its signature takes them, plus model_args; a file's code runs when the run loads it)")))
    model_args: dict = field(default_factory=dict, metadata=_doc(
        "keyword arguments for a model given by reference, as a TOML table: model_args={width=32}"))
    bottleneck: bool = field(default=False, metadata=_doc(
        "CIFAR ResNet with bottleneck blocks (depth 9n + 2), as the authors' code for depth ≥ 44"))
    # --- method
    method: str = field(default="svd", metadata=_choice(*METHODS, doc="svd or a baseline (recipes/baselines.py)"))
    train_mode: str = field(default="dense", metadata=_choice(
        "dense", "svd", doc="train stage: dense (converted by exact SVD before sparsify) or SVD form from scratch"))
    dense_checkpoint: str = field(default="", metadata=_doc(
        "a dense state_dict to start from instead of training (the train stage converts it)"))
    decomposition: str = field(default="spatial", metadata=_choice(
        "channel", "spatial", doc="how a conv weight is matricised before SVD (METHOD.md §1)"))
    exclude_modules: tuple[str, ...] = field(default=("fc",), metadata=_doc(
        "layers left dense: names, dotted suffixes or regular expressions (the classifier, METHOD.md §1)"))
    lambda_o: float = field(default=1.0, metadata=_range(0, doc="orthogonality weight"))
    lambda_s: float = field(default=0.1, metadata=_range(0, doc="sparsity weight"))
    sparsity: str = field(default="hoyer", metadata=_choice(
        "l1", "hoyer", "hoyer_square", doc="the sparsity regularizer on singular values"))
    energy: float = field(default=0.1, metadata=_range(0, 1, high_open=True, doc="energy pruned per layer"))
    prune_flops: float = field(default=0.0, metadata=_range(0, 1, doc="FLOPs budget (fraction); 0 = unused"))
    prune_params: float = field(default=0.0, metadata=_range(0, 1, doc="params budget (fraction); 0 = unused"))
    target_speedup: float = field(default=1.9, metadata=_range(0, doc=(
        "the speed target: S× the dense model's measured speed at the deployment (export_backend, export_batch, "
        "export_threads); ranks (filter pruning: channels) are cut toward the latency it implies, predicted from "
        "per-layer times measured there, and the prune stage measures the whole model there and cuts further "
        "while it falls short; 0 = a prune_flops / prune_params / energy budget instead")))
    min_rank: int = field(default=1, metadata=_range(1, doc="no layer is cut below this rank"))
    rank_multiple: int = field(default=0, metadata=_range(0, doc=(
        "a budget (target_speedup, prune_flops, prune_params) rounds ranks up to multiples of this (sizes CPU "
        "kernels run well); 0 = per layer, the largest power of two ≤ 16 and ≤ a third of its full rank, and for "
        "target_speedup also the powers of two below it where measured faster; 1 = no rounding")))
    prune_cuts: int = field(default=8, metadata=_range(0, doc=(
        "svd: cut ranks toward the budget (target_speedup, prune_flops or prune_params) this many times during "
        "sparsify, on a cubic schedule ending at the budget; filter_pruning, group_sl: the same with channels "
        "(filter_pruning then trains through sparsify at lr); 0 = one cut in the prune stage (the paper, and the "
        "one-shot filter prunings); truncated_svd, whitened_svd and trp ignore it")))
    cut_eval_images: int = field(default=0, metadata=_range(0, doc=(
        "with prune_cuts: after each cut, the accuracy of the model as cut on this many evaluation images (drawn "
        "across classes), on a copy with its batch-norm statistics re-estimated (bn_recalibrate) and as training "
        "goes on with it, logged with the cut in sparsify/cuts.json (where two methods' curves part); 0 = off")))
    bn_recalibrate: int = field(default=2048, metadata=_range(0, doc=(
        "after the prune stage's structural change (every method), re-estimate batch-norm statistics on this "
        "many training images; 0 = off")))
    distill: float = field(default=0.0, metadata=_range(0, 1, doc=(
        "sparsify and fine-tune (every method): weight of distillation from the train stage's model (KL to its "
        "softened logits) against the cross-entropy's 1 − distill; 0 = off")))
    distill_temperature: float = field(default=4.0, metadata=_range(0, low_open=True,
                                                                    doc="softening of both models' logits"))
    prune_channels: bool = field(default=False, metadata=_doc(
        "svd: the cuts remove whole channels as well as singular values (those that can go together, coupled "
        "through residual additions): ranks first, up to rank_energy, then one ratio of channels in every group, "
        "the budget met by timing whole candidate models"))
    rank_energy: float = field(default=0.05, metadata=_range(0, 1, low_open=True, high_open=True, doc=(
        "with prune_channels: a cut takes singular values first, each layer losing at most this much of its Σ s², "
        "then channels, one ratio in every group, for the rest of the budget")))
    lambda_c: float = field(default=0.0, metadata=_range(0, doc=(
        "with prune_channels: weight of the channel sparsity regularizer (the sparsity kind of each channel "
        "group's channel norms) during sparsify; 0 = off, the default: 0.1 cost accuracy on the validation split")))
    round_to: int = field(default=0, metadata=_range(0, doc=(
        "filter_pruning, group_sl: each pruned layer keeps a multiple of this many channels (Torch-Pruning's "
        "round_to: sizes the backend runs well); 0 = any count")))
    group_sl_reg: float = field(default=5e-4, metadata=_range(0, low_open=True, doc=(
        "group_sl: strength of the group sparsity learning during sparsify (Torch-Pruning's reg)")))
    group_sl_lr: float = field(default=0.01, metadata=_range(0, doc=(
        "group_sl: learning rate of the sparsity learning (sparsify), which steps with SGD and momentum as "
        "DepGraph's is published (Torch-Pruning's CIFAR benchmark: SGD, lr 0.01, momentum 0.9); 0 = the run's "
        "optimizer at lr (how group_sl runs made before this key trained)")))
    whiten_images: int = field(default=2048, metadata=_range(1, doc=(
        "whitened_svd, rank_score=output: training images over which each layer's input covariance is measured")))
    rank_score: str = field(default="size", metadata=_choice("size", "output", doc=(
        "svd: which singular values a cut removes: the smallest (size), or those whose removal changes the "
        "layer's output least on whiten_images training images, |s_i|·‖Xᵀv_i‖ (output; channel-wise only)")))
    trp_period: int = field(default=20, metadata=_range(1, doc="trp: steps between SVD truncations"))
    trp_nuclear: float = field(default=3e-4, metadata=_range(0, doc="trp: nuclear-norm weight"))
    trp_energy: float = field(default=0.1, metadata=_range(0, 1, high_open=True,
                                                           doc="trp: energy removed by each truncation in training"))
    # --- deployment: where the exported model will run (export_strategy=latency times each layer there, the
    # whole export is never slower than dense there, and the report's first line measures there)
    export_strategy: str = field(default="latency", metadata=_choice(
        "flops", "latency", doc="export: fewer FLOPs per layer, or measured faster on export_backend"))
    export_backend: str = field(default="onnxruntime", metadata=_choice(*BACKENDS, doc="where the export will run"))
    export_batch: int = field(default=1, metadata=_range(1, doc="the deployment's batch size"))
    export_threads: int = field(default=1, metadata=_range(0, doc=(
        "the deployment's CPU threads (a batch-1 server runs one model per core); 0 = the run's threads")))
    # --- optimisation (every stage)
    optimizer: str = field(default="adam", metadata=_choice("sgd", "adam", doc="every stage's optimizer"))
    lr: float = field(default=1e-3, metadata=_range(0, low_open=True, doc="learning rate of train and sparsify"))
    finetune_lr: float = field(default=3e-4, metadata=_range(0, low_open=True, doc="learning rate of fine-tuning"))
    momentum: float = field(default=0.9, metadata=_range(0, 1, high_open=True, doc="SGD momentum"))
    weight_decay: float = field(default=0.0, metadata=_range(0, doc="L2 weight decay"))
    batch_size: int = field(default=128, metadata=_range(1, doc="images per step, over all torchrun processes"))
    schedule: str = field(default="cosine", metadata=_choice(
        "constant", "step", "cosine", doc="learning-rate schedule within each stage"))
    milestones: tuple[float, ...] = field(default=(0.494, 0.744), metadata=_doc(
        "schedule=step: where the lr is multiplied by gamma, fractions of a stage"))
    gamma: float = field(default=0.1, metadata=_range(0, 1, low_open=True, doc="schedule=step: lr factor"))
    train_epochs: int = field(default=3, metadata=_range(0, doc="epochs of the train stage"))
    sparsify_epochs: int = field(default=2, metadata=_range(0, doc="epochs of the sparsify stage"))
    finetune_epochs: int = field(default=1, metadata=_range(0, doc="epochs of fine-tuning"))
    # --- run
    device: str = field(default="auto", metadata=_choice(
        "auto", "cpu", "cuda", doc="auto: CUDA when there is a GPU (under torchrun, the GPU of LOCAL_RANK)"))
    amp: str = field(default="none", metadata=_choice("none", "bf16", doc="bf16: forward under bf16 autocast"))
    channels_last: bool = field(default=False, metadata=_doc(
        "NHWC memory format for the model and its 4-D inputs (faster convolutions on GPUs)"))
    sync_bn: bool = field(default=False, metadata=_doc(
        "under torchrun: batch norm over the whole global batch, so N processes train like one (SyncBatchNorm on "
        "GPUs, an all-reduce on the CPU); false: each process normalises its own share (faster)"))
    compile: bool = field(default=False, metadata=_doc("torch.compile the training forward"))
    on_nonfinite: str = field(default="stop", metadata=_choice(
        "stop", "skip", doc="a step with a non-finite loss or gradient: stop the run, or skip the step"))
    seed: int = field(default=0, metadata=_doc("seeds weights, data order and augmentation"))
    threads: int = field(default=0, metadata=_range(0, doc="torch threads; 0 = torch's default"))
    eval_batch_size: int = field(default=1000, metadata=_range(1, doc="images per evaluation batch"))
    max_batches: int = field(default=0, metadata=_range(0, doc="cap on batches per epoch (smoke tests); 0 = all"))
    progress: bool = field(default=True, metadata=_doc("progress bars"))
    onnx: bool = field(default=True, metadata=_doc("export also writes model.onnx"))
    latency_repeats: int = field(default=30, metadata=_range(1, doc="timed forwards per model in the report"))
    latency_backends: tuple[str, ...] = field(default=("eager", "compiled", "onnxruntime"), metadata=_choice(
        "eager", "compiled", "onnxruntime", doc=("the report times dense vs final on each, at each of "
                                                 "latency_batches on the run's threads; one missing its extras is "
                                                 "skipped with a note")))
    latency_batches: tuple[int, ...] = field(default=(1, 32), metadata=_range(1, doc="batch sizes the report times"))
    keep_checkpoints: int = field(default=2, metadata=_range(1, doc="epoch checkpoints kept per stage"))
    out_dir: str = field(default="runs", metadata=_doc("the folder run folders are made in"))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check(f, getattr(self, f.name)))
        budgets = [k for k in BUDGETS if getattr(self, k)]
        if len(budgets) > 1:
            raise ConfigError(f"{' and '.join(budgets)} are all set; allowed: at most one of {', '.join(BUDGETS)} "
                              "(0 = unused; none: the energy rule)")
        if self.target_speedup and self.target_speedup <= 1:
            raise ConfigError(f"target_speedup={self.target_speedup}; allowed: > 1 (times the dense model's speed), "
                              "or 0 for none")
        if self.target_speedup and self.export_strategy != "latency":
            raise ConfigError("target_speedup is measured where the export runs, so it needs export_strategy=latency "
                              "(each layer in its faster form there); allowed: export_strategy=latency, or a budget "
                              "of another kind (prune_flops=FRACTION, prune_params=FRACTION, or target_speedup=0 "
                              "for the energy rule)")
        if self.train_epochs == 0 and not self.dense_checkpoint and self.train_mode == "dense":
            raise ConfigError("train_epochs=0 needs dense_checkpoint=PATH (a dense state_dict to start from)")
        if self.method != "svd" and self.train_mode != "dense":
            raise ConfigError(f"method={self.method} starts from a dense model; allowed: train_mode=dense")
        if self.method == "whitened_svd" and self.decomposition != "channel":
            raise ConfigError("method=whitened_svd whitens a layer's matrix by the covariance of its inputs, which "
                              "channel-wise matrices have (a conv's input patches); allowed: decomposition=channel")
        if self.rank_score == "output" and (self.method != "svd" or self.decomposition != "channel"):
            raise ConfigError("rank_score=output weighs each singular value by the layer's inputs, which channel-wise "
                              "matrices have (a conv's input patches), in SVD training's cuts; allowed: method=svd "
                              "with decomposition=channel, or rank_score=size")
        if self.prune_channels and self.method != "svd":
            raise ConfigError(f"prune_channels removes channels in SVD training's cuts; method={self.method} "
                              "has its own (filter_pruning, group_sl) or none; allowed: method=svd")
        if self.prune_channels and self.rank_score == "output":
            raise ConfigError("prune_channels ranks channels by their norms and singular values by size; allowed: "
                              "rank_score=size")
        if self.method in FILTER_METHODS and not (self.prune_flops or self.target_speedup):
            raise ConfigError(f"method={self.method} needs prune_flops=FRACTION or target_speedup=S (the budget of "
                              "the pruned model)")
        if self.prune_cuts and self.method == "svd" and not self.budget:
            raise ConfigError(f"prune_cuts={self.prune_cuts} needs a budget to cut toward; allowed: "
                              "target_speedup=S, prune_flops=FRACTION or prune_params=FRACTION, or prune_cuts=0")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError(f"milestones={self.milestones}: allowed: fractions of a stage's epochs, each in (0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def budget(self) -> str | None:
        """The budget the ranks are cut toward: "target_speedup", "prune_flops", "prune_params", or None (energy)."""
        return next((k for k in BUDGETS if getattr(self, k)), None)

    @property
    def train_images(self) -> int:
        """train_subset with its default resolved: 0 = all."""
        if self.train_subset >= 0:
            return self.train_subset
        return QUICK_TRAIN_SUBSET if self.data == "fashion_mnist" else 0

    def replace(self, **changes) -> "RunConfig":
        check_keys(changes)
        return dataclasses.replace(self, **named_wins(changes))


def named_wins(changes: dict) -> dict:
    """`changes` plus the settings that step aside for what it names, so a knob the user names is never
    silently overridden by one they did not name here: naming one of energy / target_speedup / prune_flops /
    prune_params clears the other budgets, and naming energy alone also the gradual cuts toward a budget (e.g.
    `svdtrain prune RUN energy=0.2` on a run made with prune_flops and prune_cuts)."""
    cleared = {}
    named = [key for key in ("energy", *BUDGETS) if key in changes]
    if named:
        cleared.update({key: 0.0 for key in BUDGETS if key not in named})
        if named == ["energy"]:
            cleared["prune_cuts"] = 0
    return {**cleared, **changes}


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)


def check_keys(keys):
    for key in keys:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {key!r}; {hint}allowed: {', '.join(_FIELDS)}")


def _check(f: dataclasses.Field, value):
    """`value` converted to the field's type and checked against its choices / range."""
    kind = _TYPES[f.name]
    meta = f.metadata
    given = value

    def bad(expected: str):
        return ConfigError(f"config key {f.name!r}: got {given!r}; allowed: {expected}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer" + _range_text(meta))
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad("a number" + _range_text(meta))
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad(_allowed_text(meta) if "choices" in meta else "a string")
        if "other" in meta and meta["other"][1](value):
            return value
    elif kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a table of keyword arguments, e.g. {width=32}")
        return dict(value)
    else:  # tuple[str, ...] | tuple[int, ...] | tuple[float, ...]
        item = typing.get_args(kind)[0]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, item) or (item is float and isinstance(v, int) and not isinstance(v, bool)) for v in value):
            raise bad(f"a list of {item.__name__}s")
        value = tuple(item(v) for v in value)
    items = value if isinstance(value, tuple) else (value,)  # a list's choices and range hold for each item
    if "choices" in meta and any(v not in meta["choices"] for v in items):
        raise bad(_allowed_text(meta))
    if "range" in meta:
        low, high, low_open, high_open = meta["range"]
        if any((low is not None and (v < low or (low_open and v == low))) or
               (high is not None and (v > high or (high_open and v == high))) for v in items):
            raise bad(_range_text(meta).strip(" ,"))
    return value


_PLURAL = {str: "strings", int: "integers", float: "numbers"}


def reference() -> str:
    """Every config key as a Markdown table (key, default, allowed values, meaning), from RunConfig's own fields:
    docs/CONFIG.md's reference is this text (a test holds them equal)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        kind, meta = _TYPES[f.name], f.metadata
        if "choices" in meta:
            allowed = ("each of " if kind not in (str,) else "") + _allowed_text(meta)
        elif kind is dict:
            allowed = "a TOML table"
        elif kind is bool:
            allowed = "true, false"
        elif kind in (int, float):
            allowed = ("an integer" if kind is int else "a number") + _range_text(meta)
        elif kind is str:
            allowed = "a string"
        else:
            allowed = f"a list of {_PLURAL[typing.get_args(kind)[0]]}" + _range_text(meta)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = (json.dumps(list(default)) if isinstance(default, tuple) else str(default).lower()
                 if isinstance(default, bool) else f'"{default}"' if isinstance(default, str) else
                 "{}" if default == {} else str(default))
        rows.append(f"| `{f.name}` | `{shown}` | {allowed} | {meta['doc']} |")
    return "\n".join(rows)


def write_reference(path: Path = CONFIG_DIR.parent / "docs" / "CONFIG.md"):
    """Rewrite docs/CONFIG.md's config reference (between its config-reference markers) from `reference()`."""
    write_section(path, "config-reference", reference())


def _allowed_text(meta) -> str:
    return ", ".join(map(str, meta["choices"])) + (f" or {meta['other'][0]}" if "other" in meta else "")


def _range_text(meta) -> str:
    if "range" not in meta:
        return ""
    low, high, low_open, high_open = meta["range"]
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '≥'} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '≤'} {high}")
    return " " + " and ".join(parts)


def parse_value(text: str):
    """A command-line value as TOML would read it; anything TOML rejects is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        out[key.strip()] = parse_value(text.strip())
    check_keys(out)
    return out


def find_config(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"no config file {name_or_path!r}; give a path to a .toml file or one of: {', '.join(known)}")


def read_config_file(path: Path) -> dict:
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML config ({e})") from None
    check_keys(values)
    return values


def load_config(config: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults (the quick recipe) ← config file (a path or a name in configs/) ← key=value overrides."""
    values = named_wins(read_config_file(find_config(config))) if config else {}
    if config and "name" not in values:
        values["name"] = Path(config).stem
    values.update(named_wins(parse_overrides(overrides or [])))
    return RunConfig(**values)
