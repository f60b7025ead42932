"""The data sets, read from local files only (nothing is downloaded): Fashion-MNIST (IDX files), CIFAR (python
batches, unpickled without running code), image folders, scikit-learn's digits, and generated data for tests."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from pathlib import Path

import torch

from .data import DataError, Dataset, LazyImages, Split, decode_image
from .models import one_line

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "imagenet", "digits", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


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
        raise DataError(f"{path}: not a CIFAR python batch ({one_line(e)})") from None  # some span lines
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


def _decode_all(images: LazyImages, chunk: int = 256) -> torch.Tensor:
    out = torch.empty(images.shape, dtype=torch.uint8)
    parts = list(torch.arange(len(images)).split(chunk))
    for idx, x in zip(parts, images.decode(parts)):
        out[idx] = x
    return out


def _channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1]: of all of them when they are in
    memory, else of up to 1,000 spread evenly over the folder."""
    if isinstance(images, LazyImages):
        pick = torch.linspace(0, len(images) - 1, min(len(images), 1000)).long().unique()
        images = torch.cat(list(images.decode(list(pick.split(256)))))
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for part in images.split(256):
        x = part.double() / 255
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean**2).clamp(min=1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image_folder(folder: Path, image_size: int, memory_limit_gb: float = 4.0, workers: int = 0,
                      name: str = "imagefolder") -> Dataset:
    """`train/<class>/*.jpg` and `val/<class>/*.jpg` (any of _IMAGE_SUFFIXES), resized (shorter side) and
    centre-cropped to `image_size`; decoded once into memory when it fits in `memory_limit_gb`, else per batch;
    by `workers` processes (0: threads of this one). Normalised by ImageNet's statistics for name="imagenet", else
    by the training images' own."""
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
    val_classes = sorted(p.name for p in (folder / "val").iterdir() if p.is_dir())
    for split, extra in (("val", sorted(set(val_classes) - set(classes))),
                         ("train", sorted(set(classes) - set(val_classes)))):
        if extra:  # a class only one side has would be dropped from evaluation, or never evaluated
            other = "train" if split == "val" else "val"
            raise DataError(f"{folder / split} has class folder(s) {', '.join(extra)} that {folder / other} lacks; "
                            "allowed: the same class folders in train/ and val/")
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> Split:
        per_class = {c: [p for p in sorted((folder / split / c).iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
                     for c in classes}
        empty = [c for c, paths in per_class.items() if not paths]
        if empty:
            raise DataError(f"{folder / split / empty[0]} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})"
                            + (f", nor do {len(empty) - 1} other class folder(s)" if len(empty) > 1 else "")
                            + "; allowed: at least one image in every class folder")
        files = [(p, index[c]) for c, paths in per_class.items() for p in paths]
        images = LazyImages(tuple(p for p, _ in files), image_size, workers)
        if len(files) * 3 * image_size**2 <= memory_limit_gb * 2**30:
            images = _decode_all(images)
        else:  # decoded per batch: one image of each class now, so a class of unreadable files fails here
            for paths in per_class.values():
                decode_image(paths[0], image_size)
        return Split(images, torch.tensor([label for _, label in files]))

    train = read("train")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet" else _channel_stats(train.images)
    return Dataset(name, train, read("val"), num_classes=len(classes), mean=mean, std=std,
                   crop_padding=image_size // 8, flip=True)


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


SHAPES = ("circle", "square", "triangle", "bar")


def write_shapes_folder(root: Path, train_per_class: int = 200, val_per_class: int = 50, size: int = 64,
                        seed: int = 0, classes: int = 4) -> Path:
    """A generated image folder (root/train/<class>/*.jpg, root/val/<class>/*.jpg) for examples, tests and
    benchmarks: each class is a shape (circle, square, triangle, bar) of random size, place and colour, light on
    a dark random gradient or dark on a light one, with noise, saved as a JPEG of `size`² pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for shape in SHAPES[:classes]:
            folder = Path(root) / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                dark = rng.random() < 0.5  # a dark background and a light shape, or the other way round
                low, high = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)
                background = low + (high - low) * (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
                pixels = (background if dark else 255 - background) + rng.normal(0, 12, (size, size, 3))
                im = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                r = rng.uniform(0.2, 0.35) * size
                x, y = rng.uniform(r, size - r, 2)
                shade = rng.integers(150, 256, 3)
                colour = tuple(int(v) for v in (shade if dark else 255 - shade))
                draw = ImageDraw.Draw(im)
                if shape == "circle":
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
                elif shape == "square":
                    draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
                elif shape == "triangle":
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
                else:
                    draw.rectangle((x - r, y - r / 4, x + r, y + r / 4), fill=colour)
                im.save(folder / f"{i:05d}.jpg", quality=90)
    return Path(root)


def load_dataset(name: str, data_dir: str = "", image_size: int = 0, workers: int = 0) -> Dataset:
    """The data set `name` (one of DATASETS) from `data_dir` (empty: its default folder); image folders are
    decoded by `workers` processes (0: threads of this one)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(Path(data_dir or FASHION_MNIST_DIR))
    if name in ("cifar10", "cifar100"):
        return load_cifar(Path(data_dir or "data"), 10 if name == "cifar10" else 100)
    if name in ("imagefolder", "imagenet"):
        if not data_dir:
            raise DataError(f"{name} needs data_dir=FOLDER holding train/<class>/ and val/<class>/ image folders")
        if not Path(data_dir).is_dir():
            raise DataError(f"data_dir={data_dir}: no such folder")
        return load_image_folder(Path(data_dir), image_size or 224, workers=workers, name=name)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(image_size=image_size or 12)
    raise DataError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
