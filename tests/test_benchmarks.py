"""Benchmark scripts as a user runs them, on the shared ci pipeline run."""
import json

from conftest import REPO, run


def test_fid_noise_measures_spread_over_seeds(ci_repro, tmp_path):
    repo, env = ci_repro
    out = tmp_path / "noise.json"
    run(["python", str(REPO / "benchmarks/fid_noise.py"), "--samples", "16", "--seeds", "0", "1", "--steps", "4",
         "--json", str(out)], repo, env=env)
    result = json.loads(out.read_text())
    a, b = result["fid_featnet"]
    assert a != b and result["std"] > 0 and result["range"] == abs(a - b)


def test_fid_noise_bad_inputs_fail_before_sampling(ci_repro, tmp_path):
    repo, env = ci_repro
    proc = run(["python", str(REPO / "benchmarks/fid_noise.py"), "--model", str(tmp_path / "missing.pt")], repo,
               env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.pt" in proc.stderr
    proc = run(["python", str(REPO / "benchmarks/fid_noise.py"), "--seeds", "0"], repo, env=env, check=False)
    assert proc.returncode == 2 and "at least two --seeds" in proc.stderr
