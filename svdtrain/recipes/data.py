"""Data sets for the tool, read from local files only (nothing is downloaded).

Small data sets (Fashion-MNIST, CIFAR, digits, image folders that fit) sit in
memory as uint8 tensors; a batch is a slice of them, normalised and augmented
(random crop with padding, horizontal flip) as batched tensor ops.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "digits", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


class DataError(Exception):
    """A data set that is missing or malformed; the message is one line saying what to do."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W), or LazyImages for large image folders
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "Split":
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device) -> "Split":
        """On `device` (images decoded per batch stay where they are)."""
        if isinstance(self.images, LazyImages):
            return Split(self.images, self.labels.to(device))
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding for augmentation (0 = no crop)
    flip: bool  # random horizontal flips for augmentation
    eval_split: str = "test"  # what `test` holds: the test set, or a validation split cut from the training images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → float, standardised per channel."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def to(self, device: torch.device) -> "Dataset":
        return dataclasses.replace(self, train=self.train.to(device), test=self.test.to(device))

    def held_out(self, n: int) -> "Dataset":
        """The last `n` training images become the evaluation split in place of the test set, and are removed
        from training: settings are chosen on them, and the test set is left for the final figure."""
        if n <= 0:
            return self
        if n >= len(self.train):
            raise DataError(f"val_subset={n} leaves no training images ({self.name} has {len(self.train)}); "
                            f"allowed: fewer than {len(self.train)}")
        keep = len(self.train) - n
        return dataclasses.replace(self, train=Split(self.train.images[:keep], self.train.labels[:keep]),
                                   test=Split(self.train.images[keep:], self.train.labels[keep:]),
                                   eval_split="validation")

    def batches(self, split: Split, batch_size: int, generator: torch.Generator | None = None,
                augment: bool = False, max_batches: int = 0, rank: int = 0, world: int = 1):
        """(x, y) batches of `split`; shuffled (and augmented) when a generator is given.

        With `world` > 1 this process gets every world-th image of each batch of `batch_size`, starting
        at `rank`: the processes together see exactly the batches one process would.
        """
        n = len(split)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        share = slice(rank, None, world)
        for i, idx in enumerate(order.split(batch_size)):
            if max_batches and i >= max_batches:
                return
            x = split.images[idx[share]]  # CPU indices index GPU-resident data too
            if augment and generator is not None:
                x = augment_batch(x, self.crop_padding, self.flip, generator, len(idx), share)
            yield self.normalize(x), split.labels[idx[share]]


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator, batch: int = 0,
                  share: slice = slice(None)) -> torch.Tensor:
    """Random crop (zero padding `padding` on each side) and random horizontal flip, for a whole batch at once.

    `x` may be one process's `share` of a batch of `batch` images: the random draws are made for the
    whole batch and then shared out, so each image is augmented as a single process would do it.
    """
    n, c, h, w = x.shape
    batch, device = batch or n, x.device
    if padding:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)[share].to(device)
        dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)[share].to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        x = padded[torch.arange(n, device=device)[:, None, None, None],
                   torch.arange(c, device=device)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(batch, generator=generator) < 0.5)[share].to(device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST format, optionally gzipped) as a uint8 tensor, with its header checked."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # missing, unreadable, or a corrupt gzip stream
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        raise DataError(f"{path}: not an IDX uint8 file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims) or not body:
        raise DataError(f"{path}: truncated, padded or empty IDX file ({len(body)} data bytes for shape {dims})")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(folder: Path) -> Dataset:
    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
        raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}: install it with "
                        f"`apt-get install dataset-fashion-mnist` or set data_dir=FOLDER")

    splits = []
    for prefix in ("train", "t10k"):
        images, labels = read_idx(find(f"{prefix}-images-idx3-ubyte")), read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: Fashion-MNIST {prefix} images {tuple(images.shape)} and labels "
                            f"{tuple(labels.shape)} do not match")
        splits.append(Split(images.unsqueeze(1).contiguous(), labels.long()))
    return Dataset("fashion_mnist", *splits, num_classes=10, mean=(0.2860,), std=(0.3530,), crop_padding=2, flip=True)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR batches: numpy arrays, lists, dicts; refuses every other global (no code runs)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> Split:
    try:
        batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = batch[b"data"], batch[label_key]
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except Exception as e:  # any malformed pickle: one clear line, never a traceback
        raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return Split(images, labels)


