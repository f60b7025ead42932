import subprocess
import sys

import torch
from torch import nn

from conftest import SmallNet
from svdtrain import SVDConfig, count_flops, count_params, decompose_, prune_, summary


def test_count_flops_is_two_per_multiply_accumulate():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(1, 3, 8, 8)
    assert count_flops(model, x) == 2 * (8 * 27 * 36) + 2 * (288 * 10)
    assert count_flops(model, (x,)) == count_flops(model, x)


def test_count_flops_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()).train()
    stats = model[1].running_mean.clone()
    count_flops(model, torch.randn(4, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats)


def test_count_params_counts_shared_parameters_once():
    a = nn.Linear(4, 4)
    assert count_params(nn.Sequential(a, a)) == 20


def test_summary_rows_and_table():
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(1, 3, 16, 16)
    decompose_(model, SVDConfig(exclude_modules=["head.2"]))
    prune_(model, energy=0.1)
    result = summary(model, x)
    rows = {r["name"]: r for r in result.rows}
    assert rows["stem"]["kind"] == "SVDConv2d channel" and rows["stem"]["shape"] == "16×3×3×3"
    assert rows["stem"]["rank"] == f"{model.stem.rank}/16" and 0 < rows["stem"]["energy_kept"] <= 1
    assert rows["head.2"]["rank"] == "dense" and rows["depthwise"]["rank"] == "dense"
    assert rows["head.2"]["flops"] == 2 * 32 * 5
    assert result.total_flops == count_flops(model, x) and result.total_params == count_params(model)
    lines = str(result).splitlines()
    assert lines[0].split() == ["name", "kind", "shape", "rank", "channels", "energy_kept", "flops"]
    assert rows["stem"]["channels"] == "all" and rows["head.2"]["channels"] == ""
    assert len({len(line) for line in lines[2:-1]} | {len(lines[1])}) == 1  # aligned: every row as wide
    assert lines[-1].startswith("total:")


def test_import_svdtrain_needs_only_torch():
    code = ("import sys; import torch; before = set(sys.modules); import svdtrain; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new if m not in sys.stdlib_module_names and m not in ('svdtrain', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import svdtrain, sys; print('svdtrain.recipes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
