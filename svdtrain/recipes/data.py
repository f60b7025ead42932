"""Data sets for the tool, read from local files only (nothing is downloaded).

Small data sets (Fashion-MNIST, CIFAR, digits, image folders that fit) sit in
memory as uint8 tensors; a batch is a slice of them, normalised and augmented
(random crop with padding, horizontal flip) as batched tensor ops. Image folders
too large for memory are decoded per batch, by DataLoader worker processes.
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

from .models import one_line

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "imagenet", "digits", "synthetic")
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

    def subset(self, n: int, what: str = "subset") -> "Split":
        """`n` of the images drawn across classes (see `stratified`); n = 0 or ≥ len: all of them."""
        return self if n <= 0 or n >= len(self) else self.take(stratified(self.labels, n, what))

    def take(self, index: torch.Tensor) -> "Split":
        """The images at `index` (for images decoded per batch, their files)."""
        images = self.images.select(index) if isinstance(self.images, LazyImages) else self.images[index]
        return Split(images, self.labels[index])

    def to(self, device: torch.device) -> "Split":
        """On `device` (images decoded per batch stay on the CPU, in pinned memory when bound for a GPU)."""
        if isinstance(self.images, LazyImages):
            return Split(dataclasses.replace(self.images, pin=device.type == "cuda"), self.labels.to(device))
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

    def drawn(self, train: int = 0, val: int = 0, test: int = 0) -> "Dataset":
        """train_subset, val_subset and test_subset applied, each drawn across classes (0 = all; see
        `draw_indices`): `val` training images held out as the evaluation split in place of the test set
        (settings are chosen on them; the test set is left for the final figure), `train` of the rest."""
        if val >= len(self.train) > 0:
            raise DataError(f"val_subset={val} leaves no training images ({self.name} has {len(self.train)}); "
                            f"allowed: fewer than {len(self.train)}")
        train_index, val_index = draw_indices(self.train.labels, train, val)
        out = dataclasses.replace(self, test=self.train.take(val_index), eval_split="validation") if val else self
        return dataclasses.replace(out, train=self.train.take(train_index) if len(train_index) < len(self.train)
                                   else self.train, test=out.test.subset(test, "test_subset"))

    def batches(self, split: Split, batch_size: int, generator: torch.Generator | None = None,
                augment: bool = False, max_batches: int = 0, rank: int = 0, world: int = 1):
        """(x, y) batches of `split`; shuffled (and augmented) when a generator is given.

        With `world` > 1 this process gets every world-th image of each batch of `batch_size`, starting
        at `rank`: the processes together see exactly the batches one process would.
        """
        n = len(split)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        share = slice(rank, None, world)
        batches = order.split(batch_size)[:max_batches or None]
        shares = [idx[share] for idx in batches]
        augment = augment and generator is not None and bool(self.crop_padding or self.flip)
        # Every random draw is made here, in batch order, for whole batches, then shared out: the same
        # draws whoever decodes, and each process's share augmented as one process would augment it.
        draws = [augment_draws(generator, len(idx), share, self.crop_padding, self.flip) for idx in batches] \
            if augment else [None] * len(batches)
        if isinstance(split.images, LazyImages):
            # decoded (and cropped and flipped) ahead, in worker processes, while this one trains
            images = split.images.decode(shares, draws, self.crop_padding)
        else:
            images = (split.images[s] if d is None else _crop_and_flip(split.images[s], self.crop_padding, *d)
                      for s, d in zip(shares, draws))  # CPU indices index GPU-resident data too
        for s, x in zip(shares, images):
            labels = split.labels[s]
            # Decoded batches come on the CPU (pinned when bound for a GPU): the uint8 batch moves first,
            # asynchronously, and is normalised where it lands.
            yield self.normalize(x.to(labels.device, non_blocking=x.is_pinned())), labels


SUBSET_SEED = 0  # subsets and held-out splits: the same images whatever the run's seed


def class_orders(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per class (ascending label), the indices of its images in a shuffled order of a fixed seed."""
    labels = labels.cpu()
    counts = labels.bincount()
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    members = labels.argsort(stable=True).split(counts[counts > 0].tolist())
    return [m[torch.randperm(len(m), generator=generator)] for m in members]


