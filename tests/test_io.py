"""stepwise.io: byte-reproducible atomic writes, stale temp cleanup, output-folder lock, full disk, corrupt files."""
import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import stepwise.io as sio
from stepwise.errors import CheckpointError, DataError, DiskFullError, OutputLockedError, StepwiseError
from stepwise.io import exclusive_dir_lock, load_torch, remove_stale_temps, save_torch, write_json, write_text

REPO = Path(__file__).resolve().parents[1]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def child(code: str) -> subprocess.Popen:
    """A Python child running `code` with this checkout's stepwise; it prints 'ready' once set up."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child failed to start: {line}{proc.stderr.read()}")
    return proc


# --- 1. byte-identical artifacts ------------------------------------------------------------------------------------


def test_save_torch_is_byte_identical_across_paths(tmp_path):
    obj = {"format": "x/1", "images": torch.arange(300, dtype=torch.uint8).reshape(3, 10, 10),
           "labels": torch.arange(3), "classes": ["a", "b", "c"], "nested": {"w": torch.randn(4, 4)}}
    save_torch(obj, tmp_path / "one" / "train.pt")
    save_torch(obj, tmp_path / "two" / "other_name.pt")
    save_torch(obj, tmp_path / "one" / "train.pt")  # rewriting the same target too
    assert sha(tmp_path / "one" / "train.pt") == sha(tmp_path / "two" / "other_name.pt")
    got = load_torch(tmp_path / "two" / "other_name.pt", "x/1")
    assert torch.equal(got["images"], obj["images"]) and got["classes"] == obj["classes"]


def test_prepared_split_sha_is_reproducible(tmp_path):
    from stepwise.data import make_synthetic, save_split

    d = make_synthetic(num_train=8, num_test=4)
    a = save_split(tmp_path / "a" / "train.pt", *d["splits"]["train"], d["classes"])
    b = save_split(tmp_path / "b" / "train.pt", *d["splits"]["train"], d["classes"])
    assert a["sha256"] == b["sha256"]


def test_json_and_text_are_byte_identical(tmp_path):
    write_json({"b": 1, "a": [1.5, "é"]}, tmp_path / "x.json")
    write_json({"a": [1.5, "é"], "b": 1}, tmp_path / "y.json")
    assert sha(tmp_path / "x.json") == sha(tmp_path / "y.json")
    write_text("héllo\n", tmp_path / "x.txt")
    assert (tmp_path / "x.txt").read_bytes() == "héllo\n".encode()


def test_png_figure_and_grid_are_byte_identical(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepwise.visualise import save_figure, save_grid

    for name in ("a.png", "b.png"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1, 2], [1, 0, 2], label="x")
        ax.legend()
        ax.set_title("same figure")
        save_figure(fig, tmp_path / "fig" / name)
    assert sha(tmp_path / "fig" / "a.png") == sha(tmp_path / "fig" / "b.png")
    assert b"Software" not in (tmp_path / "fig" / "a.png").read_bytes()

    images = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    save_grid(images, tmp_path / "grid" / "a.png")
    save_grid(images, tmp_path / "grid" / "b.png")
    assert sha(tmp_path / "grid" / "a.png") == sha(tmp_path / "grid" / "b.png")
    data = (tmp_path / "grid" / "a.png").read_bytes()
    assert b"tIME" not in data and b"tEXt" not in data


# --- 2. stale temp files --------------------------------------------------------------------------------------------


def test_killed_writer_temp_is_removed_by_next_write(tmp_path):
    target = tmp_path / "m.json"
    write_json({"v": 0}, target)
    proc = child(f"""
import time
from stepwise.io import atomic_path
with atomic_path({str(target)!r}) as tmp:
    tmp.write_text("half")
    print("ready", flush=True)
    time.sleep(120)
""")
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".m.json.{proc.pid}@")
    assert target.read_text() == "{\n  \"v\": 0\n}\n"  # the kill left the target as it was
    write_json({"v": 1}, target)
    assert temps(tmp_path) == [] and '"v": 1' in target.read_text()


def test_live_writer_temp_is_kept(tmp_path):
    target = tmp_path / "m.json"
    proc = child(f"""
import sys
from stepwise.io import atomic_path
with atomic_path({str(target)!r}) as tmp:
    tmp.write_text("from the child")
    print("ready", flush=True)
    sys.stdin.readline()
