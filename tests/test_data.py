import dataclasses
import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from svdtrain.recipes.data import DataError, augment_batch
from svdtrain.recipes.datasets import (FASHION_MNIST_DIR, load_cifar, load_dataset, load_digits, load_fashion_mnist,
                                       load_image_folder, make_synthetic, read_idx)


def write_idx(path: Path, array: np.ndarray, compress: bool = False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_fashion_mnist(folder: Path, n_train=20, n_test=10, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), compress)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_reader(tmp_path, compress):
    fake_fashion_mnist(tmp_path, compress=compress)
    data = load_fashion_mnist(tmp_path)
    assert data.train.images.shape == (20, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test.labels.shape == (10,) and data.num_classes == 10


def test_idx_errors_name_the_file(tmp_path, observed):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x09\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="bad magic number") as e:
        read_idx(bad)
    observed("Data readers", "an IDX file with magic 00000901", f"DataError: `{e.value}`")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(truncated)
    observed("Data readers", "an IDX file declaring 5 bytes and holding 3", f"DataError: `{e.value}`")
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*data_dir") as e:
        load_fashion_mnist(tmp_path / "nowhere")
    observed("Data readers", "Fashion-MNIST folder missing", f"DataError: `{e.value}`")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    data = load_dataset("fashion_mnist")
    assert data.train.images.shape == (60000, 1, 28, 28) and data.test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(data.train.labels.bincount(), torch.full((10,), 6000))
    x = data.normalize(data.train.images[:5000])  # the stored mean / std standardise the data
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def write_cifar(folder: Path, classes=10, n=8):
    rng = np.random.default_rng(1)
    if classes == 10:
        folder = folder / "cifar-10-batches-py"
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder = folder / "cifar-100-python"
        names, key = ["train", "test"], b"fine_labels"
    folder.mkdir()
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reader(tmp_path, classes):
    folder = write_cifar(tmp_path, classes)
    data = load_cifar(tmp_path, classes)
    train_batches = 5 if classes == 10 else 1
    assert data.train.images.shape == (8 * train_batches, 3, 32, 32) and data.test.images.shape == (8, 3, 32, 32)
    raw = pickle.loads((folder / ("test_batch" if classes == 10 else "test")).read_bytes(), encoding="bytes")
    assert torch.equal(data.test.images[0], torch.tensor(raw[b"data"][0]).reshape(3, 32, 32))
    assert data.num_classes == classes


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar_pickle_with_code_is_refused(tmp_path, observed):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(str(marker)), b"labels": [1]}))
    with pytest.raises(DataError, match="refusing to load") as e:
        load_cifar(tmp_path, 10)
    assert not marker.exists()
    observed("Loading never runs code", "a CIFAR batch pickling a call to Path.touch",
             f"DataError, nothing ran: `{e.value}`")


def test_cifar_missing_and_corrupt(tmp_path, observed):
    with pytest.raises(DataError, match="data_dir"):
        load_cifar(tmp_path, 10)
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python batch") as e:
        load_cifar(tmp_path, 10)
    observed("Data readers", "a CIFAR batch file holding 'not a pickle'", f"DataError: `{e.value}`")


def write_image_folder(root: Path, size=(20, 14)):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")


def test_image_folder_reader_in_memory_and_lazy(tmp_path):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    data = load_image_folder(tmp_path, 8)
    assert data.train.images.shape == (6, 3, 8, 8) and data.num_classes == 2
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    lazy = load_image_folder(tmp_path, 8, memory_limit_gb=0)
    assert not isinstance(lazy.train.images, torch.Tensor)
    assert torch.equal(lazy.train.images[torch.arange(6)], data.train.images)
    batches = list(lazy.batches(lazy.train, 4, torch.Generator().manual_seed(0), augment=True))
    assert [x.shape for x, _ in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]