def quotas(counts: torch.Tensor, n: int, what: str, limit: torch.Tensor | None = None) -> torch.Tensor:
    """How many of `n` images each class gets: its share of `n` (largest remainders settle the rounding), at least
    one and at most `limit` (default: all of its `counts`); a DataError when that cannot keep every class."""
    limit = counts if limit is None else limit
    if n > limit.sum():  # only a held-out split has limits below the counts: one image of each class stays
        raise DataError(f"{what}={n} would leave a class with no training image; allowed: at most "
                        f"{int(limit.sum())} (every class keeps one)")
    if n < len(counts) or (limit < 1).any():
        raise DataError(f"{what}={n} cannot keep every class: " + (
            f"{int((limit < 1).sum())} class(es) have a single training image, which cannot be both trained on "
            "and held out; allowed: val_subset=0" if (limit < 1).any() else
            f"there are {len(counts)} classes; allowed: 0 (all) or at least {len(counts)}"))
    exact = counts.double() * n / counts.sum()
    quota = torch.minimum(exact.floor().long().clamp(min=1), limit)
    while quota.sum() < n:  # one more for the class furthest below its share that has images to spare
        quota[torch.where(quota < limit, exact - quota, -math.inf).argmax()] += 1
    while quota.sum() > n:  # the minimum of one per class overshot: one back from the furthest above its share
        quota[torch.where(quota > 1, quota - exact, -math.inf).argmax()] -= 1
    return quota


def stratified(labels: torch.Tensor, n: int, what: str = "subset") -> torch.Tensor:
    """The indices (ascending) of `n` of `labels`: the start of each class's fixed-seed order (`class_orders`),
    each class its share (`quotas`)."""
    return draw_indices(labels, n, 0, what)[0]


