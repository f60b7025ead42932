"""SVD training against the methods it claims to beat (METHOD.md §6): accuracy vs FLOPs, one harness.

    python benchmarks/pareto.py                      # both axes
    python benchmarks/pareto.py --axes speed         # the speed axis alone (pareto.json keeps the FLOPs axis)

Every method starts from one shared dense checkpoint (Fashion-MNIST, CIFAR ResNet-20)
and gets the same budget after it: `--compress-epochs` of its own training phase
(SVD training: sparsify; TRP: training with periodic truncation and the nuclear
norm; truncated SVD and filter pruning have none and fine-tune instead) plus
`--finetune-epochs` of fine-tuning, with the same optimizer settings. The
compress phase of a method is run once and shared by its operating points (except
for methods that cut ranks during it: their schedule depends on the budget) and by
settings that differ only after it (fine-tuning lr, batch-norm recalibration); each
point is then pruned to a FLOPs budget (`--targets`, fractions of the dense
model), its batch-norm statistics are re-estimated (every method gets this help)
and it is fine-tuned. The dense model is trained with `--seeds` seeds so the
noise is visible; seed 0's checkpoint is the shared one.

SVD training and both filter prunings cut gradually (8 cuts on the cubic schedule during the compress phase);
one-shot filter pruning is a setting its tuning tries. Before the test sweep, each method tries five settings
at one budget on a validation split cut from the training images (the same tuning budget for every method:
four of its own, the fourth its lever (LEVERS), then the best of them with distillation from the dense model)
and keeps the best one. SVD training and the filter pruning that validation ranks first (`--seed-methods`) run again
with a second compression seed at every budget. A lever is decided on the validation split only: the test set gives
each point's figure once, after every choice is made.

The speed axis (`--axes speed`) runs points at measured speed targets (`target_speedup`, the tool's deployment
settings: ONNX Runtime at batch 1 on 1 thread) for SVD training, truncated SVD (spatial-wise) and both filter
prunings, tuned the same way at one target with a sixth setting (the rounding of ranks or channel counts), plus a
second compression seed at one target. Every point of either axis is timed against the dense model on ONNX Runtime
at the deployment and at batch 32; the gradual methods' test points log the accuracy right after each cut.
`--tune-only` stops after the tuning (pareto_tuning.json), `--tuning-from` runs the test sweep from its picks,
`--dense-from` takes the dense models of an earlier sweep (so that both axes, run as separate commands, start from
one checkpoint). `--model mobilenetv2` sweeps the second architecture; its section goes to RESULTS.md beside
ResNet-20's.

Writes pareto.json (one record per point), pareto.png, and the "pareto" section
of RESULTS.md (tables, the plot, the bars, and the commands).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import svdtrain
from svdtrain.export import TIE
from svdtrain.latency import threads
from svdtrain.recipes.config import RunConfig
from svdtrain.recipes.data import draw_indices, load_dataset
from svdtrain.recipes.pipeline import Run, load_exported, run_stage
from svdtrain.recipes.report import conv_flops, dense_vs_final, write_section
from svdtrain.recipes.train import TrainingError

ROOT = Path(__file__).resolve().parents[1]

# The settings of each method. λ_s for Hoyer is the quick recipe's; L1's is the top of the paper's
# L1 range (0.1…0.3) as Hoyer's 0.1 is the top of its range; Hoyer-square's gradient is about
# 2·‖s‖₁/‖s‖₂ ≈ 8 times Hoyer's here, so it gets 0.1 / 8 ≈ 0.01. TRP uses its code's settings
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
MODEL_NAMES = {"resnet20": "CIFAR ResNet-20", "mobilenetv2": "MobileNetV2 (half width)"}  # as the sections name them
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
ROUNDING = {"svd_gradual": {"rank_multiple": 8}, "truncated_svd": {"rank_multiple": 8}, "whitened_svd": {"rank_multiple": 8},
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
# multiples of 16 only (no rank below the multiple where measured faster); at matched FLOPs, channel-wise layers.
# Truncated SVD: the other decomposition (on the speed axis it starts spatial-wise, as channel-wise pairs reach no
# speed target). Filter pruning: one cut (at its best fine-tuning lr of the earlier sweeps) instead of gradual
# cuts. Group sparsity learning: a third strength, above the two its earlier tunings tried.
LEVERS = {
    "prune_flops": {"svd_gradual": {"decomposition": "channel"}, "truncated_svd": {"decomposition": "spatial"},
                    "filter_pruning": {"prune_cuts": 0, "finetune_lr": 1e-3}, "group_sl": {"group_sl_reg": 2e-3},
                    "trp": {"trp_period": 10}, "whitened_svd": {"whiten_images": 8192},
                    "svd": {"decomposition": "spatial"}, "svd_spatial": {"decomposition": "channel"}},
    "target_speedup": {"svd_gradual": {"rank_multiple": 16}, "truncated_svd": {"decomposition": "channel"},
                       "filter_pruning": {"prune_cuts": 0, "finetune_lr": 1e-3}, "group_sl": {"group_sl_reg": 2e-3}},
}
DEFAULT_LEVER = {"finetune_lr": 3e-5}  # a method with no lever of its own: a lower fine-tuning lr still
# On the speed axis truncated SVD starts spatial-wise: its channel-wise pairs reach no speed target here.
SPEED_BASE = {"truncated_svd": {"decomposition": "spatial"}}
# Distillation from the dense model (the shared checkpoint) during the compress phase and fine-tuning,
# offered to every method as a fourth setting: the best of its three with it. Kept where validation
# says it helps, as any other setting (it can hurt: the dense model's softened logits compete with the
# labels).
DISTILL = {"distill": 0.5}
# Settings that act only after the compress phase (prune stage, fine-tuning): runs that differ only in
# them share one compress phase.
AFTER_COMPRESS = ("bn_recalibrate", "finetune_lr")


def base(name: str, knob: str = "prune_flops") -> dict:
    """A method's own settings on the axis its points are budgeted by."""
    return {**METHODS[name], **(SPEED_BASE.get(name, {}) if knob == "target_speedup" else {})}


