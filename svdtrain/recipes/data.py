"""A data set's splits and their batches: images in memory as uint8 tensors (a batch is a slice, normalised and
augmented — random crop with padding, horizontal flip — as batched tensor ops), or image files decoded per batch
by DataLoader worker processes when a folder is too large for memory; subsets drawn so that every class keeps
its share. The readers of each data set are in datasets.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

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


def decode_image(path: Path, size: int) -> torch.Tensor:
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
            image = decode_image(self.files[indices[k]], self.size)
            if dy is not None:
                p, size = self.padding, self.size
                image = torch.nn.functional.pad(image, (p,) * 4)[:, dy[k]:dy[k] + size, dx[k]:dx[k] + size]
            return image.flip(-1) if mask is not None and mask[k] else image

        if not self.threads:
            return torch.stack([one(k) for k in range(len(indices))])
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.threads) as pool:  # PIL decodes outside the GIL
            return torch.stack(list(pool.map(one, range(len(indices)))))
