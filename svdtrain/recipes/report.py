"""The report of a run: report.json, report.md, PNG plots, measured latency."""

from __future__ import annotations

import csv
import json
import platform
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import svdtrain
from svdtrain.latency import check_backend, paired_speedup, runner, threads, timings

from .files import write_atomic
from .run import load_exported


def conv_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of the convolutions alone (METHOD.md reports conv layers; BN and FC excluded)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)))


def dense_vs_final(dense: nn.Module, small: nn.Module, example: torch.Tensor, repeats: int, backend: str) -> dict:
    """{dense_ms, final_ms, speedup, speedup_iqr}: the two models timed alternately on `backend` at `example`,
    `repeats` times each (medians); the speed-up is the median of the paired ratios (`paired_speedup`)."""
    ms = timings({"dense": runner(dense, example, backend), "final": runner(small, example, backend)}, repeats,
                 warmup=3)
    return {"dense_ms": statistics.median(ms["dense"]), "final_ms": statistics.median(ms["final"]),
            **paired_speedup(ms["dense"], ms["final"])}


def gpu_latency(dense: nn.Module, small: nn.Module, run, repeats: int, batches=(1, 256)) -> dict:
    """Dense vs final on the GPU at each batch size: median ms per forward, synchronised."""
    return {str(batch): dense_vs_final(dense, small, run.example_input(batch), repeats, "cuda") for batch in batches}


def deployment_latency(dense: nn.Module, small: nn.Module, run) -> dict:
    """Dense vs final where the export will run: export_backend at export_batch on export_threads (eager when
    that backend's extras are missing, with a note)."""
    cfg, backend = run.cfg, run.cfg.export_backend
    try:
        check_backend(backend)
    except ValueError as e:
        run.echo(f"latency on the deployment backend not measured: {e}; measured on eager instead")
        backend = "eager"
    with threads(cfg.export_threads if backend != "cuda" else 0):
        timed = dense_vs_final(dense, small, run.example_input(cfg.export_batch), cfg.latency_repeats, backend)
        used = torch.get_num_threads()
    return {"backend": backend, "batch": cfg.export_batch, "threads": used, **timed}


def latency_table(dense: nn.Module, small: nn.Module, run) -> dict:
    """{backend: {batch: dense_ms, final_ms, speedup}}: dense vs final alternated, on each of latency_backends
    at each of latency_batches, on the run's threads. A backend whose extras are missing is skipped with a note;
    the GPU has its own figures (gpu_latency)."""
    cfg, out = run.cfg, {}
    for backend in cfg.latency_backends:
        try:
            check_backend(backend)
        except ValueError as e:
            run.echo(f"latency on {backend} not measured: {e}")
            continue
        out[backend] = {str(batch): dense_vs_final(dense, small, run.example_input(batch), cfg.latency_repeats,
                                                   backend) for batch in cfg.latency_batches}
    return out


def _history(run) -> list[dict]:
    rows = []
    for stage in ("train", "sparsify", "finetune"):
        path = run.stage_dir(stage) / "log.csv"
        if path.is_file():
            with path.open() as f:
                rows += [{k: (v if k == "stage" else float(v)) for k, v in row.items() if v != ""}
                         for row in csv.DictReader(f)]
    return rows


