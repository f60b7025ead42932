"""The sweep harness of the benchmark scripts that compare compression methods (pareto.py, transformer.py,
rank_score.py): the methods' settings and tuning budget, running operating points from one shared dense
checkpoint (`Sweep`), tuning on a validation split (`tune`), and reading the curves at matched FLOPs and speed
(`interpolate`, `at_reduction`, `bars`). Rendering lives in render.py, each command line in its script.
A script's method tables are a `Tables` it passes to `tune` (the CNN sweep's are `CNN`); no script changes this
module's tables.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import svdtrain
from svdtrain.export import TIE
from svdtrain.latency import threads
from svdtrain.recipes.config import RunConfig
from svdtrain.recipes.pipeline import run_stage
from svdtrain.recipes.run import Run, load_exported
from svdtrain.recipes.report import conv_flops, dense_vs_final
from svdtrain.recipes.train import TrainingError


# The settings of each method. λ_s for Hoyer is the quick recipe's; L1's is the top of the paper's
# L1 range (0.1…0.3) as Hoyer's 0.1 is the top of its range; Hoyer-square's gradient is 2·‖s‖₁/‖s‖₂ times
# Hoyer's, so its λ_s is Hoyer's divided by that ratio as it stands on these models. TRP uses its code's settings
# (nuclear weight 3e-4, truncation keeping 90 % energy) with a truncation every 20 steps.
# svd_gradual is SVD training with its ranks cut toward the budget 8 times during sparsify (cubic
# schedule) instead of once after it, spatial-wise (channel-wise is its lever on the FLOPs axis, tried on the
# validation split); svd and svd_spatial are the paper's recipe (one cut).
_PAPER = {"method": "svd", "decomposition": "channel", "prune_cuts": 0}  # one cut after sparsify
METHODS = {
    "svd": {**_PAPER, "sparsity": "hoyer", "lambda_s": 0.1},
    "svd_spatial": {**_PAPER, "sparsity": "hoyer", "lambda_s": 0.1, "decomposition": "spatial"},
    "svd_gradual": {"method": "svd", "sparsity": "hoyer", "lambda_s": 0.1, "decomposition": "spatial",
                    "prune_cuts": 8},
    # SVD training cutting channels as well as singular values, with the channel regularizer (its alternative: none).
    "svd_channels": {"method": "svd", "sparsity": "hoyer", "lambda_s": 0.1, "decomposition": "spatial",
                     "prune_cuts": 8, "prune_channels": True, "lambda_c": 0.1},
    "truncated_svd": {"method": "truncated_svd", "decomposition": "channel"},
    "whitened_svd": {"method": "whitened_svd", "decomposition": "channel"},
    "trp": {"method": "trp", "decomposition": "channel", "trp_energy": 0.1, "trp_period": 20, "trp_nuclear": 3e-4},
    # Filter pruning cuts gradually as SVD training does (8 cuts on the cubic schedule during the compress phase);
    # its one-shot form is the lever it tries on the validation split (LEVERS).
    "filter_pruning": {"method": "filter_pruning", "prune_cuts": 8},
    # DepGraph's group sparsity learning (Torch-Pruning's GroupNormPruner, its reg, SGD with momentum at lr 0.01 as
    # published) during the compress phase, cutting by group norm gradually: the strongest filter pruning
    # Torch-Pruning offers.
    "group_sl": {"method": "group_sl", "group_sl_reg": 5e-4, "prune_cuts": 8},
    # The paper's ablations, left out of the default sweep for time (--methods adds them).
    "svd_no_ortho": {**_PAPER, "sparsity": "hoyer", "lambda_s": 0.1, "lambda_o": 0.0},
    "svd_l1": {**_PAPER, "sparsity": "l1", "lambda_s": 0.3},
    "svd_hoyer_square": {**_PAPER, "sparsity": "hoyer_square", "lambda_s": 0.01},
}
# The paper's one-cut recipes (svd, svd_spatial) are left out of the default sweep for time (--methods adds them).
DEFAULT_METHODS = ("svd_gradual", "truncated_svd", "trp", "filter_pruning", "group_sl")
BASELINES = ("truncated_svd", "whitened_svd", "trp", "filter_pruning", "group_sl")
FILTER_BASELINES = ("filter_pruning", "group_sl")  # the speed bars hold against the better of the two
# The speed axis: points are speed targets (target_speedup) measured on the deployment, with the tool's
# deployment settings (ranks in the multiples the backend runs well, each layer in its faster form).
SPEED_METHODS = ("svd_gradual", "truncated_svd", "filter_pruning", "group_sl")
DEPLOYMENT = {"export_strategy": "latency", "export_backend": "onnxruntime", "export_batch": 1, "export_threads": 1,
              "rank_multiple": 0}
SERVING_BATCH = 32  # the serving setting: ONNX Runtime at batch 32 on the sweep's threads
NEW_RECIPE = "svd_gradual"
# The same help for every method: batch-norm statistics re-estimated on 2,048 training images right
# after the structural change (rank cut, truncation, channel removal), before fine-tuning.
HELP = {"bn_recalibrate": 2048}
# Budgets met as closely as the ranks allow and exported by FLOPs (not the tool's defaults, rounded ranks and
# a latency export, which are for speed): the sweep compares accuracy at matched FLOPs, and its budgets go
# below what rounded ranks reach.
EXACT = {"rank_multiple": 1, "export_strategy": "flops"}
# On the speed axis, the rounding each method's structure allows is a setting like any other, tried on the
# validation split: ranks in multiples of 8 instead of prune_'s default (16 for most layers), channel counts
# in multiples of 8 (Torch-Pruning's round_to) instead of any count.
ROUNDING = {"svd_gradual": {"rank_multiple": 8}, "svd_channels": {"rank_multiple": 8},
            "truncated_svd": {"rank_multiple": 8}, "whitened_svd": {"rank_multiple": 8},
            "filter_pruning": {"round_to": 8}, "group_sl": {"round_to": 8}}
# The tuning budget, the same for every method on an axis: its own settings above, one alternative of its own,
# fine-tuning at a lower lr (for a model that is still accurate after its cut, the default 3e-4 can undo more
# than it recovers) and the lever that matters most to it (LEVERS: a lever is decided on the validation split
# and counts against its method's budget), tried on the validation split; then the offers every method gets, on
# the best so far. The one with the highest validation accuracy is used for the test sweep. svd_gradual's own
# alternative is a lower lr still, as the one-shot baselines' is a higher one.
LOWER_FINETUNE_LR = {"finetune_lr": 1e-4}
ALTERNATIVES = {
    "svd": {"lambda_s": 0.03},
    "svd_spatial": {"lambda_s": 0.03},
    "svd_gradual": {"finetune_lr": 3e-5},
    "svd_channels": {"lambda_c": 0.0},
    "truncated_svd": {"finetune_lr": 1e-3},
    "whitened_svd": {"finetune_lr": 1e-3},
    "trp": {"trp_energy": 0.2},
    "filter_pruning": {"finetune_lr": 1e-3},
    "group_sl": {"group_sl_reg": 1e-4},
    "svd_no_ortho": {"lambda_s": 0.03},
    "svd_l1": {"lambda_s": 0.1},
    "svd_hoyer_square": {"lambda_s": 0.003},
}
# Each method's lever, per axis (the knob its points are budgeted by). svd_gradual: on the speed axis, ranks in
# multiples of 16 only (no rank below the multiple where measured faster); at matched FLOPs, channel-wise layers;
# svd_channels: fine-tuning at 1e-3, the lr that helps a model whose channels were cut (filter pruning's one shot).
# Truncated SVD: the other decomposition (on the speed axis it starts spatial-wise, as channel-wise pairs reach no
# speed target). Filter pruning: one cut (at its best fine-tuning lr of the earlier sweeps) instead of gradual
# cuts. Group sparsity learning: a third strength, above the two its earlier tunings tried.
LEVERS = {
    "prune_flops": {"svd_gradual": {"decomposition": "channel"}, "truncated_svd": {"decomposition": "spatial"},
                    "filter_pruning": {"prune_cuts": 0, "finetune_lr": 1e-3}, "group_sl": {"group_sl_reg": 2e-3},
                    "trp": {"trp_period": 10}, "whitened_svd": {"whiten_images": 8192},
                    "svd": {"decomposition": "spatial"}, "svd_spatial": {"decomposition": "channel"}},
    "target_speedup": {"svd_gradual": {"rank_multiple": 16}, "svd_channels": {"finetune_lr": 1e-3},
                       "truncated_svd": {"decomposition": "channel"},
                       "filter_pruning": {"prune_cuts": 0, "finetune_lr": 1e-3}, "group_sl": {"group_sl_reg": 2e-3}},
}
DEFAULT_LEVER = {"finetune_lr": 3e-5}  # a method with no lever of its own: a lower fine-tuning lr still
# On the speed axis truncated SVD starts spatial-wise: its channel-wise pairs reach no speed target here.
SPEED_BASE = {"truncated_svd": {"decomposition": "spatial"}}
# Distillation from the dense model (the shared checkpoint) during the compress phase and fine-tuning,
# offered to every method after its own settings: the best of them with it. Kept where validation says it
# helps, as any other setting (it can hurt: the dense model's softened logits compete with the labels).
DISTILL = {"distill": 0.5}
# Settings that act only after the compress phase (prune stage, fine-tuning): runs that differ only in
# them share one compress phase.
AFTER_COMPRESS = ("bn_recalibrate", "finetune_lr")


@dataclass(frozen=True)
class Tables:
    """The tables a sweep's methods run and are tuned with, per method name: its own settings (`methods`), its
    lever per axis (`levers`, keyed by the knob its points are budgeted by), its alternative, the rounding the
    speed axis offers and where the speed axis starts. The CNN sweep's are this module's tables (`CNN`); another
    sweep passes its own to `tune` rather than changing them."""

    methods: dict = field(default_factory=lambda: METHODS)
    levers: dict = field(default_factory=lambda: LEVERS)
    alternatives: dict = field(default_factory=lambda: ALTERNATIVES)
    rounding: dict = field(default_factory=lambda: ROUNDING)
    speed_base: dict = field(default_factory=lambda: SPEED_BASE)

    def base(self, name: str, knob: str = "prune_flops") -> dict:
        """A method's own settings on the axis its points are budgeted by."""
        return {**self.methods[name], **(self.speed_base.get(name, {}) if knob == "target_speedup" else {})}

    def candidates(self, name: str, knob: str = "prune_flops") -> list[dict]:
        """The settings a method tries on the validation split before distillation (and, on the speed axis,
        rounding) is offered: as many for every method."""
        own = self.base(name, knob)
        return [own, {**own, **self.alternatives[name]}, {**own, **LOWER_FINETUNE_LR},
                {**own, **self.levers.get(knob, {}).get(name, DEFAULT_LEVER)}]

    def offers(self, name: str, knob: str = "prune_flops") -> list[dict]:
        """What every method is offered on the best of its candidates, in turn: on the speed axis its rounding,
        then distillation; on the FLOPs axis distillation."""
        return [self.rounding[name], DISTILL] if knob == "target_speedup" else [DISTILL]


