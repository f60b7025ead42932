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
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

import harness
import render
import svdtrain
from harness import CNN, NO_BUDGET, say
from svdtrain.recipes.config import RunConfig
from svdtrain.recipes.data import draw_indices
from svdtrain.recipes.datasets import load_dataset
from svdtrain.recipes.pipeline import run_stage
from svdtrain.recipes.run import Run
from svdtrain.recipes.files import write_section

ROOT = Path(__file__).resolve().parents[1]


def _check_split(args):
    """Refuses a validation split (the last --val-subset training images) that overlaps the images the sweep
    trains on: tuning on it must not see them."""
    labels = load_dataset(args.data).train.labels
    trained, _ = draw_indices(labels, args.train_subset)
    _, validation = draw_indices(labels, 0, args.val_subset)
    if not args.train_subset or set(trained.tolist()) & set(validation.tolist()):
        raise SystemExit(f"the validation split ({args.val_subset} of {len(labels)} training images) must not "
                         f"overlap the sweep's training images ({args.train_subset or len(labels)}); lower "
                         "--val-subset or --train-subset")


def _dense_seeds(args, common: dict, work: Path) -> list[dict]:
    """The dense models, one a seed (trained here, or taken from --dense-from): seed 0's is the shared checkpoint."""
    dense_runs = []
    for seed in range(args.seeds):
        run = _dense(args, RunConfig(name=f"dense-seed{seed}", seed=seed, train_epochs=args.dense_epochs,
                                     **NO_BUDGET, **common), work, f"dense model, seed {seed}")
        result = run.result("train")
        dense_runs.append({"seed": seed, "accuracy": result["accuracy"], "epochs": args.dense_epochs,
                           "wall_s": result["seconds"], "folder": str(run.folder),
                           **({"trained_by": args.dense_from} if args.dense_from else {})})
    return dense_runs


def sweep(args) -> dict:
    """The dense models, the tuning of each axis swept (or an earlier one's), the test points of each axis, and
    what --keep-from keeps: pareto.json's record (pareto_tuning.json's with --tune-only)."""
    if args.tune_subset >= 0:
        _check_split(args)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    common = dict(data=args.data, model=args.model, train_subset=args.train_subset, test_subset=args.test_subset,
                  max_batches=args.max_batches, progress=False, onnx=False, threads=args.threads,
                  latency_repeats=args.latency_repeats, out_dir=str(work))
    started = time.perf_counter()
    dense_runs = _dense_seeds(args, common, work)
    kept_from = _earlier_sweep(args, dense_runs) if args.keep_from else None
    shared = str(Path(dense_runs[0]["folder"]) / "train" / "final.pt")
    dense = harness.dense_summary(dense_runs)

    budget = args.compress_epochs + args.finetune_epochs
    if "flops" in args.axes:  # the plot's reference line
        run = _dense(args, RunConfig(name="dense_longer", dense_checkpoint=shared, train_epochs=budget, **NO_BUDGET,
                                     **common), work,
                     f"dense model trained {budget} more epochs (the same budget as every method)")
        dense["longer"] = {"accuracy": run.result("train")["accuracy"], "epochs": args.dense_epochs + budget,
                           "wall_s": run.result("train")["seconds"]}

    test = harness.Sweep(args, shared, {**common, "cut_eval_images": args.cut_eval_images}, dense)
    t0 = time.perf_counter()
    earlier = _earlier_tuning(args, dense_runs[0]["accuracy"])
    tuning = earlier.get("flops") if earlier else \
        harness.tune(args, shared, common, CNN, args.methods) if args.tune_subset >= 0 and "flops" in args.axes else {}
    tuning_wall = time.perf_counter() - t0
    if args.tune_only:
        speed = harness.tune(args, shared, common, CNN, args.speed_methods, "target_speedup", args.tune_speedup) \
            if "speed" in args.axes else {}
        return {"benchmark": "pareto_tuning", "command": args.command, "model": args.model,
                "dense_accuracy": dense_runs[0]["accuracy"], "flops": tuning, "speed": speed,
                "wall_s": time.perf_counter() - started}
    picked = {name: tuning[name]["picked"] if name in tuning else CNN.base(name) for name in args.methods}
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
        "help": harness.HELP,
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
        say(what)
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
    say(f"{cfg.name}: taken from {found[-1]}")
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
        notes[axis] = {"from": args.keep_from, "command": old.get("command", earlier["command"]), "methods": kept,
                       **({"tuning_target": old["tuning"]["target_speedup"]} if "target_speedup" in old["tuning"] else {})}
    if speed:
        speed.update(methods=[*notes["speed"]["methods"], *args.speed_methods], kept=notes["speed"])
    return notes.get("flops", {})