""")
    try:
        mine = temps(tmp_path)
        assert len(mine) == 1
        write_json({"v": "parent"}, target)  # a concurrent write of the same target
        assert temps(tmp_path) == mine  # the live child's temp file survives
        assert remove_stale_temps(target) == []
    finally:
        proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert target.read_text() == "from the child" and temps(tmp_path) == []


def test_temp_of_dead_pid_reused_by_a_newer_process_is_removed(tmp_path):
    if sio._process_start_time(os.getpid()) is None:
        pytest.skip("needs Linux /proc to tell a reused PID")
    target = tmp_path / "w.pt"
    stale = tmp_path / f".w.pt.{os.getpid()}@{sio._HOST}.abc_1234.tmp"  # our PID, but written before we started
    stale.write_bytes(b"old")
    long_ago = time.time() - 10 * 24 * 3600
    os.utime(stale, (long_ago, long_ago))
    fresh = tmp_path / f".w.pt.{os.getpid()}@{sio._HOST}.def_5678.tmp"  # ours and recent: a live write
    fresh.write_bytes(b"new")
    assert remove_stale_temps(target) == [stale]
    assert fresh.exists()


def test_unverifiable_temps_expire_by_age_only(tmp_path):
    target = tmp_path / "w.pt"
    other_host = tmp_path / ".w.pt.1@some-other-host.abcdefgh.tmp"
    legacy = tmp_path / ".w.pt.abcdefgh.tmp"  # written before temp names carried the PID
    unrelated = tmp_path / ".w.pt.extra.abcdefgh.tmp"  # the temp of a file named w.pt.extra
    for p in (other_host, legacy, unrelated):
        p.write_bytes(b"x")
    assert remove_stale_temps(target) == []
    old = time.time() - sio.STALE_TEMP_SECONDS - 60
    for p in (other_host, legacy, unrelated):
        os.utime(p, (old, old))
    assert sorted(remove_stale_temps(target)) == sorted([other_host, legacy])
    assert unrelated.exists()


# --- 3. exclusive lock on an output folder ------------------------------------------------------------------------


def test_exclusive_dir_lock_refuses_second_holder(tmp_path):
    out = tmp_path / "models" / "pretrain"
    proc = child(f"""
import sys
from stepwise.io import exclusive_dir_lock
with exclusive_dir_lock({str(out)!r}):
    print("ready", flush=True)
    sys.stdin.readline()
""")
    try:
        with pytest.raises(OutputLockedError) as e:
            with exclusive_dir_lock(out):
                pass
        msg = str(e.value)
        assert isinstance(e.value, StepwiseError) and "\n" not in msg
        assert f"{out} is being written by PID {proc.pid} " in msg and "wait for it or kill it" in msg
    finally:
        proc.kill()  # the kernel releases a dead holder's flock
        proc.wait()
    with exclusive_dir_lock(out) as lock:  # the dead holder's lock file is taken over
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(OutputLockedError, match=f"PID {os.getpid()}"):  # not re-entrant, even in one process
            with exclusive_dir_lock(out):
                pass
    assert not (out / ".lock").exists()
    with exclusive_dir_lock(out):  # released on exit: free again
        pass


def test_exclusive_dir_lock_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with exclusive_dir_lock(tmp_path):
            raise RuntimeError("boom")
    with exclusive_dir_lock(tmp_path):
        pass


# --- 4. full disk -------------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_enospc(obj, f):
    f.write(b"partial bytes")
    _enospc()


@pytest.mark.parametrize("where", ["torch.save", "fsync", "mkstemp"])
def test_disk_full_keeps_old_target_and_no_temp(tmp_path, monkeypatch, where):
    target = tmp_path / "ckpt" / "step_00000001.pt"
    save_torch({"format": "x/1", "v": 1}, target)
    before = target.read_bytes()
    if where == "torch.save":
        monkeypatch.setattr(sio.torch, "save", _half_then_enospc)
    elif where == "fsync":  # delayed allocation: the data is only refused when flushed
        monkeypatch.setattr(sio.os, "fsync", _enospc)
    else:  # no free inodes
        monkeypatch.setattr(sio.tempfile, "mkstemp", _enospc)
    with pytest.raises(DiskFullError) as e:
        save_torch({"format": "x/1", "v": 2}, target)
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {target} (") and " MiB free on /" in msg
    assert "\n" not in msg and isinstance(e.value, StepwiseError)
    assert target.read_bytes() == before and temps(target.parent) == []


def test_quota_exceeded_is_reported_like_a_full_disk(tmp_path, monkeypatch):
    def edquot(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(sio.os, "fsync", edquot)
    with pytest.raises(DiskFullError, match=f"disk quota exceeded writing {tmp_path / 'm.json'}"):
        write_json({"a": 1}, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists() and temps(tmp_path) == []


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(sio.os, "fsync", eio)
    with pytest.raises(OSError) as e:
        write_text("x", tmp_path / "t.txt")
    assert e.value.errno == errno.EIO and not isinstance(e.value, StepwiseError) and temps(tmp_path) == []


def test_disk_full_in_a_png_write(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepwise.visualise import save_figure

    monkeypatch.setattr(sio.os, "fsync", _enospc)
    fig, _ = plt.subplots()
    with pytest.raises(DiskFullError, match="fig.png"):
        save_figure(fig, tmp_path / "fig.png")
    assert list(tmp_path.iterdir()) == []


# --- 5. corrupt files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_torch_file_message(tmp_path, damage):
    path = tmp_path / "train.pt"
    save_torch({"format": "stepwise-data/1", "images": torch.zeros(50, 1, 8, 8, dtype=torch.uint8)}, path)
    data = path.read_bytes()
    path.write_bytes({"random": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(DataError) as e:
        load_torch(path, "stepwise-data/1", error=DataError, hint="Run `dvc repro prepare` to rebuild it.")
    msg = str(e.value)
    assert msg.startswith(f"{path}: cannot be read") and "truncated or corrupt" in msg
    assert msg.endswith("Run `dvc repro prepare` to rebuild it.") and "\n" not in msg
    assert "weights_only" not in msg and "trusted source" not in msg


class Foreign:
    pass


def test_foreign_pickle_is_refused_without_torch_advice(tmp_path):
    torch.save({"format": "stepwise-ckpt/1", "obj": Foreign()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as e:
        load_torch(tmp_path / "x.pt", "stepwise-ckpt/1")
    assert "not written by stepwise" in str(e.value) and "weights_only" not in str(e.value)