CNN = Tables()

BUDGET_KEYS = ("target_speedup", "prune_flops", "prune_params")
NO_BUDGET = {"target_speedup": 0.0, "prune_cuts": 0}  # the dense runs: trained, never pruned


def resolved(settings: dict, target: float, knob: str = "prune_flops") -> RunConfig:
    """The whole config a method's point runs with (the help every method gets included): at a FLOPs budget with
    exact ranks exported by FLOPs, or at a speed target with the deployment's settings."""
    axis = EXACT if knob == "prune_flops" else DEPLOYMENT
    return RunConfig(**{**HELP, **axis, **settings, **{k: 0.0 for k in BUDGET_KEYS}, knob: target})


def schedule(cfg: RunConfig) -> str:
    """How a point's method cut: gradually during the compress phase, once after it, or by its own rule (TRP)."""
    if cfg.method == "trp":
        return f"its own: the weights truncated every {cfg.trp_period} steps"
    if cfg.method in ("truncated_svd", "whitened_svd") or not cfg.prune_cuts:
        return "one cut"
    return f"{cfg.prune_cuts} cuts on the cubic schedule"


def say(text: str):
    """A line of the sweep's progress log, timed."""
    print(f"[pareto {time.strftime('%H:%M:%S')}] {text}", flush=True)