def draw_indices(labels: torch.Tensor, train: int, val: int = 0,
                 what: str = "train_subset") -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) indices (ascending) of `labels`, each class its share of `train` and `val` (0 = all
    the rest, and none held out).

    Each class's images are put in one fixed-seed shuffled order (`class_orders`): the held-out images are the
    end of each class's order, the training images the start of the rest. So a run without a held-out split
    trains on the start of the same orders, and its images and another run's held-out ones never meet while,
    in every class, the two shares fit together (rounding can make one class's shares overflow by an image:
    benchmarks/pareto.py checks the two index sets). Every class keeps at least one image on each side."""
    orders = class_orders(labels)
    held = torch.zeros(0, dtype=torch.long)
    if val > 0:
        counts = torch.tensor([len(o) for o in orders])
        taken = quotas(counts, val, "val_subset", counts - 1).tolist()
        held = torch.cat([o[len(o) - q:] for o, q in zip(orders, taken)]).sort().values
        orders = [o[:len(o) - q] for o, q in zip(orders, taken)]
    if 0 < train < sum(len(o) for o in orders):
        taken = quotas(torch.tensor([len(o) for o in orders]), train, what).tolist()
        orders = [o[:q] for o, q in zip(orders, taken)]
    return torch.cat(orders).sort().values, held


def augment_draws(generator: torch.Generator, batch: int, share: slice, padding: int, flip: bool):
    """The random crop offsets (dy, dx; None without padding) and flips (None without flipping) of a batch of
    `batch` images, drawn for the whole batch and then cut to `share`."""
    dy = dx = mask = None
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)[share]
        dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)[share]
    if flip:
        mask = (torch.rand(batch, generator=generator) < 0.5)[share]
    return dy, dx, mask


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator, batch: int = 0,
                  share: slice = slice(None)) -> torch.Tensor:
    """Random crop (zero padding `padding` on each side) and random horizontal flip, for a whole batch at once.

    `x` may be one process's `share` of a batch of `batch` images: the random draws are made for the
    whole batch and then shared out, so each image is augmented as a single process would do it.
    """
    return _crop_and_flip(x, padding, *augment_draws(generator, batch or len(x), share, padding, flip))


def _crop_and_flip(x: torch.Tensor, padding: int, dy, dx, mask) -> torch.Tensor:
    """A batch's windows of its zero-padded images at offsets (dy, dx), then flipped where `mask`: one gather."""
    n, c, h, w = x.shape
    device = x.device
    if dy is not None:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        rows = (dy.to(device)[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx.to(device)[:, None] + torch.arange(w, device=device))[:, None, None, :]
        x = padded[torch.arange(n, device=device)[:, None, None, None],
                   torch.arange(c, device=device)[None, :, None, None], rows, cols]
    if mask is not None:
        x = torch.where(mask.to(device)[:, None, None, None], x.flip(-1), x)
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
    except Image.DecompressionBombError as e:  # a header claiming billions of pixels: refused before decoding
        raise DataError(f"{path}: refused, too large to decode safely ({e})") from None


@dataclass(frozen=True)
class LazyImages:
    """Image files decoded when a batch is taken (for folders too large to hold in memory).

    `workers` > 0: `decode` hands batches to that many DataLoader worker processes, which decode ahead of
    the training loop (a process each: no GIL between them); 0: a batch is decoded when it is needed, by 4
    threads in the calling process.
    """

    files: tuple[Path, ...]
    size: int
    workers: int = 0
    pin: bool = False  # pinned memory, so that batches go to a GPU asynchronously

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return dataclasses.replace(self, files=self.files[index])
        return _BatchDecoder(self.files, self.size, threads=4)[index, None]

    def select(self, index: torch.Tensor) -> "LazyImages":
        return dataclasses.replace(self, files=tuple(self.files[i] for i in index.tolist()))

    def decode(self, batches: list[torch.Tensor], draws: list | None = None, padding: int = 0):
        """The images of each index tensor in `batches`, in order, as uint8 (n, 3, size, size); with `draws`
        (augment_draws of each batch, or None), cropped and flipped image by image as they are decoded."""
        jobs = list(zip(batches, draws or [None] * len(batches)))
        decoder = _BatchDecoder(self.files, self.size, padding, threads=0 if self.workers else 4)
        if not self.workers:
            return (decoder[job] for job in jobs)
        return _one_line_errors(torch.utils.data.DataLoader(decoder, batch_size=None, sampler=jobs,
                                                            num_workers=self.workers, pin_memory=self.pin,
                                                            prefetch_factor=2))


def _one_line_errors(loader):
    """`loader`'s batches; a DataError in a worker (an image that does not decode) comes back as DataLoader
    re-raises it, with the worker's traceback in its message: raised again as the one line it was."""
    try:
        yield from loader
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].partition("DataError: ")[2] or str(e)) from None


class _BatchDecoder(torch.utils.data.Dataset):
    """decoder[indices, draws] → one decoded batch, each image cropped and flipped by its draws (a worker
    decodes whole batches: one hand-over per batch). A lone image's crop is a slice, cheaper than the gather
    a batch in memory takes; the pixels are the same."""

    def __init__(self, files: tuple[Path, ...], size: int, padding: int = 0, threads: int = 0):
        self.files, self.size, self.padding, self.threads = files, size, padding, threads

    def __getitem__(self, job) -> torch.Tensor:
        indices, draws = job
        indices = indices.tolist()
        dy, dx, mask = (None if d is None else d.tolist() for d in draws or (None, None, None))

        def one(k: int) -> torch.Tensor:
            image = _decode_image(self.files[indices[k]], self.size)
            if dy is not None:
                p, size = self.padding, self.size
                image = torch.nn.functional.pad(image, (p,) * 4)[:, dy[k]:dy[k] + size, dx[k]:dx[k] + size]
            return image.flip(-1) if mask is not None and mask[k] else image

        if not self.threads:
            return torch.stack([one(k) for k in range(len(indices))])
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.threads) as pool:  # PIL decodes outside the GIL
            return torch.stack(list(pool.map(one, range(len(indices)))))


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
                _decode_image(paths[0], image_size)
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
