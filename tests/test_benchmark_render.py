"""Every committed benchmark result renders to the section of RESULTS.md its command wrote from it: a renderer change
that would write a committed section otherwise, or a results JSON its renderer can no longer read, fails here.
Nothing is measured: the renderers read the committed JSON."""

import json
from pathlib import Path

import pytest

from test_baselines import load_benchmark

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _latency(result: dict) -> str:
    from svdtrain.recipes.bench import _latency_markdown

    return _latency_markdown(result)


# section of RESULTS.md -> (its results JSON, under benchmarks/results/; the renderer its command writes it with).
# pareto.py links its plot relative to RESULTS.md, beside the JSON.
SECTIONS = {
    "pareto": ("pareto.json",
               lambda r: load_benchmark("render").markdown(r, "benchmarks/results/pareto.png")),
    "pareto-mobilenetv2": ("mobilenetv2/pareto.json",
                           lambda r: load_benchmark("render").markdown(r, "benchmarks/results/mobilenetv2/pareto.png")),
    "transformer": ("transformer.json", lambda r: load_benchmark("transformer").markdown(r)),
    "transformer-equal-budget": ("transformer_equal_budget.json", lambda r: load_benchmark("transformer").markdown(r)),
    "rank_score": ("rank_score.json", lambda r: load_benchmark("rank_score").markdown(r)),
    "rank_multiples": ("rank_multiples.json", lambda r: load_benchmark("rank_multiples").markdown(r["records"])),
    "layer_profile": ("layer_profile.json", lambda r: load_benchmark("layer_profile").markdown(r)),
    "vit_profile": ("vit_profile.json", lambda r: load_benchmark("vit_profile").markdown(r)),
    "image_reader": ("image_reader.json", lambda r: load_benchmark("image_reader").markdown(r)),
    "latency_vit_b16": ("latency_vit_b16.json", _latency),
    "latency": ("latency.json", _latency),
}

# Committed results without a renderer to check, and why.
NOT_RENDERED = {
    "pareto_tuning.json": "a --tune-only run's picks, read by pareto.py --tuning-from; it has no section",
    "train_overhead.json": "`svdtrain bench overhead` writes its section inline, not from the JSON",
    "gpu_check.json": "gpu_check.sh writes its section inline, not from the JSON",
}


def _section(name: str) -> str:
    text = (ROOT / "RESULTS.md").read_text()
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    return text[text.index(start) + len(start):text.index(end)]


@pytest.mark.parametrize("name", SECTIONS)
def test_a_committed_result_renders_its_section(name):
    path, render = SECTIONS[name]
    assert render(json.loads((RESULTS / path).read_text())) == _section(name)


def test_every_committed_result_is_rendered_or_says_why_not():
    committed = {str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*.json")}
    assert committed == {path for path, _ in SECTIONS.values()} | set(NOT_RENDERED)