def candidates(name: str, knob: str = "prune_flops") -> list[dict]:
    """The settings a method tries on the validation split before distillation (and, on the speed axis,
    rounding) is offered: as many for every method."""
    own = base(name, knob)
    return [own, {**own, **ALTERNATIVES[name]}, {**own, **LOWER_FINETUNE_LR},
            {**own, **LEVERS.get(knob, {}).get(name, DEFAULT_LEVER)}]


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


def _say(text: str):
    print(f"[pareto {time.strftime('%H:%M:%S')}] {text}", flush=True)


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
            _say(f"{label}: compress phase ({self.args.compress_epochs} epochs)")
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
            _say(f"{label}: {knob}={target}: prune, fine-tune")
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
                _say(f"{label} @ {knob}={target}: {reason}: {e}")
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
            _say(f"{label} @ {knob}={target}: {record['accuracy']:.2f} % (after the cut "
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


def tune(args, checkpoint: str, common: dict, methods: list[str], knob: str = "prune_flops",
         target: float | None = None) -> dict:
    """Each method's candidates, then the best of them with each offer in turn (on the speed axis its rounding,
    then distillation; on the FLOPs axis distillation), at one budget, scored on the validation split."""
    target = args.tune_target if target is None else target
    sweep = Sweep(args, checkpoint, {**common, "val_subset": args.val_subset, "train_subset": args.tune_subset,
                                     "out_dir": str(Path(common["out_dir"]) / f"tuning-{knob}")})
    out = {}
    for name in methods:
        tried = []

        offers = [ROUNDING[name], DISTILL] if knob == "target_speedup" else [DISTILL]
        own = candidates(name, knob)
        for settings in [*own, *offers]:
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
        _say(f"tuning {name}: " + ", ".join(_fmt(t["validation_accuracy"], " %") for t in tried)
             + f" -> {tried[picked]['settings']}")
    return out


def sweep(args) -> dict:
    if args.tune_subset >= 0:
        labels = load_dataset(args.data).train.labels
        trained, _ = draw_indices(labels, args.train_subset)
        _, validation = draw_indices(labels, 0, args.val_subset)
        if not args.train_subset or set(trained.tolist()) & set(validation.tolist()):
            raise SystemExit(f"the validation split ({args.val_subset} of {len(labels)} training images) must not "
                             f"overlap the sweep's training images ({args.train_subset or len(labels)}); lower "
                             "--val-subset or --train-subset")
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    common = dict(data=args.data, model=args.model, train_subset=args.train_subset, test_subset=args.test_subset,
                  max_batches=args.max_batches, progress=False, onnx=False, threads=args.threads,
                  latency_repeats=args.latency_repeats, out_dir=str(work))
    started = time.perf_counter()

    dense_runs = []
    for seed in range(args.seeds):
        run = _dense(args, RunConfig(name=f"dense-seed{seed}", seed=seed, train_epochs=args.dense_epochs,
                                     **NO_BUDGET, **common), work, f"dense model, seed {seed}")
        result = run.result("train")
        dense_runs.append({"seed": seed, "accuracy": result["accuracy"], "epochs": args.dense_epochs,
                           "wall_s": result["seconds"], "folder": str(run.folder),
                           **({"trained_by": args.dense_from} if args.dense_from else {})})
    kept_from = _earlier_sweep(args, dense_runs) if args.keep_from else None
    shared = str(Path(dense_runs[0]["folder"]) / "train" / "final.pt")
    x = Run.open(dense_runs[0]["folder"]).example_input()
    dense_model = Run.open(dense_runs[0]["folder"]).model_after("train")
    dense = {"accuracy_mean": statistics.mean(r["accuracy"] for r in dense_runs),
             "accuracy_std": statistics.stdev(r["accuracy"] for r in dense_runs) if len(dense_runs) > 1 else 0.0,
             "seeds": dense_runs, "flops": svdtrain.count_flops(dense_model, x),
             "conv_flops": conv_flops(dense_model, x), "params": svdtrain.count_params(dense_model)}

    budget = args.compress_epochs + args.finetune_epochs
    if "flops" in args.axes:  # the plot's reference line
        run = _dense(args, RunConfig(name="dense_longer", dense_checkpoint=shared, train_epochs=budget, **NO_BUDGET,
                                     **common), work,
                     f"dense model trained {budget} more epochs (the same budget as every method)")
        dense["longer"] = {"accuracy": run.result("train")["accuracy"], "epochs": args.dense_epochs + budget,
                           "wall_s": run.result("train")["seconds"]}

    test = Sweep(args, shared, {**common, "cut_eval_images": args.cut_eval_images}, dense)
    t0 = time.perf_counter()
    earlier = _earlier_tuning(args, dense_runs[0]["accuracy"])
    tuning = earlier.get("flops") if earlier else \
        tune(args, shared, common, args.methods) if args.tune_subset >= 0 and "flops" in args.axes else {}
    tuning_wall = time.perf_counter() - t0
    if args.tune_only:
        speed = tune(args, shared, common, args.speed_methods, "target_speedup", args.tune_speedup) \
            if "speed" in args.axes else {}
        return {"benchmark": "pareto_tuning", "command": args.command, "model": args.model,
                "dense_accuracy": dense_runs[0]["accuracy"], "flops": tuning, "speed": speed,
                "wall_s": time.perf_counter() - started}
    picked = {name: tuning[name]["picked"] if name in tuning else base(name) for name in args.methods}
    records = []
    if "flops" in args.axes:
        for name in args.methods:
            records += test.points(name, picked[name], args.targets)
        for name in seeded(args.seed_methods, args.methods, tuning):
            for record in test.points(f"{name}-seed1", {**picked[name], "seed": 1}, args.targets):
                records.append({**record, "method": name})
    speed = speed_axis(args, shared, common, test, earlier) if "speed" in args.axes else None
    kept = _kept(args, kept_from, tuning, records, speed) if kept_from else {}

    return {
        "benchmark": "pareto",
        "axes": args.axes,
        "command": args.command,
        "data": args.data, "model": args.model, "train_subset": args.train_subset, "test_subset": args.test_subset,
        "dense_epochs": args.dense_epochs, "compress_epochs": args.compress_epochs,
        "finetune_epochs": args.finetune_epochs, "targets": args.targets, "max_batches": args.max_batches,
        "optimizer": {"name": "adam", "lr": RunConfig().lr, "finetune_lr": RunConfig().finetune_lr,
                      "batch_size": RunConfig().batch_size, "schedule": RunConfig().schedule},
        "help": HELP,
        "tuning": {"target": args.tune_target, "val_subset": args.val_subset, "train_subset": args.tune_subset,
                   "methods": tuning, "wall_s": tuning_wall},
        "dense": dense, "points": records,
        **({"speed": speed} if speed else {}),
        **({"kept": kept} if kept else {}),
        "wall_s": time.perf_counter() - started,
        "environment": {"device": f"CPU ({platform.machine()}), {torch.get_num_threads()} threads",
                        "torch": torch.__version__, "svdtrain": svdtrain.__version__,
                        "python": platform.python_version()},
    }


# What may differ between a dense run of an earlier sweep and the one this sweep would train: where it lives and how it
# was run, nothing that changes the model.
RUN_ONLY = ("out_dir", "threads", "latency_repeats", "progress", "workers")


def _dense(args, cfg: RunConfig, work: Path, what: str) -> Run:
    """A dense run of the sweep, trained: taken from --dense-from where that folder has it, else trained here."""
    run = _earlier_dense(args.dense_from, cfg, work) if args.dense_from else None
    if run is None:
        _say(what)
        run = Run.create(cfg)
        run_stage(run, "train")
    return run


def _earlier_dense(folder: str, cfg: RunConfig, work: Path) -> Run | None:
    """The dense run `cfg.name` (a seed's, or the one trained on for the plot's reference line) from an earlier
    sweep's work folder (--dense-from), copied into this sweep's: the same checkpoint for every axis swept as its
    own command. None when that folder has none; refused unless it was trained as this sweep would train it (from
    the same checkpoint, which this sweep holds as a copy)."""
    found = sorted(Path(folder).glob(f"{cfg.name}-*"))
    if not found:
        return None
    earlier = Run.open(found[-1])
    there = cfg.replace(dense_checkpoint=cfg.dense_checkpoint.replace(str(work), folder, 1))
    differ = [k for k, v in vars(there).items() if k not in RUN_ONLY and getattr(earlier.cfg, k) != v]
    if differ:
        raise SystemExit(f"--dense-from {folder}: {found[-1].name} was trained with other settings ("
                         + ", ".join(f"{k}={getattr(earlier.cfg, k)!r}, here {getattr(cfg, k)!r}" for k in differ)
                         + "); drop --dense-from to train it here")
    earlier.result("train")  # finished
    shutil.copytree(found[-1], work / found[-1].name, ignore=shutil.ignore_patterns("epoch_*.pt", "tb"))
    _say(f"{cfg.name}: taken from {found[-1]}")
    return Run.open(work / found[-1].name)


def _earlier_tuning(args, dense_accuracy: float) -> dict:
    """The tuning a `--tune-only` run wrote (--tuning-from), checked to come from the same dense model: the runs are
    deterministic on a CPU, so the seed-0 dense model trained again must score the same."""
    if not args.tuning_from:
        return {}
    earlier = json.loads(Path(args.tuning_from).read_text())
    if earlier.get("model") != args.model or earlier.get("dense_accuracy") != dense_accuracy:
        raise SystemExit(f"{args.tuning_from} was tuned on {earlier.get('model')} with a dense model at "
                         f"{earlier.get('dense_accuracy')} %; this sweep's is {args.model} at {dense_accuracy} %: "
                         "tune again (drop --tuning-from)")
    return earlier


def _earlier_sweep(args, dense_runs: list[dict]) -> dict:
    """--keep-from's pareto.json, checked before any compression runs: each axis swept here must have been swept
    there on the same model and dense models (deterministic on a CPU: the same dense model scores the same)."""
    earlier = json.loads(Path(args.keep_from).read_text())
    for axis in args.axes:
        old = earlier if axis == "flops" else earlier.get("speed", {})
        old_dense = [s["accuracy"] for s in old.get("dense", earlier["dense"])["seeds"]]
        if earlier.get("model") != args.model or old_dense != [r["accuracy"] for r in dense_runs]:
            raise SystemExit(f"--keep-from {args.keep_from}: its {axis} axis was swept on {earlier.get('model')} "
                             f"with dense models at {old_dense} %, this sweep's are {args.model} at "
                             f"{[r['accuracy'] for r in dense_runs]} %")
    return earlier


def _kept(args, earlier: dict, tuning: dict, records: list[dict], speed: dict | None) -> dict:
    """On each swept axis, the methods this sweep did not run get their tuning and points from the `earlier` sweep
    (--keep-from), so that a change to some methods re-runs only those. In place (the speed axis's note in
    `speed`); returns the FLOPs axis's note."""
    axes = {"flops": (earlier, args.methods, tuning, records)} if "flops" in args.axes else {}
    if speed:
        axes["speed"] = (earlier["speed"], args.speed_methods, speed["tuning"]["methods"], speed["points"])
    notes = {}
    for axis, (old, ran, axis_tuning, axis_records) in axes.items():
        kept = [m for m in dict.fromkeys(p["method"] for p in old["points"]) if m not in ran]
        axis_tuning.update({m: old["tuning"]["methods"][m] for m in kept if m in old["tuning"]["methods"]})
        axis_records += [p for p in old["points"] if p["method"] in kept]
        notes[axis] = {"from": args.keep_from, "command": old.get("command", earlier["command"]), "methods": kept}
    if speed:
        speed.update(methods=[*notes["speed"]["methods"], *args.speed_methods], kept=notes["speed"])
    return notes.get("flops", {})


def seeded(names: list[str], methods: list[str], tuning: dict) -> list[str]:
    """The methods of --seed-methods that this axis runs; `best_filter` names the filter pruning whose picked setting
    scored highest on the validation split (every filter pruning of the axis when nothing was tuned)."""
    def validated(name: str) -> float:
        picked = tuning[name]["picked"]
        return next(t["validation_accuracy"] or 0.0 for t in tuning[name]["tried"] if t["settings"] == picked)

    filters = [m for m in FILTER_BASELINES if m in methods]
    tuned = [m for m in filters if m in tuning]
    best_filter = [max(tuned, key=validated)] if tuned else filters
    named = [m for name in names for m in (best_filter if name == "best_filter" else [name])]
    return [m for i, m in enumerate(named) if m in methods and m not in named[:i]]


def speed_axis(args, checkpoint: str, common: dict, test: "Sweep", earlier: dict) -> dict:
    """Every speed method tuned on the validation split at one speed target (or as an `earlier` --tune-only run
    picked), then run at each of --speed-targets, and once more with compression seed 1 (same dense checkpoint) at
    --seed-target."""
    t0 = time.perf_counter()
    methods = args.speed_methods
    tuning = earlier.get("speed") if earlier else \
        tune(args, checkpoint, common, methods, "target_speedup", args.tune_speedup) if args.tune_subset >= 0 else {}
    # a tuning run of its own: its command, and its wall with its dense model
    tuning_wall, tuned_by = (earlier["wall_s"], earlier["command"]) if earlier else (time.perf_counter() - t0, None)
    picked = {name: tuning[name]["picked"] if name in tuning else base(name, "target_speedup") for name in methods}
    records = []
    for name in methods:
        unrounded = {k: v for k, v in picked[name].items() if k not in ROUNDING[name]}
        for record in test.points(name, picked[name], args.speed_targets, knob="target_speedup"):
            # Rounding was chosen at the tuning target, where it reached; at a target it cannot reach, the same
            # setting without it (every method alike: a coarser grid of sizes may stop short of a faster model).
            if "unreachable" in record and unrounded != picked[name]:
                (record,) = test.points(f"{name}-unrounded", unrounded, [record["knob_value"]], knob="target_speedup")
                record = {**record, "method": name, "unrounded": True}
            records.append(record)
    for name in seeded(args.seed_methods, methods, tuning):
        for record in test.points(f"{name}-seed1", {**picked[name], "seed": 1}, [args.seed_target],
                                  knob="target_speedup"):
            records.append({**record, "method": name})
    return {"methods": methods, "targets": args.speed_targets, "seed_target": args.seed_target,
            "deployment": DEPLOYMENT, "serving": {"backend": "onnxruntime", "batch": SERVING_BATCH,
                                                  "threads": args.threads},
            "tuning": {"target_speedup": args.tune_speedup, "val_subset": args.val_subset,
                       "train_subset": args.tune_subset, "methods": tuning, "wall_s": tuning_wall,
                       **({"command": tuned_by} if tuned_by else {})},
            "points": records, "wall_s": time.perf_counter() - t0}


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
    seeds = {}
    for p in reached:
        if p["knob_value"] == speed["seed_target"]:
            entry = seeds.setdefault(p["method"], {"accuracy": [], "speedup_b1": [], "speedup_b32": []})
            for key in entry:
                entry[key].append(p[key])
    for entry in seeds.values():
        entry["mean"] = statistics.mean(entry["accuracy"])

    def best_filter(values: dict) -> tuple[str | None, float | None]:
        known = {m: v for m, v in values.items() if m in FILTER_BASELINES and v is not None}
        return max(known.items(), key=lambda kv: kv[1]) if known else (None, None)

    def bar(ours, theirs, margin: float = 0.0) -> bool | None:
        """None when neither curve reaches the speed; a curve of ours that does not reach it fails the bar."""
        if theirs is None:
            return None if ours is None else True
        return ours is not None and ours >= theirs + margin

    new = {}
    if NEW_RECIPE in curves:
        for key, values, margin in (("2x", matched["2x"], 0.3), ("1.5x", matched["1.5x"], 0.0),
                                    ("2.5x", matched["2.5x"], 0.0), ("serving_2x", serving["2x"], 0.0)):
            rival, value = best_filter(values)
            ours = values.get(NEW_RECIPE)
            new[key] = {"accuracy": ours, "filter_pruning": rival, "filter_pruning_accuracy": value,
                        "at_least_filter" + (f"_plus_{margin}" if margin else ""): bar(ours, value, margin)}
        new["2x"]["within_1_point_of_dense"] = None if new["2x"]["accuracy"] is None else \
            new["2x"]["accuracy"] >= dense - 1.0
        new["reach"] = max(p["speedup_b1"] for p in curves[NEW_RECIPE])
        two_seeds = {m: e["mean"] for m, e in seeds.items() if len(e["accuracy"]) >= 2}
        rival, rival_mean = best_filter(two_seeds)
        new["seeds"] = {"target": speed["seed_target"], "mean": two_seeds.get(NEW_RECIPE), "filter_pruning": rival,
                        "filter_pruning_mean": rival_mean}
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
            rivals = {m: e[key]["mean"] for m, e in seeds.items()
                      if m in FILTER_BASELINES and e[key]["mean"] is not None}
            rival = max(rivals, key=rivals.get) if rivals else None
            new[f"seeds_{key}"] = {"mean": ours, "filter_pruning": rival, "filter_pruning_mean": rivals.get(rival),
                                   "at_least_filter_plus_0.3": None if ours is None or rival is None
                                   else ours >= rivals[rival] + 0.3}
    return {"matched": matched, "matched_after_prune": after_prune, "new_recipe": new, "flops_seeds": seeds,
            "variant_at_least_baseline": {v: {b: at_least(v, b) for b in BASELINES if b in by_method}
                                          for v in variants}, **speed_bars(result)}


def _panel(ax, dense: dict, points: list[dict], axis: str, xlabel: str, title: str):
    ax.axhspan(dense["accuracy_mean"] - dense["accuracy_std"], dense["accuracy_mean"] + dense["accuracy_std"],
               color="0.85")
    ax.axhline(dense["accuracy_mean"], color="0.4", lw=1, label=f"dense ({len(dense['seeds'])} seeds, ±1 sd)")
    if "longer" in dense:
        ax.axhline(dense["longer"]["accuracy"], color="0.4", lw=1, ls=":", label="dense, same extra epochs")
    styles = {NEW_RECIPE: ("C0", "o-", 2.2)}
    order = list(dict.fromkeys((*METHODS, *(p["method"] for p in points))))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p[axis], p["accuracy"]) for p in points if p["method"] == method)
        color, style, width = styles.get(method, (f"C{order.index(method) % 9 + 1}",
                                                  "s--" if method in BASELINES else ".-", 1.2))
        ax.plot(*zip(*pts), style, color=color, lw=width, ms=4, label=method)
    ax.set_xscale("log")
    ax.set_xticks([1.5, 2, 3, 4, 6])
    ax.set_xticklabels(["1.5×", "2×", "3×", "4×", "6×"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = result.get("speed")
    panels = [p for p in (result["points"] and "flops", speed and "speed") if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "flops":
            _panel(ax, result["dense"], [p for p in result["points"] if p.get("seed", 0) == 0 and "accuracy" in p],
                   "conv_flops_reduction",
                   "conv FLOPs reduction (× fewer than dense)",
                   f"{_model_name(result)} on {result['data']}: accuracy vs FLOPs, "
                   "same budget for every method")
        else:
            reached = [p for p in speed["points"] if "accuracy" in p and p["seed"] == 0]
            _panel(ax, speed.get("dense", result["dense"]), reached, "speedup_b1",
                   "measured speed-up over dense (ONNX Runtime, batch 1, 1 thread)",
                   "accuracy vs measured speed at the deployment")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _model_name(result: dict) -> str:
    model = result.get("model", "resnet20")  # sweeps before --model swept ResNet-20
    return MODEL_NAMES.get(model, model)


def _fmt(value, suffix="") -> str:
    return "—" if value is None else f"{value:.2f}{suffix}"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "method") or "its defaults"


def _tuning_rows(methods: dict) -> list[str]:
    speed = any(t.get("speedup_at_prune") for m in methods.values() for t in m["tried"])
    lines = ["| method | setting tried | validation accuracy (%) | after the cut (%) | "
             + ("speed-up reached | " if speed else "") + "picked |",
             "|---|---|---:|---:|" + ("---:|" if speed else "") + ":---:|"]
    for name, m in methods.items():
        for tried in m["tried"]:
            accuracy = tried["validation_accuracy"]
            reached = tried.get("speedup_at_prune")
            lines.append(f"| {name} | {_settings_text(tried['settings'])} | "
                         + (("diverged" if "diverged" in tried else "unreachable") if accuracy is None
                            else f"{accuracy:.2f}") + " | "
                         f"{_fmt(tried['validation_accuracy_after_prune'])} | "
                         + ((f"{reached:.2f}×" if reached else "—") + " | " if speed else "")
                         + f"{'yes' if tried['settings'] == m['picked'] else ''} |")
    return lines


def _budget_line(methods: dict) -> str:
    """The tuning budget each method had: validation settings tried (levers included)."""
    counts = {name: m.get("settings_tried", len(m["tried"])) for name, m in methods.items()}
    same = "the same for every method" if len(set(counts.values())) == 1 else "**not the same for every method**"
    return ("Tuning budget (validation settings tried, levers included; " + same + "): "
            + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".")


def markdown(result: dict, png: str) -> str:
    lines = ["## Accuracy vs FLOPs and vs measured speed: SVD training and the baselines"
             + ("" if result.get("model", "resnet20") == "resnet20" else f" on {_model_name(result)}")
             + " (`benchmarks/pareto.py`)",
             "", f"![pareto]({png})", ""]
    if result["points"]:
        lines += _flops_markdown(result)
    if result.get("speed"):
        lines += _speed_markdown(result)
    return "\n".join(lines)


def _kept_line(kept: dict | None) -> list[str]:
    if not kept or not kept["methods"]:
        return []
    return [f"{', '.join(kept['methods'])}: tuning and points kept from an earlier sweep of the same dense models "
            f"(`--keep-from`), `{kept['command']}`."]


def _flops_markdown(result: dict) -> list[str]:
    d, b, t = result["dense"], result["bars"], result["tuning"]
    seeds = ", ".join(f"{r['accuracy']:.2f}" for r in d["seeds"])
    help_text = ", ".join(f"{k}={v}" for k, v in result["help"].items())
    lines = [
        "### At matched FLOPs",
        "",
        f"Command: `{result['command']}` — {result['environment']['device']}, torch "
        f"{result['environment']['torch']}, {result['wall_s'] / 60:.0f} min wall.",
        *_kept_line(result.get("kept")),
        "",
        f"Setting: {_model_name(result)} on {result['data']} ({result['train_subset'] or 'all'} training images, "
        f"full test set unless a subset is named: test_subset={result['test_subset']}), Adam lr "
        f"{result['optimizer']['lr']} (fine-tuning {result['optimizer']['finetune_lr']}), batch "
        f"{result['optimizer']['batch_size']}, {result['optimizer']['schedule']} schedule per phase. Dense model: "
        f"{result['dense_epochs']} epochs. Every method then gets {result['compress_epochs']} + "
        f"{result['finetune_epochs']} epochs from the same dense checkpoint (seed 0), and the same help "
        f"({help_text}: batch-norm statistics re-estimated on 2,048 training images right after the structural "
        f"change, before fine-tuning); operating points are FLOPs budgets {', '.join(map(str, result['targets']))} "
        "of the dense model. `svd` is the paper's recipe (one rank cut after sparsify); "
        "`svd_gradual` cuts the ranks toward the budget 8 times during sparsify on a cubic schedule "
        "(`prune_cuts=8`), so the network adapts while its ranks fall.",
        "",
        f"Dense accuracy over {len(d['seeds'])} seeds: {seeds} → mean {d['accuracy_mean']:.2f} %, sd "
        f"{d['accuracy_std']:.2f}. The seed-0 dense model trained {result['compress_epochs'] + result['finetune_epochs']}"
        f" more epochs (the budget every method gets): {d['longer']['accuracy']:.2f} %.",
        "",
    ]
    if t["methods"]:
        lines += [
            f"Settings chosen on a validation split, never on the test set: {t['val_subset']:,} training "
            f"images held out, each class its share (disjoint from the {result['train_subset']:,} the sweep "
            f"trains on: `draw_indices`), with the compress and fine-tuning phases on {t['train_subset']:,} training "
            f"images (a cheaper proxy of the same schedule) at FLOPs budget {t['target']}. Every method tries the "
            f"same number of settings (its own, one alternative of its own, fine-tuning at lr "
            f"{LOWER_FINETUNE_LR['finetune_lr']:g}, and, in sweeps since the gradual filter prunings, the lever that "
            "matters most to it; then the best of these with distillation from the dense "
            f"model, distill={DISTILL['distill']} at temperature {RunConfig().distill_temperature:g}, during its "
            "compress phase and fine-tuning); the highest validation accuracy is kept "
            f"({t['wall_s'] / 60:.0f} min):",
            "",
            _budget_line(t["methods"]),
            "",
            *_tuning_rows(t["methods"]),
            "",
        ]
    on_ort = "speedup_b1_iqr" in result["points"][0]  # sweeps before the speed axis timed on PyTorch eager
    lines += [
        "Each point's export is timed against the dense model, alternately in one process: "
        + ("on ONNX Runtime at the deployment (batch 1, 1 thread) and at the serving setting (batch 32, the "
           "sweep's threads)." if on_ort else "on PyTorch eager at batch 1 and 32 on the sweep's threads."),
        "",
        "| method | seed | FLOPs budget | accuracy (%) | Δ vs dense mean | after the cut, before fine-tuning (%) | "
        "conv FLOPs reduction | total FLOPs reduction | params | "
        + ("deployment | serving" if on_ort else "eager b1 | eager b32") + " | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        if "accuracy" not in p:
            lines.append(f"| {p['method']} | {p.get('seed', 0)} | {p['knob_value']} | diverged: {p['diverged'][:160]} |"
                         + " |" * 8)
            continue
        lines.append(
            f"| {p['method']} | {p.get('seed', 0)} | {p['knob_value']} | {p['accuracy']:.2f} | "
            f"{p['accuracy'] - d['accuracy_mean']:+.2f} | "
            f"{p['accuracy_after_prune']:.2f} | {p['conv_flops_reduction']:.2f}× | {p['flops_reduction']:.2f}× | "
            f"{p['params']:,} | {_latency(p, 'b1')} | {_latency(p, 'b32')} | {p['wall_s'] + p['shared_wall_s']:.0f} |")
    methods = list(dict.fromkeys(p["method"] for p in result["points"]))
    lines += ["", "(wall: the point's own stages plus its compress phase, which the one-cut methods share between "
              "their budgets.)", "",
              "Accuracy (%) at matched conv FLOPs reduction (seed 0's curves: the point at the budget standing for it, "
              "within the budget's 2 %, else interpolated linearly in log FLOPs; — = outside the curve), after "
              "fine-tuning and, in brackets, right after the cut:", "",
              "| reduction | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for key, row in b["matched"].items():
        before = b["matched_after_prune"][key]
        lines.append(f"| {key} | " + " | ".join("—" if row.get(m) is None else f"{row[m]:.2f} ({before[m]:.1f})"
                                                for m in methods) + " |")
    n = b["new_recipe"]
    if n:
        lines += [
            "",
            f"Bars (the new recipe, `{NEW_RECIPE}`):",
            "- ≥ every baseline at 3× and 4× fewer conv FLOPs: "
            + ", ".join(f"{m}: {_yes(ok)}" for m, ok in n["at_least_each_baseline_3x_4x"].items()),
            f"- at 3×: ≤ 1.0 point below the dense mean: {_fmt(n['accuracy_3x'], ' %')} (Δ "
            + ("—" if n["delta_3x"] is None else f"{n['delta_3x']:+.2f}") + "): "
            + ("**met**" if n["within_1_point_3x"] else "**not met**"),
            f"- at 3×, before fine-tuning (after the last cut and batch-norm recalibration) ≥ 80 %: "
            f"{_fmt(n['before_finetune_3x'], ' %')}: " + ("**met**" if n["before_finetune_3x_at_least_80"] else "**not met**"),
        ]
        for key in ("3x", "4x"):
            e = n.get(f"seeds_{key}")
            if e:
                lines.append(f"- at {key.replace('x', '×')}, mean of two compression seeds ≥ the better filter "
                             f"pruning + 0.3: {_fmt(e['mean'], ' %')} against {e['filter_pruning'] or '—'} "
                             f"{_fmt(e['filter_pruning_mean'], ' %')}: " + _met(e["at_least_filter_plus_0.3"]))
    if b.get("flops_seeds"):
        lines += ["", "Two compression seeds (same dense checkpoint), each seed's curve read at matched conv FLOPs "
                  "reduction (its point at the budget standing for it, within the budget's 2 %, else interpolated):",
                  ""]
        for m, e in b["flops_seeds"].items():
            lines.append(f"- {m}: " + "; ".join(
                f"{key.replace('x', '×')}: " + ", ".join(_fmt(a) for a in v["accuracy"])
                + f" → mean {_fmt(v['mean'], ' %')}"
                for key, v in e.items()))
    cut_budget = min(result["targets"], key=lambda t: abs(t - 0.25))
    lines += _cut_rows([p for p in result["points"] if p.get("seed", 0) == 0 and p["knob_value"] == cut_budget],
                       f"seed 0 at FLOPs budget {cut_budget:g}")
    lines += [
        "",
        "Every SVD-training variant against each baseline (≥ at every matched reduction both curves reach):",
        "",
        "| variant | " + " | ".join(BASELINES) + " |",
        "|---|" + ":---:|" * len(BASELINES),
        *[f"| {v} | " + " | ".join({True: "yes", False: "no", None: "—"}[row.get(x)] for x in BASELINES) + " |"
          for v, row in b["variant_at_least_baseline"].items()],
        "",
    ]
    return lines


def _latency(p: dict, key: str) -> str:
    """'1.52× (0.41 vs 0.62 ms)': the point's speed-up over dense and both medians."""
    if f"speedup_{key}" not in p:  # sweeps before the speed axis kept the two medians only
        return f"{p[f'latency_{key}_ms']:.2f} ms (dense {p[f'dense_latency_{key}_ms']:.2f})"
    return f"{p[f'speedup_{key}']:.2f}× ({p[f'latency_{key}_ms']:.2f} vs {p[f'dense_latency_{key}_ms']:.2f} ms)"


def _cut_rows(points, where: str) -> list[str]:
    """The accuracy right after each gradual cut, per method (test images, before fine-tuning): where they part."""
    curves = {p["method"]: {round(c["progress"], 3): c["accuracy"] for c in p["cuts"]}
              for p in points if any("accuracy" in c for c in p.get("cuts", []))}
    if not curves:
        return []
    steps = sorted({k for curve in curves.values() for k in curve})
    recalibrated = any("accuracy_before_bn_recalibration" in c for p in points for c in p.get("cuts", []))
    return ["", f"Accuracy (%) right after each gradual cut ({where}; during the compress phase, on test images "
            "drawn across classes" + (", with batch-norm statistics re-estimated on a copy as the prune stage does"
                                      if recalibrated else ", with the batch-norm statistics training had then")
            + "; — = that cut found nothing to remove):", "",
            "| stage progress | " + " | ".join(curves) + " |", "|---|" + "---:|" * len(curves),
            *[f"| {k:.0%} | " + " | ".join(_fmt(c.get(k)) for c in curves.values()) + " |" for k in steps]]


def _yes(ok) -> str:
    return "—" if ok is None else "yes" if ok else "**no**"


def _met(ok) -> str:
    return "—" if ok is None else "**met**" if ok else "**not met**"


def _speed_markdown(result: dict) -> list[str]:
    speed, b = result["speed"], result["bars"]
    d, t = speed.get("dense", result["dense"]), speed["tuning"]
    seeds = ", ".join(f"{r['accuracy']:.2f}" for r in d["seeds"])
    serving = speed["serving"]
    lines = [
        "### At matched measured speed",
        "",
        f"Command: `{speed.get('command', result['command'])}` — "
        f"{speed.get('environment', result['environment'])['device']}, {speed['wall_s'] / 60:.0f} min wall.",
        *_kept_line(speed.get("kept")),
        "",
        f"The same setting and epochs as at matched FLOPs, from this run's own dense checkpoint (dense accuracy over "
        f"{len(d['seeds'])} seeds: {seeds} → mean {d['accuracy_mean']:.2f} %, sd {d['accuracy_std']:.2f}). Points "
        f"are speed targets (`target_speedup` {', '.join(f'{v:g}' for v in speed['targets'])}) on the deployment, "
        "ONNX Runtime at batch 1 on 1 thread, with the tool's deployment settings (ranks in the multiples the "
        "backend runs well, each layer in the form measured faster there): SVD methods cut their ranks toward the "
        "latency the target implies, predicted from per-layer times measured there (scaled at each cut to the whole "
        "model as measured before it), and the prune stage measures "
        "the whole model and cuts further while it falls short; filter pruning searches its channel ratio on the "
        "measured speed-up. Every export is then timed against the dense model, alternately in one process, at the "
        f"deployment and at the serving setting ({serving['backend']}, batch {serving['batch']}, "
        f"{serving['threads']} threads).",
        "",
    ]
    if t["methods"]:
        lines += [
            f"Settings chosen on the validation split ({t['val_subset']:,} training images held out; "
            f"{t['train_subset']:,} training images) at target_speedup {t['target_speedup']:g}: each method's own "
            "settings, then the best of them with the rounding its structure allows (ranks in multiples of 8, or "
            "channel counts in multiples of 8: Torch-Pruning's round_to), then the best so far with distillation "
            f"({t['wall_s'] / 60:.0f} min). A target the picked setting cannot reach with its rounding is run with "
            "the same setting without it, for every method. A setting that fell short of the target (beyond the "
            "3 % tie of timing noise) wins only if none reached it."
            + (f" The tuning ran as its own command, `{t['command']}` ({t['wall_s'] / 60:.0f} min with its dense "
               "model, the same seed-0 checkpoint as here), and this sweep took its picks." if t.get("command") else ""),
            "",
            _budget_line(t["methods"]),
            "",
            *_tuning_rows(t["methods"]),
            "",
        ]
    lines += ["| method | seed | target | accuracy (%) | after the cut (%) | conv FLOPs reduction | deployment "
              "(IQR) | serving | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in speed["points"]:
        if "accuracy" not in p:
            reason = "diverged" if "diverged" in p else "unreachable"
            lines.append(f"| {p['method']} | {p['seed']} | {p['knob_value']:g}× | {reason}: "
                         f"{p[reason][:160]} | | | | | |")
            continue
        low, high = p["speedup_b1_iqr"]
        rounding = " (without its rounding)" if p.get("unrounded") else ""
        lines.append(f"| {p['method']}{rounding} | {p['seed']} | {p['knob_value']:g}× | {p['accuracy']:.2f} | "
                     f"{p['accuracy_after_prune']:.2f} | {p['conv_flops_reduction']:.2f}× | "
                     f"{_latency(p, 'b1')} ({low:.2f}–{high:.2f}) | {_latency(p, 'b32')} | "
                     f"{p['wall_s'] + p['shared_wall_s']:.0f} |")
    methods = [m for m in speed["methods"] if any(m in row for row in b["matched_speed"].values())]
    lines += ["", "Accuracy (%) interpolated at matched measured speed-up on the deployment (seed 0's curve, linear "
              "in log speed-up; — = outside the curve), and at 2× on the serving setting:", "",
              "| speed-up | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for key, row in b["matched_speed"].items():
        lines.append(f"| {key} | " + " | ".join(_fmt(row.get(m)) for m in methods) + " |")
    lines.append("| serving 2x | " + " | ".join(_fmt(b["matched_serving"]["2x"].get(m)) for m in methods) + " |")
    if b.get("overlap"):
        lines += ["", f"Where `{NEW_RECIPE}`'s curve and another's overlap, both read at the ends of the overlap "
                  "(seed 0, deployment):", ""]
        for method, o in b["overlap"].items():
            (low, high), ours, theirs = o["speedups"], o[NEW_RECIPE], o[method]
            lines.append(f"- against {method}, {low:.2f}×–{high:.2f}×: {ours[0]:.2f} vs {theirs[0]:.2f} % at "
                         f"{low:.2f}×, {ours[1]:.2f} vs {theirs[1]:.2f} % at {high:.2f}×")
    if b["seeds"]:
        lines += ["", f"Two compression seeds (same dense checkpoint) at target {speed['seed_target']:g}×:", ""]
        for m, e in b["seeds"].items():
            lines.append(f"- {m}: " + ", ".join(f"{a:.2f} % at {v:.2f}×" for a, v in zip(e["accuracy"], e["speedup_b1"]))
                         + f" → mean {e['mean']:.2f} %")
    lines += _cut_rows([p for p in speed["points"] if p["seed"] == 0 and p["knob_value"] == speed["seed_target"]],
                       "seed 0 at the seed target")
    n = b["new_recipe_speed"]
    if n:
        two, seeds_bar = n["2x"], n["seeds"]
        lines += ["", f"Bars (`{NEW_RECIPE}` against the better filter pruning at each speed; its curve reaches "
                  f"{n['reach']:.2f}× at most):",
                  f"- at 2× (matched, seed 0's curves): {_fmt(two['accuracy'], ' %')} against "
                  f"{two['filter_pruning'] or '—'} {_fmt(two['filter_pruning_accuracy'], ' %')}, bar ≥ +0.3: "
                  + _met(two["at_least_filter_plus_0.3"]) + "; ≥ dense mean − 1.0 "
                  f"({d['accuracy_mean'] - 1:.2f} %): " + _met(two["within_1_point_of_dense"]),
                  f"- two compression seeds at target {seeds_bar['target']:g}× (not matched speed: each method's "
                  f"measured speed-ups are listed above): {_fmt(seeds_bar['mean'], ' %')} against "
                  f"{seeds_bar['filter_pruning'] or '—'} {_fmt(seeds_bar['filter_pruning_mean'], ' %')}"]
        for other in ("1.5x", "2.5x", "serving_2x"):
            e = n[other]
            lines.append(f"- {other.replace('_', ' ')}: {_fmt(e['accuracy'], ' %')} against {e['filter_pruning'] or '—'} "
                         f"{_fmt(e['filter_pruning_accuracy'], ' %')}: " + _met(e["at_least_filter"]))
    lines.append("")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--test-subset", type=int, default=0)
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--compress-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--targets", default="0.6,0.4,0.25,0.17", help="FLOPs budgets (fractions of dense)")
    parser.add_argument("--seeds", type=int, default=3, help="dense models trained (noise estimate)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--val-subset", type=int, default=5000,
                        help="validation split for tuning: the last N training images")
    parser.add_argument("--tune-subset", type=int, default=6000,
                        help="training images of the tuning runs (first N); -1 = no tuning, METHODS as written")
    parser.add_argument("--tune-target", type=float, default=0.25, help="FLOPs budget the settings are tuned at")
    parser.add_argument("--axes", default="flops,speed",
                        help="flops: points at FLOPs budgets (--targets); speed: points at measured speed targets "
                             "(--speed-targets); with one axis, pareto.json keeps the other's results")
    parser.add_argument("--speed-targets", default="1.5,2,2.5,3", help="target_speedup of the speed axis's points")
    parser.add_argument("--speed-methods", default=",".join(SPEED_METHODS))
    parser.add_argument("--seed-methods", default=f"{NEW_RECIPE},best_filter",
                        help="methods run with a second compression seed at every --targets budget and at "
                             "--seed-target; best_filter: the filter pruning validation ranks first")
    parser.add_argument("--seed-target", type=float, default=2.0)
    parser.add_argument("--tune-speedup", type=float, default=2.0, help="speed target the speed axis is tuned at")
    parser.add_argument("--max-batches", type=int, default=0, help="cap on batches per epoch (smoke test)")
    parser.add_argument("--cut-eval-images", type=int, default=2000,
                        help="test points: the accuracy right after each gradual cut on this many test images")
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "pareto"), help="run folders (not committed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--results", default=str(ROOT / "RESULTS.md"), help="Markdown file that gets the section")
    parser.add_argument("--model", default="resnet20", help="the network every method compresses (the tool's MODELS)")
    parser.add_argument("--tune-only", action="store_true",
                        help="stop after the dense models and the tuning of --axes: write pareto_tuning.json to --out")
    parser.add_argument("--dense-from", metavar="WORK",
                        help="an earlier sweep's --work folder: its dense runs (trained with the same settings) are "
                             "copied instead of trained again")
    parser.add_argument("--tuning-from", metavar="TUNING_JSON",
                        help="settings as a --tune-only run picked them (same model and dense checkpoint) instead of "
                             "tuning again")
    parser.add_argument("--keep-from", metavar="PARETO_JSON",
                        help="an earlier pareto.json of the same model and dense models: the methods this sweep does "
                             "not run keep their tuning and points from it (re-run only the methods a change touched)")
    parser.add_argument("--report-only", metavar="PARETO_JSON",
                        help="no sweep: recompute the bars, plot and section from an earlier pareto.json")
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/pareto.py", *(argv if argv is not None else sys.argv[1:])])
    args.targets = [float(t) for t in args.targets.split(",")]
    args.methods = args.methods.split(",")
    args.axes = args.axes.split(",")
    args.speed_targets = [float(t) for t in args.speed_targets.split(",")]
    args.speed_methods = args.speed_methods.split(",")
    args.seed_methods = args.seed_methods.split(",")
    if not set(args.axes) <= {"flops", "speed"} or not args.axes:
        parser.error(f"--axes {','.join(args.axes)}; allowed: flops, speed, or both")
    unknown = [m for m in args.methods + args.speed_methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)

    result = json.loads(Path(args.report_only).read_text()) if args.report_only else sweep(args)
    out = Path(args.out)
    if args.tune_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pareto_tuning.json").write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {out / 'pareto_tuning.json'}")
        return result
    earlier = out / "pareto.json"
    # one axis swept: the other's results stay, each axis with its own dense models, tuning and command
    kept = json.loads(earlier.read_text()) if not args.report_only and len(args.axes) == 1 and earlier.is_file() else {}
    if kept and args.axes == ["speed"]:
        result = {**kept, "speed": {**result["speed"], "dense": result["dense"], "command": result["command"],
                                    "wall_s": result["wall_s"], "environment": result["environment"]}}
    elif "speed" in kept:
        result["speed"] = kept["speed"]
    elif not args.report_only and "speed" in args.axes:
        result["speed"].update(dense=result["dense"], command=result["command"], environment=result["environment"])
    result["bars"] = bars(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "pareto.png")
    png = os.path.relpath(out / "pareto.png", Path(args.results).resolve().parent)
    model = result.get("model", "resnet20")  # each model's sweep has its own section
    write_section(Path(args.results), "pareto" if model == "resnet20" else f"pareto-{model}", markdown(result, png))
    _say(f"wrote {out / 'pareto.json'}, {out / 'pareto.png'} and the pareto section of {args.results}")
    return result


if __name__ == "__main__":
    main()