def fmt(value, suffix="") -> str:
    """A figure as the logs and the sections print it: two decimals, — for none."""
    return "—" if value is None else f"{value:.2f}{suffix}"


def dense_summary(dense_runs: list[dict]) -> dict:
    """The dense models' record: accuracy over the seeds (mean and sd; `dense_runs` one dict a seed, seed 0 first,
    with its run folder) and seed 0's FLOPs, conv FLOPs and parameters, which every point is measured against."""
    first = Run.open(dense_runs[0]["folder"])
    model, x = first.model_after("train"), first.example_input()
    accuracies = [r["accuracy"] for r in dense_runs]
    return {"accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seeds": dense_runs, "flops": svdtrain.count_flops(model, x), "conv_flops": conv_flops(model, x),
            "params": svdtrain.count_params(model)}


def _copy_run(source: Path, target: Path, stages=("train", "sparsify")):
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    for stage in stages:
        shutil.copytree(source / stage, target / stage, ignore=shutil.ignore_patterns("epoch_*.pt", "tb"))


def _measure(run: Run, args) -> dict:
    """FLOPs, parameters and latency of a run's export against the dense model, timed alternately on ONNX Runtime:
    at the deployment (batch 1, 1 thread; `speedup_b1`) and at the serving setting (batch 32 on the sweep's
    threads; `speedup_b32`), median of the paired ratios with their IQR."""
    small = load_exported(run.folder)
    dense = run.dense_model().eval()
    out = {}
    for batch, n_threads in ((1, 1), (SERVING_BATCH, args.threads)):
        with threads(n_threads):
            times = dense_vs_final(dense, small, run.example_input(batch), args.latency_repeats, "onnxruntime")
        key = "b1" if batch == 1 else "b32"
        out[f"latency_{key}_ms"], out[f"dense_latency_{key}_ms"] = times["final_ms"], times["dense_ms"]
        out[f"speedup_{key}"], out[f"speedup_{key}_iqr"] = times["speedup"], times["speedup_iqr"]
    x = run.example_input()
    out.update(flops=svdtrain.count_flops(small, x), conv_flops=conv_flops(small, x),
               params=svdtrain.count_params(small))
    return out


