import io

import pytest
import torch
from torch import nn

torch.set_num_threads(2)

# A whole pipeline run in seconds: LeNet-5 (no batch norm) on synthetic 12×12 images, 256 training images,
# batches of 30, SGD, augmentation on; 1 + 2 + 1 epochs.
TINY_RUN = ["data=synthetic", "model=lenet5", "train_epochs=1", "sparsify_epochs=2", "finetune_epochs=1",
            "lambda_s=0.1", "energy=0.15", "batch_size=30", "progress=false", "latency_repeats=1",
            "latency_backends=eager", "export_strategy=flops", "onnx=false", "device=cpu", "threads=1",
            "optimizer=sgd", "lr=0.05", "finetune_lr=0.01"]


def onnx_runtime_output(module: nn.Module, x: torch.Tensor, input_name: str = "x") -> torch.Tensor:
    """`module`'s output on `x` as ONNX Runtime computes it from the module's (TorchScript-based) ONNX export."""
    ort = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=[input_name])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class SmallNet(nn.Module):
    """A model mixing every supported kind: Conv1d/2d/3d, grouped and depthwise convs, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.reflect = nn.Conv2d(16, 24, (3, 5), stride=2, padding="valid", padding_mode="reflect")
        self.bn = nn.BatchNorm2d(24)
        self.conv1d = nn.Conv1d(24, 20, 3, padding="same", dilation=2)
        self.conv3d = nn.Conv3d(1, 6, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(20 + 6, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        x = self.stem(x).relu()
        x = self.depthwise(self.grouped(x)).relu()
        x = self.bn(self.reflect(x)).relu()  # (B, 24, H', W')
        a = self.conv1d(x.flatten(2)).relu().mean(-1)
        b = self.conv3d(x[:, None, :8]).relu().mean((1, 2, 3, 4))
        return self.head(torch.cat([a, b[:, None].expand(-1, 6)], 1))


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet().eval()


# --- docs/RELIABILITY.md: every fault injected and bad input tried, with the outcome the test observed -------
_OBSERVED: list[tuple[str, str, str, str]] = []
# docs/RELIABILITY.md: what is above this line is written by hand; what follows it, by `--reliability-doc`.
RELIABILITY_MARKER = "<!-- observed by the tests: written by pytest --reliability-doc -->"


def pytest_addoption(parser):
    parser.addoption("--reliability-doc", metavar="PATH",
                     help="write the table of injected faults and bad inputs with their observed outcomes to PATH")


@pytest.fixture
def observed(request):
    """observed(area, fault, outcome): a row of docs/RELIABILITY.md; call it after the test's asserts passed."""
    return lambda area, fault, outcome: _OBSERVED.append((area, fault, outcome, request.node.name))


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--reliability-doc")
    if not path or not _OBSERVED:
        return
    import datetime
    import platform
    import re
    from pathlib import Path

    def cell(text: str) -> str:
        text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-[^/]+/[^/ ]+", "<tmp>", str(text))  # the test's own folder
        return " ".join(text.split()).replace("|", "\\|")

    # Everything down to the marker line is written by hand (the guarantees the tables support) and kept as it is.
    doc = Path(path)
    old = doc.read_text() if doc.exists() else ""
    head = old[:old.index(RELIABILITY_MARKER)] if RELIABILITY_MARKER in old else \
        "# Reliability: faults injected and bad inputs tried by the tests\n\n"
    areas = list(dict.fromkeys(area for area, *_ in _OBSERVED))
    lines = [RELIABILITY_MARKER, "", "## Observed by the tests", "",
             "Written by `.venv/bin/python -m pytest -q tests --reliability-doc docs/RELIABILITY.md` (the whole "
             "suite); each outcome is what the test observed and asserted. "
             f"Last written {datetime.date.today()} (torch {torch.__version__}, Python {platform.python_version()}): "
             f"{session.testscollected} tests collected, {session.testsfailed} failed.", ""]
    for area in areas:
        lines += [f"### {area}", "", "| fault or input | observed outcome | test |", "|---|---|---|"]
        lines += [f"| {cell(fault)} | {cell(outcome)} | `{name}` |" for a, fault, outcome, name in _OBSERVED if a == area]
        lines.append("")
    doc.write_text(head + "\n".join(lines))