def write_report(run) -> dict:
    cfg = run.cfg
    example = run.example_input()
    dense = run.dense_model().eval()
    small = load_exported(run.folder, run)
    exported = run.result("export")
    train = run.result("train")
    deployment = deployment_latency(dense, small, run)
    table = latency_table(dense, small, run)
    report = {
        "dense": {
            "accuracy": train["accuracy"] if train["form"] == "dense" else None,
            "flops": svdtrain.count_flops(dense, example),
            "conv_flops": conv_flops(dense, example),
            "params": svdtrain.count_params(dense),
        },
        "final": {
            "accuracy": exported["accuracy"],
            "flops": exported["flops"],
            "conv_flops": conv_flops(small, example),
            "params": exported["params"],
            "latency_ms": deployment["final_ms"],  # where the export will run (export_backend, _batch, _threads)
            "dense_latency_ms": deployment["dense_ms"],
            "latency_backend": deployment["backend"],
            "latency_batch": deployment["batch"],
            "latency_threads": deployment["threads"],
            "latency": table,  # every one of latency_backends at each of latency_batches, on the run's threads
        },
        "data": {key: value for key, value in run.data_summary.items() if key != "line"},
        "stages": {stage: run.result(stage) for stage in ("train", "sparsify", "prune", "finetune")},
        "layers": exported["layers"],
        "config": cfg.to_dict(),
        "environment": {"torch": torch.__version__, "svdtrain": svdtrain.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "threads": torch.get_num_threads(),
                        **({"gpu": torch.cuda.get_device_name()} if run.cluster.device.type == "cuda" else {})},
    }
    final, base = report["final"], report["dense"]
    final["flops_reduction"] = base["flops"] / final["flops"]
    final["conv_flops_reduction"] = base["conv_flops"] / max(final["conv_flops"], 1)
    final["speedup"] = deployment["speedup"]
    if run.cluster.device.type == "cuda":
        final["gpu_latency"] = gpu_latency(dense, small, run, cfg.latency_repeats)
    report["plots"] = _plots(run, report)
    # report/ is built beside the old one and swapped in on success; run_stage then publishes its files at the
    # top of the run folder (REPORT_FILES)
    write_atomic(run.stage_dir("report") / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(run.stage_dir("report") / "report.md", _markdown(report))
    run.echo(_headline(report))
    run.finish("report", {"form": "report", "headline": _headline(report)})
    return report


def _headline(report: dict) -> str:
    d, f = report["dense"], report["final"]
    acc = f"{f['accuracy']:.2f} %" + (f" (dense {d['accuracy']:.2f} %)" if d["accuracy"] is not None else "")
    if report["config"]["val_subset"]:
        acc += f" on {report['config']['val_subset']} held-out training images"
    gpu = "".join(f"; GPU batch {b}: {g['final_ms']:.2f} vs {g['dense_ms']:.2f} ms ({g['speedup']:.2f}×)"
                  for b, g in f.get("gpu_latency", {}).items())
    where = f["latency_backend"] + (", the deployment" if f["latency_backend"] == report["config"]["export_backend"]
                                    else "")
    table = f.get("latency", {})
    batches = " / ".join(map(str, report["config"]["latency_batches"]))
    speedups = ", ".join(f"{backend} " + " / ".join(f"{g['speedup']:.2f}×" for g in by_batch.values())
                       for backend, by_batch in table.items())
    return (f"final: accuracy {acc}, {f['flops_reduction']:.2f}× fewer FLOPs, {d['params'] / f['params']:.2f}× fewer "
            f"params, latency {f['latency_ms']:.2f} ms vs dense {f['dense_latency_ms']:.2f} ms "
            f"({f['speedup']:.2f}× on {where}: batch {f['latency_batch']}, {_threads(f['latency_threads'])}"
            + (f"; target {report['config']['target_speedup']:g}×" if report["config"].get("target_speedup") else "")
            + f"){gpu}"
            + (f"\n  speed-up over dense at batch {batches}, {_threads(report['environment']['threads'])}: {speedups}"
               if speedups else ""))


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _markdown(report: dict) -> str:
    d, f, cfg = report["dense"], report["final"], report["config"]

    def acc(value):
        return "—" if value is None else f"{value:.2f} %"

    lines = [
        f"# svdtrain run `{cfg['name']}`",
        "",
        f"{cfg['model']} on {cfg['data']}, {cfg['decomposition']}-wise, sparsity {cfg['sparsity']} "
        f"(λ_s = {cfg['lambda_s']}, λ_o = {cfg['lambda_o']}), epochs train/sparsify/finetune "
        f"{cfg['train_epochs']}/{cfg['sparsify_epochs']}/{cfg['finetune_epochs']}.",
        "",
        f"Data: {report['data']['name']}, {report['data']['classes']} classes; trained on "
        f"{report['data']['train_images']:,} of {report['data']['of_train_images']:,} training images (subsets are "
        f"drawn across classes, each its share), evaluated on {report['data']['eval_images']:,} "
        f"{'held-out training' if report['data']['eval_split'] == 'validation' else 'test'} images.",
        "",
        f"| | accuracy | FLOPs | conv FLOPs | params | latency ({f['latency_backend']}, batch {f['latency_batch']}, "
        f"{_threads(f['latency_threads'])}) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense | {acc(d['accuracy'])} | {d['flops']:,} | {d['conv_flops']:,} | {d['params']:,} | "
        f"{f['dense_latency_ms']:.3f} ms |",
        f"| final | {acc(f['accuracy'])} | {f['flops']:,} | {f['conv_flops']:,} | {f['params']:,} | "
        f"{f['latency_ms']:.3f} ms |",
        f"| ratio | | {f['flops_reduction']:.2f}× fewer | {f['conv_flops_reduction']:.2f}× fewer | "
        f"{d['params'] / f['params']:.2f}× fewer | {f['speedup']:.2f}× faster |",
        "",
        *[f"On the GPU at batch {b}: {g['final_ms']:.3f} ms vs dense {g['dense_ms']:.3f} ms, "
          f"{g['speedup']:.2f}× faster." for b, g in f.get("gpu_latency", {}).items()],
        "",
        f"## Latency (median ms per forward on {_threads(report['environment']['threads'])}, dense vs final "
        f"alternated; the export targeted `{cfg['export_backend']}` at batch {cfg['export_batch']} on "
        f"{_threads(cfg['export_threads']) if cfg['export_threads'] else 'all threads'} with strategy "
        f"`{cfg['export_strategy']}`)",
        "",
        "| backend | batch | dense | final | speed-up |",
        "|---|---:|---:|---:|---:|",
        *[f"| {backend} | {b} | {g['dense_ms']:.3f} ms | {g['final_ms']:.3f} ms | {g['speedup']:.2f}× |"
          for backend, by_batch in f.get("latency", {}).items() for b, g in by_batch.items()],
        "",
        "## Stages",
        "",
        f"| stage | {'validation' if cfg['val_subset'] else 'test'} accuracy |",
        "|---|---:|",
        *[f"| {name} | {acc(s.get('accuracy'))} |" for name, s in report["stages"].items()],
        "",
        "## Layers",
        "",
        "| layer | rank | full rank | exported as |",
        "|---|---:|---:|---|",
        *[f"| {row['name']} | {row['rank']} | {row['full_rank']} | {row['form']} |" for row in report["layers"]],
        "",
    ]
    plots = report["plots"]
    if isinstance(plots, dict):
        lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    else:
        lines += [f"Plots: {plots}", ""]
    return "\n".join(lines)


def _plots(run, report: dict) -> dict | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: pip install 'svdtrain[tool]' for matplotlib"
    folder = run.stage_dir("report")
    paths = {}

    if (run.stage_dir("sparsify") / "spectra_after.json").is_file():
        paths["spectra"] = _spectra_plot(run, report, plt)
    if report["layers"]:
        fig, ax = plt.subplots(figsize=(7, 0.22 * len(report["layers"]) + 1))
        labels = [row["name"] for row in report["layers"]]
        ax.barh(labels, [row["full_rank"] for row in report["layers"]], color="0.8", label="full rank")
        ax.barh(labels, [row["rank"] for row in report["layers"]], color="C0", label="kept")
        ax.invert_yaxis()
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=7)
        ax.set_title("rank per layer", fontsize=8)
        fig.tight_layout()
        paths["ranks"] = _save(fig, folder / "ranks.png", plt)

    history = _history(run)
    if history:
        fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
        for i, stage in enumerate(dict.fromkeys(r["stage"] for r in history)):
            xs = [j + 1 for j, r in enumerate(history) if r["stage"] == stage]
            ys = [r for r in history if r["stage"] == stage]
            left.plot(xs, [r["test_accuracy"] for r in ys], "o-", color=f"C{i}", label=stage, ms=3)
            right.plot(xs, [r["task_loss"] for r in ys], "o-", color=f"C{i}", label=stage, ms=3)
        left.set(xlabel="epoch", ylabel="test accuracy (%)")
        right.set(xlabel="epoch", ylabel="training loss (task)")
        left.legend(fontsize=7)
        fig.tight_layout()
        paths["curves"] = _save(fig, folder / "curves.png", plt)
    return paths


def _spectra_plot(run, report: dict, plt) -> str:
    before = json.loads((run.stage_dir("sparsify") / "spectra_before.json").read_text())
    after = json.loads((run.stage_dir("sparsify") / "spectra_after.json").read_text())
    kept = {row["name"]: row["rank"] for row in report["layers"]}
    names = list(before)
    cols = min(6, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for values, label, color in ((before[name], "before", "0.6"), (after[name], "after", "C0")):
            top = max(values[0], 1e-12)
            ax.semilogy([max(v / top, 1e-6) for v in values], color=color, lw=1, label=label)
        ax.axvline(kept.get(name, 0) - 0.5, color="C3", lw=0.8, ls="--")
        ax.set_title(name, fontsize=6)
        ax.tick_params(which="both", labelsize=5)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5)
    fig.suptitle("singular values |s|/max before and after sparsify (dashed: rank kept)", fontsize=8)
    fig.tight_layout()
    return _save(fig, run.stage_dir("report") / "spectra.png", plt)


def _save(fig, path: Path, plt) -> str:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path.name
