"""Throughput benchmarks against diffusers, run as a user runs them, at a tiny size: JSON fields, matched models."""
import json
import sys

import pytest

from conftest import REPO, run

pytest.importorskip("diffusers")
sys.path.insert(0, str(REPO / "benchmarks"))
import sample_throughput  # noqa: E402
import train_throughput  # noqa: E402

TINY = ["--devices", "cpu", "--modes", "eager", "--rounds", "2", "--batch-size", "4", "--base-channels", "8"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def bench(script: str, args: list[str], tmp_path, check: bool = True):
    return run(["python", str(REPO / "benchmarks" / script), *args], REPO, env=ENV, check=check, timeout=120)


def check_common(result: dict) -> None:
    params = result["params"]
    assert abs(params["diffusers"] - params["stepwise"]) / params["stepwise"] <= 0.05
    assert result["params_rel_diff"] <= 0.05
    assert result["banned_imports"] == []
    fs = result["flops_per_step"]
    assert fs["stepwise"] > 0 and 0.5 < fs["diffusers"] / fs["stepwise"] < 2
    env = result["environment"]
    assert env["threads"] == 1 and len(env["loadavg_start"]) == 3 and "diffusers" in env
    for row in result["results"]:
        assert row["device"] == "cpu" and row["mode"] == "eager" and row["dtype"] == "float32"
        assert row["peak_flop_s"] > 0 and row["peak_flop_s_cpu_time"] > 0
        for name in ("stepwise", "diffusers"):
            e = row[name]
            s = e["img_s"]
            assert 0 < s["min"] <= s["median"] <= s["max"] and len(s["values"]) == result["rounds"]
            assert len(e["cpu_img_s"]["values"]) == result["rounds"]
            assert e["flop_s"] == pytest.approx(s["median"] * e["flops_per_image"])
            assert e["peak_fraction"] == pytest.approx(e["flop_s"] / row["peak_flop_s"])
            assert e["cpu_peak_fraction"] == pytest.approx(e["cpu_flop_s"] / row["peak_flop_s_cpu_time"])
            assert e["first_call_s"] > 0
        a, b = row["stepwise"]["img_s"]["values"], row["diffusers"]["img_s"]["values"]
        assert row["ratio"]["values"] == pytest.approx([x / y for x, y in zip(a, b)])
        assert row["ratio_of_medians"] > 0 and row["cpu_time_ratio"]["median"] > 0
        for r in (row["ratio"], row["cpu_time_ratio"]):
            assert r["min"] <= r["ci95"][0] <= r["median"] <= r["ci95"][1] <= r["max"]


@pytest.mark.timeout(120)
def test_train_throughput_writes_matched_measurements(tmp_path):
    out = tmp_path / "train.json"
    prof = tmp_path / "profile.txt"
    proc = bench("train_throughput.py", [*TINY, "--steps", "2", "--warmup", "1", "--json", str(out), "--profile",
                                         str(prof)], tmp_path)
    assert "top operators by self time" in prof.read_text() and "aten::" in prof.read_text()  # torch.profiler's table
    result = json.loads(out.read_text())
    check_common(result)
    assert result["benchmark"] == "train_throughput" and result["batch_size"] == 4 and result["steps_per_round"] == 2
    assert result["results"][0]["peak_source"] == "matmul probe"
    for name in ("stepwise", "diffusers"):
        e = result["results"][0][name]
        assert e["flops_per_step"] == pytest.approx(e["flops_per_image"] * 4)
        assert result["flops_per_step"][name] == e["flops_per_step"]
    assert "stepwise/diffusers" in proc.stdout and "parameters: stepwise" in proc.stdout


@pytest.mark.timeout(120)
def test_sample_throughput_writes_one_row_per_step_count(tmp_path):
    out = tmp_path / "sample.json"
    bench("sample_throughput.py", [*TINY, "--steps", "2", "3", "--peak-tflops", "0.1", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    check_common(result)
    rows = result["results"]
    assert [r["steps"] for r in rows] == [2, 3] and all(r["peak_flop_s"] == 1e11 for r in rows)
    for name in ("stepwise", "diffusers"):  # a run of S steps evaluates the denoiser S times
        assert rows[1][name]["flops_per_image"] == pytest.approx(1.5 * rows[0][name]["flops_per_image"])
        assert rows[0][name]["flops_per_image"] == pytest.approx(2 * result["flops_per_step"][name] / 4)


def test_bad_argument_fails_in_one_line_before_any_work(tmp_path):
    proc = bench("train_throughput.py", ["--batch-size", "0"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == "train_throughput: error: --batch-size=0 must be >= 1\n"
    assert proc.stdout == ""


@pytest.mark.parametrize("module, args, message", [
    (train_throughput, ["--rounds", "0"], "--rounds=0"),
    (train_throughput, ["--steps", "0"], "--steps=0"),
    (train_throughput, ["--warmup", "-1"], "--warmup=-1"),
    (train_throughput, ["--devices", "tpu"], "invalid choice"),
    (train_throughput, ["--peak-tflops", "-1"], "--peak-tflops"),
    (train_throughput, ["--threads", "0"], "--threads=0"),
    (train_throughput, ["--image-size", "30"], "divisible by 4"),
    (train_throughput, ["--base-channels", "4"], "head_dim"),
    (sample_throughput, ["--steps", "0"], "--steps 0"),
    (sample_throughput, ["--steps", "25", "5000"], "T=1000"),
    (sample_throughput, ["--modes", "slow"], "invalid choice"),
    (sample_throughput, ["--batch-size", "x"], "invalid int"),
])
def test_bad_arguments_fail_in_one_line(module, args, message, capsys):
    prog = module.__name__
    try:
        code = train_throughput.run_main(module.main, prog, args)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and message in err, err
    assert out == ""