class Sweep:
    """Runs operating points from the shared dense checkpoint: compress phase, prune, fine-tune (, export)."""

    def __init__(self, args, checkpoint: str, common: dict, dense: dict | None = None):
        self.args, self.checkpoint, self.common, self.dense = args, checkpoint, common, dense
        self.bases = {}  # compress phases run so far: what determines them -> (run, accuracy, wall), or its error

    def compress_phase(self, label: str, settings: dict, target: float, knob: str):
        """The run after its compress phase, shared by every target and setting that cannot change it: the
        targets, unless the method cuts ranks during it (prune_cuts: its schedule depends on the budget),
        and the settings that act after it (AFTER_COMPRESS)."""
        key = json.dumps({k: v for k, v in settings.items() if k not in AFTER_COMPRESS}, sort_keys=True)
        key += f" {knob}={target}" if settings.get("prune_cuts") else ""
        if key not in self.bases:
            say(f"{label}: compress phase ({self.args.compress_epochs} epochs)")
            t0 = time.perf_counter()
            base = Run.create(resolved(settings, target, knob).replace(
                name=f"{label}-base", dense_checkpoint=self.checkpoint, train_epochs=0,
                sparsify_epochs=self.args.compress_epochs, finetune_epochs=self.args.finetune_epochs, **self.common))
            run_stage(base, "train")
            try:
                accuracy = run_stage(base, "sparsify")["accuracy"]
            except TrainingError as e:  # diverged: so would every target sharing it (the runs are deterministic)
                self.bases[key] = e
                raise
            self.bases[key] = (base, accuracy, time.perf_counter() - t0)
        if isinstance(self.bases[key], TrainingError):
            raise self.bases[key]
        return self.bases[key]

    def points(self, label: str, settings: dict, targets: list[float], measure: bool = True,
               knob: str = "prune_flops") -> list[dict]:
        """One record per budget (FLOPs fraction, or speed target): compress phase (shared where it can be), prune,
        fine-tune (, export). A speed target the method cannot reach gets a record with its "unreachable" reason
        and no accuracy; a setting whose training diverges (a non-finite loss) one with its "diverged" reason: the
        sweep goes on, and tuning never picks it."""
        args, records = self.args, []
        work = Path(self.common["out_dir"])
        for target in targets:
            after_compress = {k: getattr(resolved(settings, target, knob), k) for k in AFTER_COMPRESS}
            say(f"{label}: {knob}={target}: prune, fine-tune")
            t0 = time.perf_counter()
            folder = work / f"{label}-{knob}{target}"
            try:
                base, compress_accuracy, shared_wall = self.compress_phase(label, settings, target, knob)
                _copy_run(base.folder, folder)
                point = Run.open(folder, {knob: target, "name": folder.name, **after_compress})
                if knob == "target_speedup" and base.cfg.target_speedup != target:
                    point.preflight()  # a compress phase shared with another target: this one's reach, as the tool's
                point.save_config()
                pruned = run_stage(point, "prune")
                finetuned = run_stage(point, "finetune")
            except (ValueError, TrainingError) as e:
                if knob == "prune_flops" and not isinstance(e, TrainingError):
                    raise
                # a budget out of the method's reach (told before training where it can be), or training that diverged
                reason = "diverged" if isinstance(e, TrainingError) else "unreachable"
                say(f"{label} @ {knob}={target}: {reason}: {e}")
                records.append({"method": label, "knob": knob, "knob_value": target, "settings": settings,
                                "seed": settings.get("seed", 0), reason: str(e)})
                continue
            record = {"method": label, "knob": knob, "knob_value": target, "settings": settings,
                      "accuracy": finetuned["accuracy"], "accuracy_after_prune": pruned["accuracy"],
                      "accuracy_after_prune_before_bn_recalibration": pruned.get("accuracy_before_bn_recalibration"),
                      "accuracy_after_compress": compress_accuracy, "seed": settings.get("seed", 0),
                      "speedup_at_prune": pruned.get("speedup"), "schedule": schedule(point.cfg),
                      "epochs": args.compress_epochs + args.finetune_epochs, "shared_wall_s": shared_wall,
                      "compress_phase": base.folder.name, "folder": str(folder)}
            cuts = base.folder / "sparsify" / "cuts.json"
            if cuts.is_file():  # each gradual cut, with the accuracy right after it when the sweep asks for it
                record["cuts"] = json.loads(cuts.read_text())
            if measure:
                record["accuracy"] = run_stage(point, "export")["accuracy"]
                record.update(_measure(point, args))
                record["flops_reduction"] = self.dense["flops"] / record["flops"]
                record["conv_flops_reduction"] = self.dense["conv_flops"] / record["conv_flops"]
            record["wall_s"] = time.perf_counter() - t0
            records.append(record)
            say(f"{label} @ {knob}={target}: {record['accuracy']:.2f} % (after the cut "
                 f"{record['accuracy_after_prune']:.2f} %)"
                 + (f", {record['conv_flops_reduction']:.2f}× fewer conv FLOPs, deployment {record['speedup_b1']:.2f}× "
                    f"({record['latency_b1_ms']:.3f} ms, dense {record['dense_latency_b1_ms']:.3f}), serving "
                    f"{record['speedup_b32']:.2f}×" if measure else ""))
        return records


