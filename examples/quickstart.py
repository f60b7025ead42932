"""The five verbs on a small CNN and real data (Fashion-MNIST), in about two minutes on 2 CPU cores.

    python examples/quickstart.py [--data /usr/share/datasets/fashion-mnist] [--epochs 3]

decompose_ → train with orthogonality + Hoyer sparsity → prune_ by energy →
recalibrate_bn → fine-tune with orthogonality only → export a plain model; prints accuracy, FLOPs
and parameters of the dense and the exported model.
"""

import argparse
import gzip
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import svdtrain


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format): magic 0x0000 0x08 ndim, big-endian dims, uint8 data."""
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if data[:3] != b"\x00\x00\x08":
        raise SystemExit(f"{path}: not an IDX uint8 file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def load(folder: Path, split: str):
    try:
        images = read_idx(next(folder.glob(f"{split}-images-idx3-ubyte*")))
        labels = read_idx(next(folder.glob(f"{split}-labels-idx1-ubyte*")))
    except StopIteration:
        raise SystemExit(f"no Fashion-MNIST IDX files in {folder}: run `apt-get install dataset-fashion-mnist` "
                         "or pass --data FOLDER") from None
    return ((images.float() / 255 - 0.286) / 0.353).unsqueeze(1), labels.long()


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model, data, epochs, lam_o, lam_s, batch=128, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr)  # a new optimizer per stage: prune_ makes new parameters
    x, y = data
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if lam_o:
                loss = loss + lam_o * svdtrain.orthogonality_loss(model)  # keeps U, V orthonormal
            if lam_s:
                loss = loss + lam_s * svdtrain.sparsity_loss(model, "hoyer")  # drives singular values to zero
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data
    return 100 * sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000))) / len(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train-size", type=int, default=20000, help="training images used (default 20000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of sparse SVD training (default 3)")
    parser.add_argument("--lam-s", type=float, default=0.1, help="Hoyer sparsity weight (default 0.1)")
    parser.add_argument("--energy", type=float, default=0.05, help="energy pruned per layer (default 0.05)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.time()
    x, y = load(args.data, "train")
    train_set, test_set = (x[:args.train_size], y[:args.train_size]), load(args.data, "t10k")
    example = test_set[0][:1]

    model = net()
    dense_flops, dense_params = svdtrain.count_flops(model, example), svdtrain.count_params(model)
    print(svdtrain.decompose_(model, svdtrain.SVDConfig(decomposition="channel", init="random")))
    train(model, train_set, args.epochs, lam_o=1.0, lam_s=args.lam_s)
    print(f"SVD training: {accuracy(model, test_set):.2f} % test accuracy")
    print(svdtrain.prune_(model, energy=args.energy, example_inputs=example))
    print(f"pruned: {accuracy(model, test_set):.2f} % test accuracy")
    svdtrain.recalibrate_bn(model, train_set[0][:2048].split(128))  # batch-norm statistics of the pruned network
    print(f"pruned, batch norm recalibrated: {accuracy(model, test_set):.2f} % test accuracy")
    train(model, train_set, 1, lam_o=1.0, lam_s=0, lr=3e-4)
    small = svdtrain.export(model, example)
    print(svdtrain.summary(small, example))
    flops, params = svdtrain.count_flops(small, example), svdtrain.count_params(small)
    print(f"exported: {accuracy(small, test_set):.2f} % test accuracy, "
          f"{dense_flops / flops:.2f}× fewer FLOPs ({flops:,} vs {dense_flops:,}), "
          f"{dense_params / params:.2f}× fewer parameters, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