def seeded(names: list[str], methods: list[str], tuning: dict) -> list[str]:
    """The methods of --seed-methods that this axis runs; `best_filter` names the filter pruning whose picked setting
    scored highest on the validation split (every filter pruning of the axis when nothing was tuned)."""
    def validated(name: str) -> float:
        picked = tuning[name]["picked"]
        return next(t["validation_accuracy"] or 0.0 for t in tuning[name]["tried"] if t["settings"] == picked)

    filters = [m for m in harness.FILTER_BASELINES if m in methods]
    tuned = [m for m in filters if m in tuning]
    best_filter = [max(tuned, key=validated)] if tuned else filters
    named = [m for name in names for m in (best_filter if name == "best_filter" else [name])]
    return [m for i, m in enumerate(named) if m in methods and m not in named[:i]]


def speed_axis(args, checkpoint: str, common: dict, test: harness.Sweep, earlier: dict) -> dict:
    """Every speed method tuned on the validation split at one speed target (or as an `earlier` --tune-only run
    picked), then run at each of --speed-targets, and once more with compression seed 1 (same dense checkpoint) at
    --seed-target."""
    t0 = time.perf_counter()
    methods = args.speed_methods
    tuning = earlier.get("speed") if earlier else \
        harness.tune(args, checkpoint, common, CNN, methods, "target_speedup", args.tune_speedup) \
        if args.tune_subset >= 0 else {}
    # a tuning run of its own: its command, and its wall with its dense model
    tuning_wall, tuned_by = (earlier["wall_s"], earlier["command"]) if earlier else (time.perf_counter() - t0, None)
    picked = {name: tuning[name]["picked"] if name in tuning else CNN.base(name, "target_speedup") for name in methods}
    records = []
    for name in methods:
        unrounded = {k: v for k, v in picked[name].items() if k not in CNN.rounding[name]}
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
            "deployment": harness.DEPLOYMENT, "serving": {"backend": "onnxruntime", "batch": harness.SERVING_BATCH,
                                                          "threads": args.threads},
            "tuning": {"target_speedup": args.tune_speedup, "val_subset": args.val_subset,
                       "train_subset": args.tune_subset, "methods": tuning, "wall_s": tuning_wall,
                       **({"command": tuned_by} if tuned_by else {})},
            "points": records, "wall_s": time.perf_counter() - t0}


def parse(argv=None) -> argparse.Namespace:
    """The command line, its lists split and checked; `command` is the line as RESULTS.md quotes it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--test-subset", type=int, default=0)
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--compress-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--targets", default="0.6,0.4,0.25,0.17", help="FLOPs budgets (fractions of dense)")
    parser.add_argument("--seeds", type=int, default=3, help="dense models trained (noise estimate)")
    parser.add_argument("--methods", default=",".join(harness.DEFAULT_METHODS),
                        help=f"any of {', '.join(harness.METHODS)}")
    parser.add_argument("--val-subset", type=int, default=5000,
                        help="validation split for tuning: the last N training images")
    parser.add_argument("--tune-subset", type=int, default=6000,
                        help="training images of the tuning runs (first N); -1 = no tuning, METHODS as written")
    parser.add_argument("--tune-target", type=float, default=0.25, help="FLOPs budget the settings are tuned at")
    parser.add_argument("--axes", default="flops,speed",
                        help="flops: points at FLOPs budgets (--targets); speed: points at measured speed targets "
                             "(--speed-targets); with one axis, pareto.json keeps the other's results")
    parser.add_argument("--speed-targets", default="1.5,2,2.5,3", help="target_speedup of the speed axis's points")
    parser.add_argument("--speed-methods", default=",".join(harness.SPEED_METHODS))
    parser.add_argument("--seed-methods", default=f"{harness.NEW_RECIPE},best_filter",
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
    unknown = [m for m in args.methods + args.speed_methods if m not in harness.METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; allowed: {', '.join(harness.METHODS)}")
    return args


def main(argv=None):
    """Sweeps (or, with --report-only, takes an earlier pareto.json), then writes pareto.json, pareto.png and the
    model's section of --results; with --tune-only, pareto_tuning.json alone."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    result = json.loads(Path(args.report_only).read_text()) if args.report_only else sweep(args)
    out = Path(args.out)
    if args.tune_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pareto_tuning.json").write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {out / 'pareto_tuning.json'}")
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
    result["bars"] = harness.bars(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")
    render.plot(result, out / "pareto.png")
    png = os.path.relpath(out / "pareto.png", Path(args.results).resolve().parent)
    model = result.get("model", "resnet20")  # each model's sweep has its own section
    write_section(Path(args.results), "pareto" if model == "resnet20" else f"pareto-{model}",
                  render.markdown(result, png))
    say(f"wrote {out / 'pareto.json'}, {out / 'pareto.png'} and the pareto section of {args.results}")
    return result


if __name__ == "__main__":
    main()