def best(tried: list[dict]) -> int:
    """The most accurate setting that reached the budget; a tie keeps the first. One that cannot reach it is never
    picked, and on the speed axis one whose measured speed-up falls short of the target (beyond the tie) only when
    none reaches it: a setting that stays slower would otherwise win by its accuracy alone."""
    return max(range(len(tried)), key=lambda i: (tried[i]["validation_accuracy"] is not None, tried[i]["reached"],
                                                 tried[i]["validation_accuracy"] or 0.0, -i))


def tune(args, checkpoint: str, common: dict, tables: Tables, methods: list[str], knob: str = "prune_flops",
         target: float | None = None) -> dict:
    """Each method's candidates (`tables`), then the best of them with each offer in turn (on the speed axis its
    rounding, then distillation; on the FLOPs axis distillation), at one budget, scored on the validation split."""
    target = args.tune_target if target is None else target
    sweep = Sweep(args, checkpoint, {**common, "val_subset": args.val_subset, "train_subset": args.tune_subset,
                                     "out_dir": str(Path(common["out_dir"]) / f"tuning-{knob}")})
    out = {}
    for name in methods:
        tried = []
        own = tables.candidates(name, knob)
        for settings in [*own, *tables.offers(name, knob)]:
            if len(tried) >= len(own):  # an offer: tried on the best so far
                settings = {**tried[best(tried)]["settings"], **settings}
            (record,) = sweep.points(f"tune-{name}-{len(tried)}", settings, [target], measure=False, knob=knob)
            tried.append({"settings": settings, "validation_accuracy": record.get("accuracy"),
                          "validation_accuracy_after_prune": record.get("accuracy_after_prune"),
                          "wall_s": record.get("wall_s", 0.0) + record.get("shared_wall_s", 0.0),
                          "speedup_at_prune": record.get("speedup_at_prune"),
                          "compress_phase": record.get("compress_phase"),
                          "reached": knob != "target_speedup" or (record.get("speedup_at_prune") or 0.0) * TIE >= target,
                          **{k: record[k] for k in ("unreachable", "diverged") if k in record}})
        picked = best(tried)
        out[name] = {"tried": tried, "picked": tried[picked]["settings"], "settings_tried": len(tried)}
        say(f"tuning {name}: " + ", ".join(fmt(t["validation_accuracy"], " %") for t in tried)
            + f" -> {tried[picked]['settings']}")
    return out


