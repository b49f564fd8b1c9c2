"""Datasets: read raw sources, write one compact uint8 tensor file per split, and load it back checked.

A prepared split is a torch file {format, images uint8 (N, C, H, W), labels int64 (N,), classes} read with
weights_only=True; its dataset card records counts, shape, mean/std and the file's sha256.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import math
import pickle
import struct
import tarfile
import urllib.error
import zlib
from pathlib import Path

import torch

from .errors import ConfigError, DataError
from .io import load_torch, save_torch

DATA_FORMAT = "stepwise-data/1"
DATA_FIELDS = {"images": torch.Tensor, "labels": torch.Tensor, "classes": list}  # a split file's entries
FASHION_MNIST_SYSTEM_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, as a uint8 tensor; DataError if malformed."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # unreadable, not gzip, truncated or corrupt deflate stream
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is truncated or corrupt, "
                        "re-download or reinstall the dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number); re-download the dataset")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: {len(raw)} bytes, shorter than its {4 + 4 * ndim}-byte IDX header; the file is "
                        "truncated or corrupt, re-download the dataset")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    if len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise DataError(f"{path}: holds {len(raw) - 4 - 4 * ndim} bytes of data, header says {math.prod(dims)}; "
                        "the file is truncated or corrupt, re-download the dataset")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def find_idx(root: Path, stem: str) -> Path:
    """The path of IDX file `stem` (plain or .gz) under root, or a DataError naming what is missing."""
    for name in (stem, stem + ".gz"):
        for p in (root / name, root / "FashionMNIST" / "raw" / name):
            if p.is_file():
                return p
    raise DataError(f"{root}: no {stem}[.gz] found; set data.root to the folder holding the Fashion-MNIST IDX "
                    f"files, install the Debian package dataset-fashion-mnist, or set data.download=true")


def load_fashion_mnist(root: str = "auto", download: bool = False, cache_dir: str = "data/raw") -> dict:
    """Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747) from local IDX files, else torchvision's download."""
    if root == "auto":
        root = FASHION_MNIST_SYSTEM_ROOT if Path(FASHION_MNIST_SYSTEM_ROOT).is_dir() else cache_dir
    root = Path(root)
    if download and not any(root.glob("**/train-images-idx3-ubyte*")):
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as e:
            raise DataError(f"Fashion-MNIST download into {root} failed ({e}); offline, install the Debian "
                            f"package dataset-fashion-mnist or point data.root at local IDX files") from None
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        images, labels = read_idx(find_idx(root, img_stem)), read_idx(find_idx(root, lbl_stem))
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"{root}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
                            "match (expected (N, H, W) and (N,)); re-download the dataset")
        splits[split] = (images[:, None].contiguous(), labels.long())  # (N, 1, 28, 28), (N,)
    return {"splits": splits, "classes": FASHION_MNIST_CLASSES, "source": str(root)}


def load_cifar10(root: str = "data/raw", download: bool = False) -> dict:
    """CIFAR-10 (Krizhevsky 2009) through torchvision."""
    from torchvision.datasets import CIFAR10

    splits = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR10(root, train=split == "train", download=download)
        except urllib.error.URLError as e:  # offline, DNS failure, HTTP error (an OSError, so caught first)
            raise DataError(f"CIFAR-10 download into {root} failed ({getattr(e, 'reason', e)}); without network, "
                            "download cifar-10-python.tar.gz on another machine, extract it so that "
                            f"{Path(root) / 'cifar-10-batches-py'} exists, and set data.download=false") from None
        except RuntimeError as e:  # torchvision: not found, or a failed integrity (md5) check
            raise DataError(f"CIFAR-10 not found under {root} ({e}); set data.download=true (needs network) "
                            f"or point data.root at an extracted cifar-10-batches-py folder's parent") from None
        except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError) as e:
            raise DataError(f"CIFAR-10 under {root} cannot be read ({type(e).__name__}: {e}); the download or "
                            f"extraction is incomplete or corrupt: delete {Path(root) / 'cifar-10-batches-py'} and "
                            "cifar-10-python.tar.gz there and download again (data.download=true)") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        splits[split] = (images, torch.tensor(ds.targets, dtype=torch.long))
    return {"splits": splits, "classes": list(ds.classes), "source": str(root)}


def _imagefolder_image(ds, i: int) -> torch.Tensor:
    """Image i of a torchvision ImageFolder, transformed; DataError naming the file if PIL cannot decode it."""
    from PIL import UnidentifiedImageError

    try:
        return ds[i][0]
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # not an image, truncated, broken PNG chunk
        raise DataError(f"{ds.samples[i][0]}: not a readable image ({type(e).__name__}); the file is corrupt or not "
                        "an image despite its extension: delete or replace it, or move it out of data.root") from None


