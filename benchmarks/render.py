"""The sweeps' Markdown and plots, from a sweep's JSON alone (nothing is measured here): `markdown` and `plot` give
pareto.py's section of RESULTS.md and pareto.png; `tuning_rows`, the table of the settings tried on the validation
split, is shared with transformer.py's section.
"""

from __future__ import annotations

from pathlib import Path

from harness import BASELINES, DISTILL, LOWER_FINETUNE_LR, METHODS, NEW_RECIPE, fmt
from svdtrain.recipes.config import RunConfig

MODEL_NAMES = {"resnet20": "CIFAR ResNet-20", "mobilenetv2": "MobileNetV2 (half width)"}  # as the sections name them


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


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "method") or "its defaults"


def tuning_rows(methods: dict) -> list[str]:
    """The settings each method tried on the validation split, as `tune` recorded them: a row a setting, the picked
    one marked (the speed-up each reached where the axis is speed)."""
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
                         f"{fmt(tried['validation_accuracy_after_prune'])} | "
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
    """pareto.py's section of RESULTS.md from its pareto.json (`png`: the plot, relative to the Markdown file)."""
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
            f"(`--keep-from`), `{kept['command']}`"
            + (f", tuned there at target_speedup {kept['tuning_target']:g}." if "tuning_target" in kept else ".")]


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
            *tuning_rows(t["methods"]),
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
            f"- at 3×: ≤ 1.0 point below the dense mean: {fmt(n['accuracy_3x'], ' %')} (Δ "
            + ("—" if n["delta_3x"] is None else f"{n['delta_3x']:+.2f}") + "): "
            + ("**met**" if n["within_1_point_3x"] else "**not met**"),
            f"- at 3×, before fine-tuning (after the last cut and batch-norm recalibration) ≥ 80 %: "
            f"{fmt(n['before_finetune_3x'], ' %')}: " + ("**met**" if n["before_finetune_3x_at_least_80"] else "**not met**"),
        ]
        for key in ("3x", "4x"):
            e = n.get(f"seeds_{key}")
            if e:
                lines.append(f"- at {key.replace('x', '×')}, mean of two compression seeds ≥ the better filter "
                             f"pruning + 0.3: {fmt(e['mean'], ' %')} against {e['filter_pruning'] or '—'} "
                             f"{fmt(e['filter_pruning_mean'], ' %')}: " + _met(e["at_least_filter_plus_0.3"]))
    if b.get("flops_seeds"):
        lines += ["", "Two compression seeds (same dense checkpoint), each seed's curve read at matched conv FLOPs "
                  "reduction (its point at the budget standing for it, within the budget's 2 %, else interpolated):",
                  ""]
        for m, e in b["flops_seeds"].items():
            lines.append(f"- {m}: " + "; ".join(
                f"{key.replace('x', '×')}: " + ", ".join(fmt(a) for a in v["accuracy"])
                + f" → mean {fmt(v['mean'], ' %')}"
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
            *[f"| {k:.0%} | " + " | ".join(fmt(c.get(k)) for c in curves.values()) + " |" for k in steps]]


def _removal_rows(points) -> list[str]:
    """What each cut of a method that removes channels as well as ranks took, as measured at the cut."""
    lines = []
    for p in points:
        cuts = [c for c in p.get("cuts", []) if "channels" in c]
        if not cuts:
            continue
        lines += ["", f"What each cut of `{p['method']}` removed (seed {p['seed']}, target {p['knob_value']:g}×; "
                  "latency timed whole against dense on the deployment at the cut, not predicted; channels summed "
                  "over every channel group, ranks over every SVD layer; accuracy as in the table above):", "",
                  "| stage progress | latency (of dense) | FLOPs (of dense) | channels kept | ranks kept | "
                  "accuracy right after (%) |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['progress']:.0%} | {c['latency']:.3f} | {c['flops']:.3f} | {sum(c['channels'].values())} | "
                  f"{sum(c['ranks'].values())} | {fmt(c.get('accuracy'))} |" for c in cuts]
    return lines


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
            *tuning_rows(t["methods"]),
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
        lines.append(f"| {key} | " + " | ".join(fmt(row.get(m)) for m in methods) + " |")
    lines.append("| serving 2x | " + " | ".join(fmt(b["matched_serving"]["2x"].get(m)) for m in methods) + " |")
    if b.get("overlap"):
        lines += ["", f"Where `{NEW_RECIPE}`'s curve and another's overlap, both read at the ends of the overlap "
                  "(seed 0, deployment):", ""]
        for method, o in b["overlap"].items():
            (low, high), ours, theirs = o["speedups"], o[NEW_RECIPE], o[method]
            lines.append(f"- against {method}, {low:.2f}×–{high:.2f}×: {ours[0]:.2f} vs {theirs[0]:.2f} % at "
                         f"{low:.2f}×, {ours[1]:.2f} vs {theirs[1]:.2f} % at {high:.2f}×")
    targets = {m: e.get("target", speed["seed_target"]) for m, e in b["seeds"].items()}  # each method's own
    if b["seeds"]:
        one = len(set(targets.values())) == 1
        lines += ["", "Two compression seeds (same dense checkpoint) " + (
            f"at target {next(iter(targets.values())):g}×:" if one else "at each method's seed target:"), ""]
        for m, e in b["seeds"].items():
            lines.append(f"- {m}" + ("" if one else f" at {targets[m]:g}×") + ": "
                         + ", ".join(f"{a:.2f} % at {v:.2f}×" for a, v in zip(e["accuracy"], e["speedup_b1"]))
                         + f" → mean {e['mean']:.2f} %")
    at_seed_target = [p for p in speed["points"]
                      if p["seed"] == 0 and p["knob_value"] == targets.get(p["method"], speed["seed_target"])]
    where = "seed 0 at the seed target" if len(set(targets.values())) <= 1 else "seed 0 at each method's seed target"
    lines += _cut_rows(at_seed_target, where) + _removal_rows(at_seed_target)
    n = b["new_recipe_speed"]
    if n:
        two, seeds_bar = n["2x"], n["seeds"]
        lines += ["", f"Bars (`{NEW_RECIPE}` against the better filter pruning at each speed; its curve reaches "
                  f"{n['reach']:.2f}× at most):",
                  f"- at 2× (matched, seed 0's curves): {fmt(two['accuracy'], ' %')} against "
                  f"{two['filter_pruning'] or '—'} {fmt(two['filter_pruning_accuracy'], ' %')}, bar ≥ +0.3: "
                  + _met(two["at_least_filter_plus_0.3"]) + "; ≥ dense mean − 1.0 "
                  f"({d['accuracy_mean'] - 1:.2f} %): " + _met(two["within_1_point_of_dense"]),
                  f"- two compression seeds at target {seeds_bar['target']:g}× (not matched speed: each method's "
                  f"measured speed-ups are listed above): {fmt(seeds_bar['mean'], ' %')} against "
                  f"{seeds_bar['filter_pruning'] or '—'} {fmt(seeds_bar['filter_pruning_mean'], ' %')}"]
        for other in ("1.5x", "2.5x", "serving_2x"):
            e = n[other]
            lines.append(f"- {other.replace('_', ' ')}: {fmt(e['accuracy'], ' %')} against {e['filter_pruning'] or '—'} "
                         f"{fmt(e['filter_pruning_accuracy'], ' %')}: " + _met(e["at_least_filter"]))
    lines.append("")
    return lines