def load_cifar(folder: Path, classes: int) -> Dataset:
    sub, train_files, test_file, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels") if classes == 10
        else ("cifar-100-python", ["train"], "test", b"fine_labels"))
    if (folder / sub).is_dir():
        folder = folder / sub
    missing = [f for f in train_files + [test_file] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"CIFAR-{classes} files {', '.join(missing)} not found in {folder}: set data_dir to the "
                        f"folder holding {sub}/ (the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    parts = [_read_cifar_batch(folder / f, key) for f in train_files]
    train = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if classes == 10 else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    return Dataset(f"cifar{classes}", train, _read_cifar_batch(folder / test_file, key), num_classes=classes,
                   mean=mean, std=std, crop_padding=4, flip=True)


def _decode_image(path: Path, size: int) -> torch.Tensor:
    """One image file as uint8 (3, size, size): shorter side resized to `size`, centre-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))))
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


class LazyImages:
    """Image files decoded when a batch is taken (for folders too large to hold in memory)."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size
        self.shape = (len(files), 3, size, size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyImages(self.files[index], self.size)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes outside the GIL
            return torch.stack(list(pool.map(lambda i: _decode_image(self.files[i], self.size), index.tolist())))


def load_image_folder(folder: Path, image_size: int, memory_limit_gb: float = 4.0) -> Dataset:
    """ImageNet-style `train/<class>/*.jpg` and `val/<class>/*.jpg`, resized (shorter side) and centre-cropped
    to `image_size`; decoded once into memory when it fits in `memory_limit_gb`, else per batch."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("image folders need Pillow: pip install 'svdtrain[tool]'") from None
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise DataError(f"no {split}/ folder in {folder}: set data_dir to a folder holding "
                            "train/<class>/*.jpg and val/<class>/*.jpg")
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder / 'train'} has no class folders")
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> Split:
        files = [(p, index[c]) for c in classes if (folder / split / c).is_dir()
                 for p in sorted((folder / split / c).iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{folder / split} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        images = LazyImages([p for p, _ in files], image_size)
        if len(files) * 3 * image_size**2 <= memory_limit_gb * 2**30:
            images = images[torch.arange(len(files))]
        return Split(images, torch.tensor([label for _, label in files]))

    return Dataset("imagenet", read("train"), read("val"), num_classes=len(classes), mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225), crop_padding=image_size // 8, flip=True)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images): the last 297 are the test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("the digits data set comes with scikit-learn: pip install 'svdtrain[tool]'") from None
    digits = sk_digits()
    images = torch.tensor(digits.images * 16).clamp(max=255).to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return Dataset("digits", Split(images[:1500], labels[:1500]), Split(images[1500:], labels[1500:]),
                   num_classes=10, mean=(0.30,), std=(0.38,), crop_padding=1, flip=False)


def make_synthetic(num_classes: int = 4, image_size: int = 12, channels: int = 1, n_train: int = 256,
                   n_test: int = 128, seed: int = 0) -> Dataset:
    """Learnable random data for tests: each class is a fixed random pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, channels, image_size, image_size, generator=g) * 255

    def split(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, channels, image_size, image_size, generator=g) * 60
        return Split((patterns[labels] + noise).clamp(0, 255).to(torch.uint8), labels)

    return Dataset("synthetic", split(n_train), split(n_test), num_classes=num_classes, mean=(0.5,) * channels,
                   std=(0.3,) * channels, crop_padding=1, flip=True)


def load_dataset(name: str, data_dir: str = "", image_size: int = 0) -> Dataset:
    """The data set `name` (one of DATASETS) from `data_dir` (empty: its default folder)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(Path(data_dir or FASHION_MNIST_DIR))
    if name in ("cifar10", "cifar100"):
        return load_cifar(Path(data_dir or "data"), 10 if name == "cifar10" else 100)
    if name == "imagenet":
        if not data_dir:
            raise DataError("imagenet needs data_dir=FOLDER holding train/<class>/ and val/<class>/ image folders")
        return load_image_folder(Path(data_dir), image_size or 224)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(image_size=image_size or 12)
    raise DataError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
