import pytest
import torch
from torch import nn

torch.set_num_threads(2)


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