@pytest.mark.parametrize("world", [1, 2])
def test_worker_processes_give_the_batches_threads_give(tmp_path, world):
    """DataLoader workers decode what the threads decode, in the same order, and augmentation (drawn in the
    training process, in batch order) is the same: under torchrun each rank's share is the same too."""
    pytest.importorskip("PIL")
    from svdtrain.recipes.datasets import write_shapes_folder

    write_shapes_folder(tmp_path, train_per_class=9, val_per_class=2, size=24)
    threads, workers = (load_image_folder(tmp_path, 16, memory_limit_gb=0, workers=w) for w in (0, 2))
    assert workers.train.images.workers == 2 and len(workers.train) == 36
    for rank in range(world):
        a, b = (list(d.batches(d.train, 10, torch.Generator().manual_seed(3), augment=True, rank=rank, world=world,
                                max_batches=3)) for d in (threads, workers))
        assert [len(x) for x, _ in b] == [len(range(rank, 10, world))] * 3
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    in_memory = load_image_folder(tmp_path, 16, workers=2)  # decoded once, by the workers
    assert isinstance(in_memory.train.images, torch.Tensor)
    assert torch.equal(in_memory.train.images, threads.train.images[torch.arange(36)])
    # Decoded per batch, each image is cropped and flipped alone; in memory, the batch at once: same pixels.
    a, b = (list(d.batches(d.train, 10, torch.Generator().manual_seed(4), augment=True)) for d in (in_memory, workers))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_an_image_that_does_not_decode_in_a_worker_is_one_line(tmp_path):
    pytest.importorskip("PIL")
    from svdtrain.recipes.datasets import write_shapes_folder

    write_shapes_folder(tmp_path, train_per_class=3, val_per_class=1, size=16)
    bad = tmp_path / "train" / "circle" / "00001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as e:  # decoded by a worker (the statistics' sample at load holds every image)
        load_image_folder(tmp_path, 16, memory_limit_gb=0, workers=1)
    assert str(e.value).startswith(f"{bad}: cannot decode image") and "\n" not in str(e.value)


def test_image_folder_normalisation(tmp_path):
    pytest.importorskip("PIL")
    from svdtrain.recipes.datasets import IMAGENET_MEAN, write_shapes_folder

    write_shapes_folder(tmp_path, train_per_class=5, val_per_class=2, size=20)
    own = load_dataset("imagefolder", str(tmp_path), 16)
    x = own.train.images.double() / 255
    assert own.name == "imagefolder" and own.num_classes == 4 and own.image_shape == (3, 16, 16)
    assert own.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert own.std == pytest.approx(x.std((0, 2, 3), correction=0).tolist(), abs=1e-4)
    lazy = load_image_folder(tmp_path, 16, memory_limit_gb=0)  # a sample of ≤ 1,000 images: all 20 here
    assert lazy.mean == own.mean and lazy.std == own.std
    imagenet = load_dataset("imagenet", str(tmp_path), 16)
    assert imagenet.mean == IMAGENET_MEAN and torch.equal(imagenet.train.images, own.train.images)


