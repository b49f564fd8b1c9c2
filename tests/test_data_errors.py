"""Bad raw data and bad sampler arguments: each raises one line naming the file (or argument) and what to do."""
import gzip
import io
import socket
import struct
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from stepwise.data import load_cifar10, load_fashion_mnist, load_imagefolder, read_idx
from stepwise.errors import ConfigError, DataError
from stepwise.timestep_samplers import TIMESTEP_SAMPLERS, build_timestep_sampler


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


# --- ImageFolder --------------------------------------------------------------------------------------------------


def image_folder(root, n=3):
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (12, 10), (i * 40, 10, 200)).save(root / cls / f"{i}.png")


def test_imagefolder_non_image_file_with_image_extension(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "dog" / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(DataError) as e:
        load_imagefolder(str(tmp_path), image_size=8, channels=3)
    msg = one_line(e)
    assert msg.startswith(str(tmp_path / "dog" / "notes.png")) and "delete or replace it" in msg


def test_imagefolder_truncated_png(tmp_path):
    image_folder(tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="png")
    (tmp_path / "cat" / "cut.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(DataError) as e:
        load_imagefolder(str(tmp_path), image_size=8, channels=1)
    assert one_line(e).startswith(str(tmp_path / "cat" / "cut.png"))


# --- IDX files ----------------------------------------------------------------------------------------------------


def test_uncompressed_idx_shorter_than_header(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 60000))  # 8 of the 16 header bytes
    with pytest.raises(DataError) as e:
        read_idx(p)
    msg = one_line(e)
    assert msg.startswith(str(p)) and "shorter than its 16-byte IDX header" in msg and "re-download" in msg


def test_uncompressed_idx_shorter_than_declared_size(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(idx_bytes(torch.arange(10))[:-3])
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert "holds 7 bytes of data, header says 10" in one_line(e)


def test_idx_with_zero_dimensions(tmp_path):
    p = tmp_path / "x-idx0-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 0]) + b"\x05")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(p)


def test_gzip_corrupt_idx(tmp_path):
    images = (torch.arange(20 * 28 * 28) % 251).reshape(20, 28, 28)  # compressible: real deflate blocks
    packed = bytearray(gzip.compress(idx_bytes(images)))
    packed[17] ^= 0xFF  # inside the deflate stream: zlib.error (invalid code lengths), not a gzip header error
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(bytes(packed))
    with pytest.raises(DataError) as e:
        read_idx(p)
    msg = one_line(e)
    assert msg.startswith(f"{p}: cannot be read (error:") and "truncated or corrupt" in msg


def test_gzip_crc_mismatch_idx(tmp_path):
    packed = bytearray(gzip.compress(idx_bytes(torch.arange(100))))
    packed[-6] ^= 0xFF  # the CRC32 trailer
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(bytes(packed))
    with pytest.raises(DataError, match="BadGzipFile"):
        read_idx(p)


def test_fashion_mnist_with_corrupt_gzip_names_the_file(tmp_path):
    for split, n in (("train", 4), ("t10k", 2)):
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros(n, 28, 28))))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(n)))
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])  # a cut-off download
    with pytest.raises(DataError) as e:
        load_fashion_mnist(str(tmp_path))
    assert one_line(e).startswith(f"{p}: cannot be read (EOFError")


# --- CIFAR-10 -----------------------------------------------------------------------------------------------------


def test_cifar10_offline_download(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), download=True)
    msg = one_line(e)
    assert msg.startswith(f"CIFAR-10 download into {tmp_path} failed") and "name resolution" in msg
    assert "cifar-10-python.tar.gz" in msg and "data.download=false" in msg


def test_cifar10_connection_reset(tmp_path, monkeypatch):
    def reset(*args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(urllib.request, "urlopen", reset)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), download=True)
    assert "CIFAR-10" in one_line(e) and "Connection reset" in str(e.value)


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), download=False)
    assert one_line(e).startswith(f"CIFAR-10 not found under {tmp_path}") and "data.download=true" in str(e.value)


def test_cifar10_corrupt_extracted_batches(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        (folder / name).write_bytes(b"\x00garbage, not a pickle")
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)  # as if the md5 check were skipped
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path))
    msg = one_line(e)
    assert msg.startswith(f"CIFAR-10 under {tmp_path} cannot be read") and f"delete {folder}" in msg


# --- timestep sampler arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TIMESTEP_SAMPLERS))
def test_wrong_sampler_argument_lists_valid_names(name):
    import inspect

    valid = sorted(set(inspect.signature(TIMESTEP_SAMPLERS[name]).parameters) - {"self", "T", "seed", "t_range"})
    with pytest.raises(ConfigError) as e:
        build_timestep_sampler(name, 100, threshold=0.5)  # a plausible but wrong name
    msg = one_line(e)
    assert f"timestep sampler {name!r} has no argument(s) ['threshold']" in msg
    assert (f"valid: {valid}" if valid else "takes no arguments") in msg


def test_speed_misspelled_argument():
    with pytest.raises(ConfigError) as e:
        build_timestep_sampler("speed", 100, schedule="linear", tau_frac=0.7, lam=0.6)
    assert one_line(e).endswith("valid: ['abar', 'k', 'lam', 'schedule', 'tau']")
