"""nrrdd.data: IDX parsing, image folders, normalisation and the valid pixel range."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from nrrdd_tiny import FASHION_MNIST_DIR, make_imagefolder

from nrrdd.data import (denormalize, load_split, normalize, pixel_bounds, read_idx)
from nrrdd.errors import UsageError


def _raw(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)


def test_idx_fashion_mnist_layout(idx_dir):
    train = load_split("fashion-mnist", idx_dir, "train")
    test = load_split("fashion-mnist", idx_dir, "test")
    assert (len(train), len(test)) == (40, 20)
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert (train.in_channels, train.image_size) == (1, 12)
    labels = _raw(idx_dir / "train-labels-idx1-ubyte.gz")
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels.tolist()
    pixels = _raw(idx_dir / "train-images-idx3-ubyte.gz").reshape(40, 12, 12)
    x = train.get([3, 0])
    assert x.shape == (2, 1, 12, 12) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.from_numpy(pixels[3].astype(np.float32)) / 255)
    assert torch.bincount(train.labels).tolist() == [4] * 10
    assert train.class_indices(7).tolist() == np.nonzero(labels == 7)[0].tolist()


def test_read_idx_rejects_garbage(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UsageError):
        read_idx(p)


def test_batches_in_order_and_normalised(idx_dir):
    ds = load_split("fashion-mnist", idx_dir, "test")
    xs, ys = zip(*ds.batches(7))
    assert [x.shape[0] for x in xs] == [7, 7, 6]
    x = torch.cat(xs)
    assert torch.equal(torch.cat(ys), ds.labels)
    want = (ds.get(torch.arange(20)) - 0.2860) / 0.3530
    assert torch.allclose(x, want, atol=1e-6)
    raw = torch.cat([b for b, _ in ds.batches(20, normalized=False)])
    assert raw.min() >= 0 and raw.max() <= 1


def test_resize_on_access(idx_dir):
    ds = load_split("fashion-mnist", idx_dir, "train", image_size=20)
    assert ds.image_size == 20 and ds.get([0]).shape == (1, 1, 20, 20)


def test_pixel_bounds_are_the_image_of_0_and_1():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    lo, hi = pixel_bounds(mean, std)
    ends = torch.stack([torch.zeros(3, 1, 1), torch.ones(3, 1, 1)])
    n = normalize(ends, mean, std).flatten(1)
    assert torch.allclose(lo, n[0]) and torch.allclose(hi, n[1])
    assert torch.allclose(lo, (0 - torch.tensor(mean)) / torch.tensor(std))
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(denormalize(normalize(x, mean, std), mean, std), x, atol=1e-6)


def test_missing_folders_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_split("fashion-mnist", tmp_path / "nope", "train")
    with pytest.raises(UsageError, match="no Fashion-MNIST IDX"):
        load_split("fashion-mnist", tmp_path, "train")
    with pytest.raises(UsageError, match="does not exist"):
        load_split("cifar10", tmp_path / "nope", "train")
    with pytest.raises(UsageError, match="not found"):
        load_split("cifar10", tmp_path, "train")
    with pytest.raises(UsageError, match="train"):
        load_split("imagefolder", tmp_path, "train")
    with pytest.raises(UsageError, match="unknown dataset"):
        load_split("mnist-ish", tmp_path, "train")


def test_imagefolder_gray_sorted_classes_lazy(tmp_path):
    root = make_imagefolder(tmp_path / "g", classes=3, train_per_class=2, val_per_class=1, size=10)
    (root / "train" / "c10").mkdir()  # sorted as strings, like torchvision: c0, c1, c10, c2
    make_imagefolder(tmp_path / "tmp", classes=1, train_per_class=1, val_per_class=0, size=10)
    (tmp_path / "tmp" / "train" / "c0" / "000.png").rename(root / "train" / "c10" / "000.png")
    ds = load_split("imagefolder", root, "train", image_size=8)
    assert ds.classes == ["c0", "c1", "c10", "c2"]
    assert ds.in_channels == 1 and ds.image_size == 8 and ds.mean == (0.449,)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 3, 3]
    x = ds.get([4])
    assert x.shape == (1, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    val = load_split("imagefolder", root, "val", image_size=8)
    assert val.classes == ds.classes and val.labels.tolist() == [0, 1, 3]


def test_imagefolder_rgb_resize_center_crop(tmp_path):
    from PIL import Image

    root = tmp_path / "rgb"
    for split in ("train", "val"):
        d = root / split / "a"
        d.mkdir(parents=True)
        a = np.zeros((20, 40, 3), np.uint8)
        a[:, 10:30] = (255, 0, 0)  # the centre square is red; the sides black
        Image.fromarray(a).save(d / "x.png")
    ds = load_split("imagefolder", root, "train", image_size=10)
    x = ds.get([0])
    assert ds.in_channels == 3 and x.shape == (1, 3, 10, 10)
    assert torch.allclose(x[0, 0, :, 1:-1], torch.ones(10, 8), atol=0.02)  # centre crop: red (edges filtered)
    assert float(x[0, 1:].abs().max()) < 0.02


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_default_location():
    train = load_split("fashion-mnist", None, "train")
    test = load_split("fashion-mnist", None, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.class_counts().tolist() == [6000] * 10
    assert train.labels[0].item() == 9 and test.labels[0].item() == 9  # both start with an ankle boot
    x = train.get(torch.arange(1000))
    assert abs(float(x.mean()) - 0.286) < 0.02  # the published normalisation constants fit


@pytest.mark.parametrize("kind", ["idx", "folder"])
def test_holdout_split_is_fixed_balanced_and_disjoint(idx_dir, tmp_path, kind):
    from nrrdd.data import holdout_split

    if kind == "idx":
        ds = load_split("fashion-mnist", idx_dir, "train")
    else:
        ds = load_split("imagefolder", make_imagefolder(tmp_path / "f", 3, 5, 1, 8), "train")
    rest, held = holdout_split(ds, 2)
    assert held.class_counts().tolist() == [2] * ds.num_classes
    assert (rest.class_counts() + held.class_counts()).tolist() == ds.class_counts().tolist()
    assert type(rest) is type(ds) and rest.image_size == ds.image_size and rest.mean == ds.mean
    # the held-out images are real images of ds, none of them in rest
    all_px, rest_px, held_px = ds.get(range(len(ds))), rest.get(range(len(rest))), held.get(range(len(held)))
    flat = lambda t: {tuple(r.tolist()) for r in t.flatten(1)}  # noqa: E731
    assert flat(rest_px) | flat(held_px) == flat(all_px) and not flat(rest_px) & flat(held_px)
    for sub in (rest, held):  # split_index maps back to the full split
        full = sub.split_index(range(len(sub)))
        assert torch.equal(ds.labels[full], sub.labels) and torch.equal(ds.get(full), sub.get(range(len(sub))))
    rest2, held2 = holdout_split(ds, 2)  # the same images every time, whatever the global RNG
    torch.manual_seed(123)
    assert torch.equal(held2.get(range(len(held2))), held_px) and torch.equal(held2.labels, held.labels)
    with pytest.raises(UsageError, match="cannot hold out"):
        holdout_split(ds, int(ds.class_counts().min()))


def test_threaded_folder_loading_equals_serial(tmp_path, monkeypatch):
    import nrrdd.data as data

    root = make_imagefolder(tmp_path / "f", 3, 30, 1, 20, mode="RGB")
    ds = load_split("imagefolder", root, "train", image_size=16)
    idx = torch.randperm(len(ds))
    monkeypatch.setattr(data, "LOAD_THREADS", 4)
    threaded = ds.get(idx)
    monkeypatch.setattr(data, "LOAD_THREADS", 1)
    serial = ds.get(idx)
    assert threaded.shape == (90, 3, 16, 16) and float(serial.std()) > 0.05
    assert torch.equal(threaded, serial)
    assert torch.equal(ds.get(idx[:3]), serial[:3])  # small calls stay serial, same result
