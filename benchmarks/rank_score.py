"""Ablation of rank_score=output on the ViT: do SVD training's cuts do better when each singular value counts by
its share of the layer's output on training images (|s_i|·‖Xᵀv_i‖, as whitened SVD truncates) than by its size?

    python benchmarks/rank_score.py        # after benchmarks/transformer.py; its RESULTS.md section gives its wall time

From the transformer sweep's seed-0 dense ViT (its run folder, named in transformer.json) and with the settings its tuning
picked for svd_gradual (benchmarks/results/transformer.json), the recipe runs with rank_score=size and with
rank_score=output, at 2× and 3× fewer FLOPs, with two compression seeds each, on the sweep's tuning proxy
(6,000 training images for the compress and fine-tuning phases) and scored on its validation split (5,000
training images held out), never on the test set: this decides whether the lever stays.

Writes benchmarks/results/rank_score.json and the "rank_score" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
import transformer

ROOT = Path(__file__).resolve().parents[1]
# size: the paper's cut (the smallest |s_i|); output: the ViT sweep's recipe since this ablation chose it.
VARIANTS = {"size": {"rank_score": "size"}, "output": {"rank_score": "output"}}


def ablation(args) -> dict:
    """Each variant with each compression seed at every target, from the transformer sweep's dense ViT and its
    tuned svd_gradual, scored on the validation split: rank_score.json's record."""
    if not Path(args.sweep).is_file():
        raise SystemExit(f"no {args.sweep}: run benchmarks/transformer.py first")
    sweep = json.loads(Path(args.sweep).read_text())
    checkpoint = Path(sweep["dense"]["seeds"][0]["folder"]) / "train" / "final.pt"
    if not checkpoint.is_file():
        raise SystemExit(f"no dense ViT at {checkpoint} (the sweep's run folders are not committed): run "
                         "benchmarks/transformer.py here first")
    recipe = sweep["tuning"]["methods"]["svd_gradual"]["picked"]
    common = dict(data="fashion_mnist", train_subset=args.tune_subset, val_subset=args.val_subset,
                  max_batches=args.max_batches, progress=False, onnx=False, threads=args.threads,
                  out_dir=str(Path(args.work) / "rank-score"), **transformer.VIT)
    args.compress_epochs, args.finetune_epochs = sweep["compress_epochs"], sweep["finetune_epochs"]
    runner = harness.Sweep(args, str(checkpoint), common)
    started, points = time.perf_counter(), []
    for variant, setting in VARIANTS.items():
        for seed in range(args.seeds):
            label = f"{setting['rank_score']}-seed{seed}"
            for record in runner.points(label, {**recipe, **setting, "seed": seed}, args.targets, measure=False):
                points.append({"variant": variant, "seed": seed, "target": record["knob_value"],
                               "validation_accuracy": record["accuracy"],
                               "after_the_cut": record["accuracy_after_prune"],
                               "wall_s": record["wall_s"] + record["shared_wall_s"]})
    means = {variant: {str(t): statistics.mean(p["validation_accuracy"] for p in points
                                               if p["variant"] == variant and p["target"] == t)
                       for t in args.targets} for variant in VARIANTS}
    return {"benchmark": "rank_score", "command": args.command, "recipe": recipe, "targets": args.targets,
            "seeds": args.seeds, "tune_subset": args.tune_subset, "val_subset": args.val_subset,
            "compress_epochs": args.compress_epochs, "finetune_epochs": args.finetune_epochs,
            "points": points, "means": means, "wall_s": time.perf_counter() - started,
            "torch": torch.__version__}


def markdown(result: dict) -> str:
    """The ablation's section of RESULTS.md from its rank_score.json, with the variants as it names them (the paper's
    cut first)."""
    size, output = result["means"]
    lines = ["## Ablation: which singular values a cut removes, on the ViT (`benchmarks/rank_score.py`)", "",
             f"Command: `{result['command']}` — {result['wall_s'] / 60:.0f} min wall. SVD training with gradual cuts "
             f"as the transformer sweep tuned it ({', '.join(f'{k}={v}' for k, v in result['recipe'].items())}), from "
             f"its seed-0 dense ViT, {result['compress_epochs']} + {result['finetune_epochs']} epochs on "
             f"{result['tune_subset']:,} training images, scored on {result['val_subset']:,} held-out training images "
             "(validation, not the test set); each cut removes the smallest |s_i| (size) or the smallest "
             "|s_i|·‖Xᵀv_i‖ over 2,048 training images (output).", "",
             "| rank_score | FLOPs budget | seed | after the cut (%) | after fine-tuning (%) |", "|---|---:|---:|---:|---:|"]
    for p in result["points"]:
        lines.append(f"| {p['variant']} | {p['target']:.2f} | {p['seed']} | {p['after_the_cut']:.2f} | "
                     f"{p['validation_accuracy']:.2f} |")
    lines += ["", f"| FLOPs budget | {size}: mean (%) | {output}: mean (%) | {output} − {size} |",
              "|---:|---:|---:|---:|"]
    for t in result["targets"]:
        a, b = result["means"][size][str(t)], result["means"][output][str(t)]
        lines.append(f"| {t:.2f} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "transformer"), help="run folders (not committed)")
    parser.add_argument("--sweep", default=str(ROOT / "benchmarks" / "results" / "transformer.json"))
    parser.add_argument("--targets", default="0.5,0.33")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tune-subset", type=int, default=6000)
    parser.add_argument("--val-subset", type=int, default=5000)
    parser.add_argument("--max-batches", type=int, default=0, help="cap on batches per epoch (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rank_score.json"))
    parser.add_argument("--results", default=str(ROOT / "RESULTS.md"))
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/rank_score.py", *(argv if argv is not None else sys.argv[1:])])
    args.targets = [float(t) for t in args.targets.split(",")]
    torch.set_num_threads(args.threads)
    result = ablation(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    from svdtrain.recipes.files import write_section
    write_section(Path(args.results), "rank_score", markdown(result))
    return result


if __name__ == "__main__":
    main()