def test_image_folder_errors(tmp_path, observed):
    with pytest.raises(DataError, match="no train/ folder") as e:
        load_image_folder(tmp_path, 8)
    observed("Data readers", "an image folder without train/", f"DataError: `{e.value}`")
    write_image_folder(tmp_path)
    (tmp_path / "val" / "cat" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode") as e:
        load_image_folder(tmp_path, 8)
    observed("Data readers", "a .png file holding 'garbage'", f"DataError: `{e.value}`")


def test_digits():
    pytest.importorskip("sklearn")
    data = load_digits()
    assert data.train.images.shape == (1500, 1, 8, 8) and len(data.test) == 297


def test_augment_crop_and_flip_are_windows_of_the_padded_batch():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, 0, False, g), x)
    out = augment_batch(x, 2, True, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_batches_are_a_seeded_permutation():
    data = make_synthetic(n_train=50)
    run = [torch.cat([y for _, y in data.batches(data.train, 16, torch.Generator().manual_seed(5))]) for _ in range(2)]
    assert torch.equal(run[0], run[1])
    assert torch.equal(run[0].sort().values, data.train.labels.sort().values)
    assert sum(1 for _ in data.batches(data.train, 16, max_batches=2)) == 2


@pytest.mark.parametrize("world", [2, 3])
def test_shares_of_a_batch_make_the_whole_batch(world):
    """Under torchrun each process takes every world-th image of each batch; together, with augmentation,
    they are exactly one process's batches."""
    data = make_synthetic(n_train=50)
    whole = list(data.batches(data.train, 16, torch.Generator().manual_seed(3), augment=True))
    shares = [list(data.batches(data.train, 16, torch.Generator().manual_seed(3), augment=True, rank=r, world=world))
              for r in range(world)]
    for i, (x, y) in enumerate(whole):
        for r in range(world):
            assert torch.equal(shares[r][i][0], x[r::world]) and torch.equal(shares[r][i][1], y[r::world])


def test_unknown_data_set():
    with pytest.raises(DataError, match="allowed"):
        load_dataset("mnist")


def sorted_by_class(data):
    """`data` with its training images ordered by class, as an image folder lists them."""
    order = data.train.labels.argsort(stable=True)
    return dataclasses.replace(data, train=data.train.take(order))


def test_subsets_and_splits_are_drawn_across_classes(observed):
    data = sorted_by_class(make_synthetic(num_classes=4, n_train=256, n_test=64))
    counts = data.train.labels.bincount()
    # The first half of a folder sorted by class holds 2 of its 4 classes; the draw holds all 4, each its share.
    half = data.drawn(train=128)
    assert data.train.labels[:128].unique().numel() == 2
    drawn = half.train.labels.bincount(minlength=4)
    assert drawn.sum() == 128 and (drawn - counts * 128 / 256).abs().max() <= 1
    assert torch.equal(half.test.labels, data.test.labels)  # no test_subset: the whole test set
    # val_subset: every class on both sides, disjoint, together exactly the training images.
    held = data.drawn(val=56)
    assert held.eval_split == "validation" and len(held.train) == 200 and len(held.test) == 56
    assert held.train.labels.unique().numel() == 4 and held.test.labels.unique().numel() == 4
    assert (held.test.labels.bincount(minlength=4) - counts * 56 / 256).abs().max() <= 1
    rows = lambda split: {bytes(x.numpy()) for x in split.images}  # noqa: E731
    assert not rows(held.train) & rows(held.test)
    assert rows(held.train) | rows(held.test) == rows(data.train)
    # A run without a held-out split trains on none of the images another run validates on (room in every class).
    assert not rows(data.drawn(train=180).train) & rows(held.test)
    assert rows(data.drawn(train=100, val=56).train) <= rows(held.train)
    # test_subset draws across classes too; the same draws every time, whatever the run's seed.
    assert data.drawn(test=8).test.labels.unique().numel() == 4
    torch.manual_seed(123)
    assert torch.equal(data.drawn(train=128, val=20).train.images, data.drawn(train=128, val=20).train.images)
    assert data.drawn(0, 0, 0).train is data.train and data.drawn().eval_split == "test"
    observed("Subsets and splits keep every class", "train_subset = half of a 4-class training set listed by "
             "class (its first half holds 2 classes)", f"all 4 classes drawn, {drawn.tolist()} images each "
             f"(of {counts.tolist()})")
    observed("Subsets and splits keep every class", "val_subset=56 of 256 images in 4 classes", "every class on "
             "both sides, disjoint, together the whole training set; a run without val_subset and train_subset "
             "≤ the rest trains on none of those 56")


@pytest.mark.parametrize("what, draw, message", [
    ("train_subset below the number of classes", dict(train=3), "train_subset=3 cannot keep every class"),
    ("test_subset below the number of classes", dict(test=2), "test_subset=2 cannot keep every class"),
    ("val_subset with a class of a single image", dict(val=10), "single training image"),
    ("val_subset = all training images", dict(val=256), "val_subset=256 leaves no training images"),
    ("val_subset leaving fewer training images than classes", dict(val=254),
     "val_subset=254 would leave a class with no training image; allowed: at most 252"),
])
def test_a_draw_that_would_drop_a_class_is_refused(what, draw, message, observed):
    data = make_synthetic(num_classes=4, n_train=256, n_test=64)
    if "single" in message:  # class 3 keeps one image
        keep = (data.train.labels != 3) | (torch.arange(256) == int((data.train.labels == 3).nonzero()[0]))
        data = dataclasses.replace(data, train=data.train.take(keep.nonzero().flatten()))
    with pytest.raises(DataError, match=message) as e:
        data.drawn(**draw)
    observed("Subsets and splits keep every class", what, f"DataError: `{e.value}`")


def test_a_run_with_val_subset_never_reads_the_test_set(tmp_path):
    from svdtrain.recipes.config import RunConfig
    from svdtrain.recipes.run import Run

    run = Run(tmp_path, RunConfig(data="synthetic", val_subset=40, train_subset=100))
    full = load_dataset("synthetic")
    rows = lambda images: {bytes(x.numpy()) for x in images}  # noqa: E731
    assert run.data.eval_split == "validation" and len(run.data.test) == 40 and len(run.data.train) == 100
    assert rows(run.data.test.images) <= rows(full.train.images)
    assert not rows(run.data.test.images) & rows(full.test.images)
    assert not rows(run.data.test.images) & rows(run.data.train.images)
    assert run.data_summary["train_images"] == 100 and run.data_summary["of_train_images"] == 256


def test_train_subset_default_is_the_quick_recipes_half_on_fashion_mnist_only():
    from svdtrain.recipes.config import RunConfig

    assert RunConfig().train_images == 30000
    assert RunConfig(data="imagefolder").train_images == 0 and RunConfig(data="cifar10").train_images == 0
    assert RunConfig(data="imagefolder", train_subset=500).train_images == 500


def test_decoded_batches_are_normalised_where_their_labels_are(tmp_path):
    """A batch decoded per batch (pinned, bound for a GPU) moves as uint8 and is normalised on its device: here
    labels on the meta device stand for a GPU's."""
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    lazy = load_image_folder(tmp_path, 8, memory_limit_gb=0)
    on_meta = dataclasses.replace(lazy.train, labels=lazy.train.labels.to("meta"))
    (x, y), *_ = lazy.batches(on_meta, 4)
    assert x.device.type == "meta" and x.dtype == torch.float32 and y.device.type == "meta"


def _png_claiming(path: Path, width: int, height: int):
    """A PNG whose header claims width × height pixels (valid CRCs), with a few bytes of pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_claiming_a_billion_pixels_is_one_line(tmp_path, workers, observed):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    bomb = tmp_path / "train" / "cat" / "9.png"
    _png_claiming(bomb, 30000, 30000)
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path, 8, memory_limit_gb=0, workers=workers)
    assert str(e.value).startswith(f"{bomb}: refused, too large to decode safely") and "\n" not in str(e.value)
    observed("Data readers", f"a PNG whose header claims 30000×30000 pixels (workers={workers})",
             f"DataError: `{e.value}`")


@pytest.mark.parametrize("what, damage, message", [
    ("a val/ class that train/ lacks", lambda root: (root / "val" / "bird").mkdir(), "val has class folder(s) bird"),
    ("a train/ class that val/ lacks", lambda root: (root / "train" / "bird").mkdir(),
     "train has class folder(s) bird that"),
    ("an empty class folder (in train/ and val/)",
     lambda root: [(root / split / "bird").mkdir() for split in ("train", "val")], "bird holds no images"),
    ("a class folder of non-image files", lambda root: [
        (root / split / "bird").mkdir() or (root / split / "bird" / "a.txt").write_text("x")
        for split in ("train", "val")], "bird holds no images"),
])
def test_class_folders_that_do_not_match_are_one_line(tmp_path, what, damage, message, observed):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        load_image_folder(tmp_path, 8)
    observed("Data readers", what, f"DataError: `{e.value}`")
