import gzip
import struct

import pytest
import torch
from PIL import Image

from stepwise.data import (check_images, load_fashion_mnist, load_imagefolder, load_source, load_split, make_synthetic,
                           read_idx, save_split)
from stepwise.errors import ConfigError, DataError


def write_idx(path, array: torch.Tensor, compress=True):
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def fake_fmnist(root, n=20):
    g = torch.Generator().manual_seed(0)
    for split, m in (("train", n), ("t10k", n // 2)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (m, 28, 28), generator=g))
        # labels uncompressed: the reader accepts both forms
        write_idx(root / f"{split}-labels-idx1-ubyte", torch.randint(0, 10, (m,), generator=g), compress=False)


def test_read_idx_roundtrip(tmp_path):
    a = torch.randint(0, 256, (3, 5, 7))
    write_idx(tmp_path / "a.gz", a)
    assert torch.equal(read_idx(tmp_path / "a.gz"), a.to(torch.uint8))


def test_fashion_mnist_from_local_idx(tmp_path):
    fake_fmnist(tmp_path)
    d = load_fashion_mnist(str(tmp_path))
    images, labels = d["splits"]["train"]
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (20,)
    assert d["splits"]["test"][0].shape == (10, 1, 28, 28) and len(d["classes"]) == 10


def test_truncated_idx_names_file(tmp_path):
    fake_fmnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.open(p).read()
    gzip.open(p, "wb").write(raw[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated or corrupt"):
        load_fashion_mnist(str(tmp_path))


def test_garbage_idx(tmp_path):
    fake_fmnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot be read"):
        load_fashion_mnist(str(tmp_path))


def test_missing_dataset_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist|data.download"):
        load_fashion_mnist(str(tmp_path))


def test_mismatched_counts(tmp_path):
    fake_fmnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", torch.zeros(19, 28, 28))
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist(str(tmp_path))


def test_synthetic_deterministic():
    a, b = make_synthetic(seed=1), make_synthetic(seed=1)
    assert torch.equal(a["splits"]["train"][0], b["splits"]["train"][0])
    images = a["splits"]["train"][0]
    assert images.shape == (512, 1, 16, 16) and images.max() > 100 and images.float().std() > 10


def test_split_roundtrip_and_corruption(tmp_path):
    d = make_synthetic(num_train=10, num_test=4)
    images, labels = d["splits"]["train"]
    card = save_split(tmp_path / "train.pt", images, labels, d["classes"])
    assert card["count"] == 10 and card["shape"] == [1, 16, 16] and len(card["sha256"]) == 64
    got, got_labels, classes = load_split(tmp_path / "train.pt")
    assert torch.equal(got, images) and classes == d["classes"]
    data = (tmp_path / "train.pt").read_bytes()
    (tmp_path / "train.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train.pt: cannot be read.*dvc repro prepare"):
        load_split(tmp_path / "train.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="expected a 'stepwise-data/1' file"):
        load_split(tmp_path / "other.pt")


def test_check_images_shapes():
    imgs, labels = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    check_images(imgs, labels, "x", image_size=8, channels=1)
    with pytest.raises(DataError, match="3 channel"):
        check_images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), labels, "x", channels=1)
    with pytest.raises(DataError, match="data.image_size=16"):
        check_images(imgs, labels, "x", image_size=16)
    with pytest.raises(DataError, match="uint8"):
        check_images(imgs.float(), labels, "x")
    with pytest.raises(DataError, match="labels"):
        check_images(imgs, labels[:3], "x")


def test_imagefolder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 24), (i * 40, 10, 200)).save(tmp_path / cls / f"{i}.png")
    d = load_imagefolder(str(tmp_path), image_size=8, channels=3, test_fraction=0.34)
    assert d["splits"]["train"][0].shape == (4, 3, 8, 8) and d["splits"]["test"][0].shape == (2, 3, 8, 8)
    assert d["classes"] == ["cat", "dog"]


def test_empty_imagefolder(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="data.root"):
        load_imagefolder(str(tmp_path), 8, 3)


def test_load_source_errors():
    with pytest.raises(ConfigError, match="valid: \\['cifar10', 'fashion_mnist', 'imagefolder', 'synthetic'\\]"):
        load_source({"name": "mnist"})
    with pytest.raises(ConfigError, match="takes no key\\(s\\) \\['nmu_train'\\]"):
        load_source({"name": "synthetic", "nmu_train": 3})


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os
    import stat

    from stepwise.io import write_json

    write_json({"a": 1}, tmp_path / "m.json")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