def load_imagefolder(root: str, image_size: int, channels: int, test_fraction: float = 0.1, seed: int = 0) -> dict:
    """Any torchvision ImageFolder (root/class_x/img.png), resized and center-cropped to image_size."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise DataError(f"data.root={root!r} is not a folder; point it at root/<class>/<image> files")
    tf = transforms.Compose([transforms.Grayscale(channels) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
                             transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])
    try:
        ds = ImageFolder(root, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"data.root={root!r}: {e}") from None
    if len(ds) < 2:
        raise DataError(f"data.root={root!r} holds {len(ds)} image(s); need at least 2 (a train and a test image)")
    images = torch.stack([_imagefolder_image(ds, i) for i in range(len(ds))])  # (N, C, S, S)
    labels = torch.tensor(ds.targets, dtype=torch.long)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(ds))))
    test, train = perm[:n_test], perm[n_test:]
    return {"splits": {"train": (images[train], labels[train]), "test": (images[test], labels[test])},
            "classes": list(ds.classes), "source": str(root)}


def make_synthetic(image_size: int = 16, channels: int = 1, num_train: int = 512, num_test: int = 128,
                   seed: int = 0) -> dict:
    """A tiny labelled set for tests: class 0 = filled square, 1 = ring, 2 = horizontal bar, 3 = vertical bar."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")  # (S, S)

    def draw(n):
        labels = torch.randint(0, 4, (n,), generator=g)  # (n,)
        cy, cx = (torch.rand(2, n, generator=g) * 0.5 + 0.25) * image_size  # (n,), (n,)
        r = (torch.rand(n, generator=g) * 0.15 + 0.15) * image_size  # (n,)
        dy, dx = (yy[None] - cy[:, None, None]).abs(), (xx[None] - cx[:, None, None]).abs()  # (n, S, S)
        d = (dy**2 + dx**2).sqrt()
        rr = r[:, None, None]
        masks = torch.stack([(dy < rr) & (dx < rr), (d < rr) & (d > rr / 2), (dy < rr / 3) & (dx < rr * 1.5),
                             (dx < rr / 3) & (dy < rr * 1.5)], 1)  # (n, 4, S, S)
        mask = masks[torch.arange(n), labels]  # (n, S, S)
        level = torch.rand(n, channels, 1, 1, generator=g) * 0.5 + 0.5  # (n, C, 1, 1)
        images = (mask[:, None] * level * 255).round().to(torch.uint8)  # (n, C, S, S)
        return images, labels

    return {"splits": {"train": draw(num_train), "test": draw(num_test)},
            "classes": ["square", "ring", "hbar", "vbar"], "source": f"synthetic(seed={seed})"}


DATASETS = {"fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10,
            "imagefolder": load_imagefolder, "synthetic": make_synthetic}


def load_source(cfg: dict) -> dict:
    """Read the raw dataset named by cfg['name'] with the keyword arguments its loader takes."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset; valid: {sorted(DATASETS)}")
    fn = DATASETS[name]
    accepted = set(inspect.signature(fn).parameters)
    unknown = set(cfg) - accepted - {"image_size", "channels"}
    if unknown:
        raise ConfigError(f"data.name={name!r} takes no key(s) {sorted(unknown)}; valid: "
                          f"{sorted(accepted | {'image_size', 'channels'})}")
    return fn(**{k: v for k, v in cfg.items() if k in accepted})


def check_images(images: torch.Tensor, labels: torch.Tensor, where: str, image_size=None, channels=None) -> None:
    """Raise DataError unless images are uint8 (N, C, H, W) matching labels (N,) and the configured size/channels."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0 or len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels (need equal, non-zero counts)")
    if channels is not None and images.shape[1] != channels:
        raise DataError(f"{where}: images have {images.shape[1]} channel(s), config says data.channels={channels}")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise DataError(f"{where}: images are {tuple(images.shape[2:])}, config says data.image_size={image_size}")


def sha256(path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_split(path, images: torch.Tensor, labels: torch.Tensor, classes: list) -> dict:
    """Write one prepared split atomically and return its card entry (count, shape, mean/std, sha256)."""
    check_images(images, labels, str(path))
    save_torch({"format": DATA_FORMAT, "images": images, "labels": labels, "classes": list(classes)}, path)
    x = images.float() / 255
    return {"count": len(images), "shape": list(images.shape[1:]), "mean": x.mean((0, 2, 3)).tolist(),
            "std": x.std((0, 2, 3)).tolist(), "sha256": sha256(path), "file": Path(path).name}


def load_split(path) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Load a prepared split: (images uint8 (N, C, H, W), labels (N,), classes); DataError if missing/corrupt."""
    obj = load_torch(path, DATA_FORMAT, error=DataError, hint="Run `dvc repro prepare` to rebuild it.",
                     fields=DATA_FIELDS)
    check_images(obj["images"], obj["labels"], str(path))
    return obj["images"], obj["labels"], obj["classes"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1
