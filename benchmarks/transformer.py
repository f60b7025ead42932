"""SVD training on a vision transformer: the tool's `vit` on Fashion-MNIST, against truncated and whitened SVD.

    python benchmarks/transformer.py        # its RESULTS.md section gives its wall time

The CNN sweep's harness (harness.py: the same Sweep, tuning and measurement), on the tool's ViT (4×4 patches,
width 96, 6 blocks of nn.MultiheadAttention, mean pooling; every projection and MLP layer in SVD form, the head
dense). Two dense models (seeds 0, 1); from seed 0's checkpoint every method gets the same `--compress-epochs` +
`--finetune-epochs` and the same help, at each FLOPs budget (`--targets`, fractions of the dense model's FLOPs:
2× and 3× fewer); each method's settings are chosen among five, as on the CNN sweep (its own, one alternative, a
lower fine-tuning lr, its lever: VIT_LEVERS; then the best with distillation), on a validation split cut from the
training images, at `--tune-target`. Methods: SVD training with gradual cuts (svd_gradual), the paper's one-cut
recipe (svd), truncated SVD and whitened SVD (SVD-LLM's truncation-aware whitening), all channel-wise.
`--seed-methods` run every budget once more with compression seed 1 (the same dense checkpoint). Every point's
export is timed against the dense model on ONNX Runtime at batch 1 (1 thread) and batch 32, alternately in one
process.

Writes benchmarks/results/transformer.json and the "transformer" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
import render
import svdtrain
from svdtrain.recipes.config import RunConfig
from svdtrain.recipes.pipeline import run_stage
from svdtrain.recipes.run import Run
from svdtrain.recipes.files import write_section

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("svd_gradual", "svd", "truncated_svd", "whitened_svd")
# The model and what every run of it shares: channel-wise (a Linear has one form; the 4×4 patch convolution's
# spatial-wise matrix would have rank 4 at most), the head dense, no augmentation (a random crop and flip lowered
# a short ViT run's accuracy in a probe), and no batch norm to recalibrate.
VIT = {"model": "vit", "exclude_modules": ("head",), "augment": False}
CHANNEL = {"decomposition": "channel"}
# Each method's lever on the transformer, tried on the validation split within the same budget as every method's
# settings (the CNN levers change the decomposition, and a Linear has one). SVD training's: cuts that remove the
# singular values whose loss changes the layer's output least on training images (the data whitened SVD truncates
# by), not the smallest. Whitened SVD's: four times the whitening images. Truncated SVD has no lever of its own and
# tries a lower fine-tuning lr still (harness.DEFAULT_LEVER).
VIT_LEVERS = {"svd_gradual": {"rank_score": "output"}, "svd": {"rank_score": "output"},
              "whitened_svd": {"whiten_images": 8192}}
# The CNN sweep's methods, every one channel-wise, with the transformer's levers: what its tuning tries.
TABLES = harness.Tables(methods={name: {**settings, **CHANNEL} for name, settings in harness.METHODS.items()},
                        levers={"prune_flops": VIT_LEVERS})


NAMES = {"svd_gradual": "SVD training", "svd": "the one-cut recipe", "truncated_svd": "truncated SVD",
         "whitened_svd": "whitened SVD"}


def sweep(args) -> dict:
    """The dense ViTs (kept from an earlier sweep with --keep-dense), each method's tuning on the validation split
    (TABLES), and its points at every budget from seed 0's checkpoint: transformer.json's record."""
    work = Path(args.work)
    kept = {}  # seed -> a finished dense run of an earlier sweep in `work` (--keep-dense)
    if work.exists():
        for folder in sorted(work.iterdir()):
            if args.keep_dense and folder.name.startswith("dense-seed") and (folder / "train" / "result.json").is_file():
                kept[int(folder.name.removeprefix("dense-seed").split("-")[0])] = folder
            elif folder.is_dir():
                shutil.rmtree(folder)
    common = dict(data="fashion_mnist", train_subset=args.train_subset, max_batches=args.max_batches, progress=False,
                  onnx=False,
                  threads=args.threads, latency_repeats=args.latency_repeats, out_dir=str(work), **VIT)
    started = time.perf_counter()
    dense_runs = []
    for seed in range(args.seeds):
        config = RunConfig(name=f"dense-seed{seed}", seed=seed, train_epochs=args.dense_epochs, **harness.NO_BUDGET,
                           **common)
        # Where the runs are written and how long the sweep times each export do not change a dense model.
        if seed in kept and Run.open(kept[seed]).cfg.replace(out_dir=config.out_dir,
                                                             latency_repeats=config.latency_repeats) == config:
            harness.say(f"dense ViT, seed {seed}: kept from {kept[seed]}")
            trained = json.loads((kept[seed] / "train" / "result.json").read_text())
            dense_runs.append({"seed": seed, "accuracy": trained["accuracy"], "wall_s": trained["seconds"],
                               "folder": str(kept[seed]), "kept": True})
            continue
        harness.say(f"dense ViT, seed {seed}")
        t0 = time.perf_counter()
        run = Run.create(config)
        dense_runs.append({"seed": seed, "accuracy": run_stage(run, "train")["accuracy"],
                           "wall_s": time.perf_counter() - t0, "folder": str(run.folder)})
    checkpoint = str(Path(dense_runs[0]["folder"]) / "train" / "final.pt")
    dense = harness.dense_summary(dense_runs)

    tuning_started = time.perf_counter()
    tuning = harness.tune(args, checkpoint, common, TABLES, list(args.methods), "prune_flops", args.tune_target)
    tuning_wall = time.perf_counter() - tuning_started
    test = harness.Sweep(args, checkpoint, common, dense)
    points = []
    for name in args.methods:
        points += test.points(name, tuning[name]["picked"], args.targets)
    for name in [m for m in args.seed_methods if m in args.methods]:
        points += [{**p, "method": name}
                   for p in test.points(f"{name}-seed1", {**tuning[name]["picked"], "seed": 1}, args.targets)]
    return {"benchmark": "transformer", "command": args.command, "model": "vit", "data": "fashion_mnist",
            "train_subset": args.train_subset, "dense_epochs": args.dense_epochs,
            "compress_epochs": args.compress_epochs, "finetune_epochs": args.finetune_epochs,
            "targets": args.targets, "seed_methods": args.seed_methods, "shared": {**VIT, **CHANNEL},
            "help": harness.HELP, "dense": dense, "points": points,
            "tuning": {"target": args.tune_target, "val_subset": args.val_subset, "train_subset": args.tune_subset,
                       "methods": tuning, "wall_s": tuning_wall},
            "wall_s": time.perf_counter() - started,
            "environment": {"device": f"CPU ({platform.machine()}), {torch.get_num_threads()} threads",
                            "torch": torch.__version__, "svdtrain": svdtrain.__version__}}


def bars(result: dict) -> dict:
    """At 2× and 3× fewer FLOPs: SVD training with gradual cuts against the dense mean (2×: ≤ 1.0 below) and
    against truncated and whitened SVD (≥ each), each method's accuracy the mean over its seeds' points at the
    budget that stands for r× (0.5: 2.00×; 0.33: 3.03×), else interpolated along its seed-0 curve. And its
    export at batch 1: ≥ 1.3× faster than dense at a budget of ≥ 2× fewer FLOPs whose mean is ≤ 1.0 below dense
    (every seed's point that fast)."""
    curves, near = {}, {}
    for p in result["points"]:
        if p["seed"] == 0:
            curves.setdefault(p["method"], []).append(p)
        for r in (2, 3):
            if abs(p["knob_value"] * r - 1) <= 0.02:
                near.setdefault((p["method"], r), []).append(p)

    def at(method: str, r: int) -> float | None:
        if (method, r) in near:
            return statistics.mean(p["accuracy"] for p in near[method, r])
        return harness.interpolate(curves[method], r, axis="flops_reduction")

    matched = {f"{r}x": {m: at(m, r) for m in curves} for r in (2, 3)}
    ours = {k: v.get("svd_gradual") for k, v in matched.items()}
    floor = result["dense"]["accuracy_mean"] - 1.0
    out = {"matched": matched}
    if ours["2x"] is not None:
        out["within_1_point_of_dense_2x"] = ours["2x"] >= floor
    for key, values in matched.items():
        for rival in ("truncated_svd", "whitened_svd"):
            if ours[key] is not None and values.get(rival) is not None:
                out[f"at_least_{rival}_{key}"] = ours[key] >= values[rival]
    exports = []
    for target in result["targets"]:
        seeds = [p for p in result["points"] if p["method"] == "svd_gradual" and p["knob_value"] == target]
        if seeds and min(p["flops_reduction"] for p in seeds) >= 2 * 0.99:
            exports.append({"target": target, "accuracy_mean": statistics.mean(p["accuracy"] for p in seeds),
                            "speedup_b1": [p["speedup_b1"] for p in seeds],
                            "flops_reduction": [p["flops_reduction"] for p in seeds]})
    accurate = [e for e in exports if e["accuracy_mean"] >= floor]
    out["export_b1"] = exports
    out["export_1.3x_b1_within_1_point"] = any(min(e["speedup_b1"]) >= 1.3 for e in accurate)
    return out


def markdown(result: dict) -> str:
    """The sweep's section of RESULTS.md from its transformer.json."""
    d, b = result["dense"], result["bars"]
    lines = [
        "## A vision transformer: " + ", ".join(NAMES[m] for m in dict.fromkeys(p["method"] for p in result["points"]))
        + " (`benchmarks/transformer.py`)", "",
        f"Command: `{result['command']}` — {result['environment']['device']}, torch {result['environment']['torch']}, "
        f"{result['wall_s'] / 60:.0f} min wall.", "",
        f"The tool's `vit` (4×4 patches, width 96, 6 pre-norm blocks of `nn.MultiheadAttention` with 4 heads and a "
        f"192-wide MLP, mean pooling; {d['flops'] / 1e6:.1f} MFLOPs per image) on Fashion-MNIST "
        f"({result['train_subset']} training images, no augmentation, the full test set). Dense: "
        f"{result['dense_epochs']} epochs, seeds " + ", ".join(f"{r['accuracy']:.2f}" for r in d["seeds"])
        + f" % (mean {d['accuracy_mean']:.2f}). Every method starts from seed 0's checkpoint and gets "
        f"{result['compress_epochs']} + {result['finetune_epochs']} epochs; all layers but the head in SVD form "
        "(q, k, v and output projections split out of each attention), channel-wise; ranks exact (no rounding), "
        "export by FLOPs. Settings chosen on a validation split of "
        f"{result['tuning']['val_subset']} training images at {result['tuning']['target']} of the FLOPs.", "",
        "| method | seed | FLOPs budget | × fewer FLOPs | after the cut (%) | after fine-tuning (%) | ONNX Runtime b1 "
        "(1 thread), IQR | b32 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        low, high = p["speedup_b1_iqr"]
        lines.append(f"| {p['method']} | {p['seed']} | {p['knob_value']:.2f} | {p['flops_reduction']:.2f}× | "
                     f"{p['accuracy_after_prune']:.2f} | {p['accuracy']:.2f} | {p['speedup_b1']:.2f}× "
                     f"({p['latency_b1_ms']:.3f} vs {p['dense_latency_b1_ms']:.3f} ms; {low:.2f}–{high:.2f}) | "
                     f"{p['speedup_b32']:.2f}× |")
    lines += ["", "Accuracy at 2× and 3× fewer FLOPs (the mean of the seeds' points at the budgets 0.5 and 0.33, "
              "else interpolated along each seed-0 curve):", "",
              "| method | 2× | 3× |", "|---|---:|---:|"]
    for method in dict.fromkeys(p["method"] for p in result["points"]):
        lines.append(f"| {method} | {harness.fmt(b['matched']['2x'].get(method))} | "
                     f"{harness.fmt(b['matched']['3x'].get(method))} |")
    lines += ["", "Settings tried on the validation split:", "", *render.tuning_rows(result["tuning"]["methods"]),
              "", "Bars:"]
    if "within_1_point_of_dense_2x" in b:
        lines.append(f"- svd_gradual at 2× ≥ dense mean − 1.0: **{'met' if b['within_1_point_of_dense_2x'] else 'not met'}**")
    for key in sorted(k for k in b if k.startswith("at_least_")):
        lines.append(f"- svd_gradual {key.replace('_', ' ')}: **{'met' if b[key] else 'not met'}**")
    exports = "; ".join(f"{e['target']:g} of the FLOPs: mean {e['accuracy_mean']:.2f} %, "
                        + " / ".join(f"{v:.2f}×" for v in e["speedup_b1"]) for e in b["export_b1"])
    lines.append(f"- svd_gradual's export ≥ 1.3× at batch 1 (1 thread) at a budget of ≥ 2× fewer FLOPs whose mean is "
                 f"≤ 1.0 below dense, every seed: **{'met' if b['export_1.3x_b1_within_1_point'] else 'not met'}** "
                 f"({exports})")
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--compress-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--targets", default="0.5,0.33", help="FLOPs budgets (fractions of dense)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed-methods", default="svd_gradual,whitened_svd",
                        help="methods run once more at every budget with compression seed 1")
    parser.add_argument("--val-subset", type=int, default=5000)
    parser.add_argument("--tune-subset", type=int, default=6000)
    parser.add_argument("--tune-target", type=float, default=0.5)
    parser.add_argument("--max-batches", type=int, default=0, help="cap on batches per epoch (smoke test)")
    parser.add_argument("--latency-repeats", type=int, default=100,
                        help="timed calls of each model per point (a batch-1 call takes under a millisecond)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "transformer"), help="run folders (not committed)")
    parser.add_argument("--keep-dense", action="store_true",
                        help="reuse the dense runs an earlier sweep left in --work when their config is this one's")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transformer.json"))
    parser.add_argument("--results", default=str(ROOT / "RESULTS.md"))
    parser.add_argument("--section", default="transformer",
                        help="the section of --results it writes (a sweep of some methods beside the full one)")
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/transformer.py", *(argv if argv is not None else sys.argv[1:])])
    args.targets = [float(t) for t in args.targets.split(",")]
    args.methods = args.methods.split(",")
    args.seed_methods = [m for m in args.seed_methods.split(",") if m]
    torch.set_num_threads(args.threads)
    result = sweep(args)
    result["bars"] = bars(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    write_section(Path(args.results), args.section, markdown(result))
    return result


if __name__ == "__main__":
    main()