def interpolate(points: list[dict], at: float, key: str = "accuracy", axis: str = "conv_flops_reduction") -> float | None:
    """`key` at `at` along a method's curve of `key` against `axis` (× fewer conv FLOPs, or a measured speed-up),
    linear in log(axis); None outside the curve."""
    curve = sorted((p[axis], p[key]) for p in points)
    for (r0, a0), (r1, a1) in zip(curve, curve[1:]):
        if r0 <= at <= r1:
            w = 0 if r1 == r0 else (math.log(at) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return a0 + w * (a1 - a0)
    return None


SPEEDS = (1.5, 2.0, 2.5, 3.0)  # matched measured speed-ups of the speed table


def _best_filter(values: dict) -> tuple[str | None, float | None]:
    """The filter pruning with the highest of `values` (method -> figure, None where it has none) and its figure:
    the new recipe's bars hold against the better of the two."""
    known = {m: v for m, v in values.items() if m in FILTER_BASELINES and v is not None}
    return max(known.items(), key=lambda kv: kv[1]) if known else (None, None)


def speed_bars(result: dict) -> dict:
    """Accuracy at matched measured speed-up on the deployment (1.5×…3×) and on the serving setting (2×) per
    method (seed 0's curve), the two seeds' points at the seed target, and the new recipe's bars against the
    better of the two filter prunings."""
    speed = result.get("speed")
    if not speed:
        return {}
    dense = speed.get("dense", result["dense"])["accuracy_mean"]
    reached = [p for p in speed["points"] if "accuracy" in p]
    curves = {}
    for p in reached:
        if p["seed"] == 0:
            curves.setdefault(p["method"], []).append(p)
    matched = {f"{r:g}x": {m: interpolate(pts, r, axis="speedup_b1") for m, pts in curves.items()} for r in SPEEDS}
    serving = {"2x": {m: interpolate(pts, 2.0, axis="speedup_b32") for m, pts in curves.items()}}
    targets = {p["method"]: p["knob_value"] for p in reached if p["seed"] == 1}  # kept methods: their own targets
    seeds = {}
    for p in reached:
        if p["knob_value"] == targets.get(p["method"], speed["seed_target"]):
            entry = seeds.setdefault(p["method"], {"target": p["knob_value"]})
            for key in ("accuracy", "speedup_b1", "speedup_b32"):
                entry.setdefault(key, []).append(p[key])
    for entry in seeds.values():
        entry["mean"] = statistics.mean(entry["accuracy"])

    def bar(ours, theirs, margin: float = 0.0) -> bool | None:
        """None when neither curve reaches the speed; a curve of ours that does not reach it fails the bar."""
        if theirs is None:
            return None if ours is None else True
        return ours is not None and ours >= theirs + margin

    new = {}
    if NEW_RECIPE in curves:
        for key, values, margin in (("2x", matched["2x"], 0.3), ("1.5x", matched["1.5x"], 0.0),
                                    ("2.5x", matched["2.5x"], 0.0), ("serving_2x", serving["2x"], 0.0)):
            rival, value = _best_filter(values)
            ours = values.get(NEW_RECIPE)
            new[key] = {"accuracy": ours, "filter_pruning": rival, "filter_pruning_accuracy": value,
                        "at_least_filter" + (f"_plus_{margin}" if margin else ""): bar(ours, value, margin)}
        new["2x"]["within_1_point_of_dense"] = None if new["2x"]["accuracy"] is None else \
            new["2x"]["accuracy"] >= dense - 1.0
        new["reach"] = max(p["speedup_b1"] for p in curves[NEW_RECIPE])
        ours = targets.get(NEW_RECIPE, speed["seed_target"])
        two = {m: e["mean"] for m, e in seeds.items() if len(e["accuracy"]) >= 2 and e["target"] == ours}
        rival, rival_mean = _best_filter(two)
        new["seeds"] = {"target": ours, "mean": two.get(NEW_RECIPE), "filter_pruning": rival, "filter_pruning_mean": rival_mean}
    # Where two curves overlap, both read at the ends of the overlap: a comparison at matched measured speed even
    # when the fixed speed-ups of the table fall outside one of them.
    overlap = {}
    for method, pts in curves.items():
        if method == NEW_RECIPE or NEW_RECIPE not in curves:
            continue
        low = max(min(p["speedup_b1"] for p in pts), min(p["speedup_b1"] for p in curves[NEW_RECIPE]))
        high = min(max(p["speedup_b1"] for p in pts), max(p["speedup_b1"] for p in curves[NEW_RECIPE]))
        if low <= high:
            overlap[method] = {"speedups": [low, high],
                               NEW_RECIPE: [interpolate(curves[NEW_RECIPE], v, axis="speedup_b1") for v in (low, high)],
                               method: [interpolate(pts, v, axis="speedup_b1") for v in (low, high)]}
    return {"matched_speed": matched, "matched_serving": serving, "seeds": seeds, "new_recipe_speed": new,
            "overlap": overlap}


def at_reduction(points: list[dict], r: float, key: str = "accuracy") -> float | None:
    """A curve's `key` at r× fewer conv FLOPs: its point at the budget that stands for r× (a budget is met to within
    2 %, so 3.03× stands for 3×), else interpolated along it."""
    near = [p for p in points if abs(p["conv_flops_reduction"] / r - 1) <= 0.02]
    return min(near, key=lambda p: abs(p["conv_flops_reduction"] - r))[key] if near else interpolate(points, r, key)


def flops_seeds(result: dict) -> dict:
    """Each method run with two compression seeds on the FLOPs axis: its accuracy at 3× and 4× fewer conv FLOPs on
    each seed's curve (at_reduction), and their mean."""
    curves = {}
    for p in result["points"]:
        if "accuracy" in p:  # not diverged
            curves.setdefault(p["method"], {}).setdefault(p.get("seed", 0), []).append(p)
    out = {}
    for method, by_seed in curves.items():
        if len(by_seed) < 2:
            continue
        out[method] = {}
        for r in (3, 4):
            values = [at_reduction(pts, r) for _, pts in sorted(by_seed.items())]
            out[method][f"{r}x"] = {"accuracy": values, "mean": None if None in values else statistics.mean(values)}
    return out


def bars(result: dict) -> dict:
    """The FLOPs axis read at matched conv FLOPs reduction (2×…5×, seed 0's curves, after fine-tuning and right after
    the cut), the new recipe's bars against the dense mean and every baseline, each variant against each baseline,
    the two-seed means (flops_seeds), and the speed axis's bars (speed_bars)."""
    by_method = {}
    for p in result["points"]:
        if p.get("seed", 0) == 0 and "accuracy" in p:  # seed 0's curves (the second seed's in flops_seeds)
            by_method.setdefault(p["method"], []).append(p)
    dense = result["dense"]["accuracy_mean"]
    matched = {f"{r}x": {m: at_reduction(pts, r) for m, pts in by_method.items()} for r in (2, 3, 4, 5)}
    after_prune = {f"{r}x": {m: at_reduction(pts, r, "accuracy_after_prune") for m, pts in by_method.items()}
                   for r in (2, 3, 4, 5)}

    def at_least(method: str, baseline: str, keys=tuple(matched)) -> bool | None:
        pairs = [(matched[k].get(method), matched[k].get(baseline)) for k in keys]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        return all(a >= b for a, b in pairs) if pairs else None

    variants = [m for m in by_method if m not in BASELINES]
    new = {}
    if NEW_RECIPE in by_method:
        at3, before3 = matched["3x"][NEW_RECIPE], after_prune["3x"][NEW_RECIPE]
        new = {"at_least_each_baseline_3x_4x": {b: at_least(NEW_RECIPE, b, ("3x", "4x"))
                                               for b in BASELINES if b in by_method},
               "accuracy_3x": at3, "delta_3x": None if at3 is None else at3 - dense,
               "within_1_point_3x": None if at3 is None else at3 >= dense - 1.0,
               "before_finetune_3x": before3, "before_finetune_3x_at_least_80": None if before3 is None else before3 >= 80}
    seeds = flops_seeds(result)
    if NEW_RECIPE in seeds:
        for key in ("3x", "4x"):
            ours = seeds[NEW_RECIPE][key]["mean"]
            rival, value = _best_filter({m: e[key]["mean"] for m, e in seeds.items()})
            new[f"seeds_{key}"] = {"mean": ours, "filter_pruning": rival, "filter_pruning_mean": value,
                                   "at_least_filter_plus_0.3": None if ours is None or rival is None
                                   else ours >= value + 0.3}
    return {"matched": matched, "matched_after_prune": after_prune, "new_recipe": new, "flops_seeds": seeds,
            "variant_at_least_baseline": {v: {b: at_least(v, b) for b in BASELINES if b in by_method}
                                          for v in variants}, **speed_bars(result)}
