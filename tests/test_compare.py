"""The fair-comparison workflow as a user runs it: `dvc exp run` per strategy, then `python -m stages.compare`."""
import json

import pytest
import torch
from conftest import pipeline_copy, run


@pytest.mark.slow
def test_two_strategies_compared(tmp_path):
    dest = pipeline_copy(tmp_path / "repo", ["experiment=ci"])
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for strategy in ("uniform", "clts_md"):
        run(["dvc", "exp", "run", "-S", "experiment=ci", "-S", f"strategy={strategy}", "-S", "train.eval_steps=[10]",
             "-S", "eval.curve_samples=32"], dest, env=env, timeout=900)
    shown = run(["dvc", "exp", "show", "--json"], dest, env=env).stdout
    assert "curve_final_fid_featnet" not in shown and "fid_featnet" in shown
    assert sorted(p.parent.name for p in (dest / "reports/runs").rglob("*.json")) == ["clts_md", "uniform"]
    proc = run(["python", "-m", "stages.compare", "--out", "reports/cmp"], dest, env=env)
    assert "| clts_md |" in proc.stdout and "| uniform |" in proc.stdout
    result = json.loads((dest / "reports/cmp.json").read_text())
    assert [row[0] for row in result["strategies"]["uniform"]["mean_curve"]] == [10, 20]
    assert result["strategies"]["uniform"]["speedup"] == pytest.approx(1.0)
    assert (dest / "reports/cmp.png").stat().st_size > 1000


def _summaries(root, strategy, curves, ys=None, replicates=0, spread=1.0):
    """Run summaries of one strategy: one per seed curve, with `replicates` bootstrap replicates per point."""
    from stepwise.ledger import write_summary

    ys = ys or {"featnet_sha256": "f" * 64, "num_samples": 500, "sampler": "ddim", "steps": 25, "eta": None,
                "noise_seed": 0}
    for seed, curve in enumerate(curves):
        gen = torch.Generator().manual_seed(seed + 100)
        rows = [{"step": s, "fid": f, "fid_replicates": (f + spread * torch.randn(replicates, generator=gen)).tolist()}
                for s, f in curve]
        write_summary(strategy=strategy, seed=seed, curve=rows, ys=ys, settings={}, version=f"v{seed}", root=root)


def noisy(base, seeds=3, scale=1.0, noise=1.0):
    """`seeds` curves: base FIDs with each step's value multiplied by `scale`, plus seeded noise."""
    gen = torch.Generator().manual_seed(int(scale * 1000) + seeds)
    return [[(s, f * scale + noise * float(torch.randn(1, generator=gen))) for s, f in base] for _ in range(seeds)]


BASE = [(100, 80.0), (200, 50.0), (300, 38.0), (400, 32.0), (500, 28.0), (600, 26.0)]


def test_identical_strategies_are_not_resolved_and_a_planted_speedup_is(tmp_path, monkeypatch):
    """Pure noise (a copy of the baseline with other seeds) -> 'not resolved'; a strategy that reaches every FID in
    half the steps -> resolved, interval above 1."""
    from stages import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    _summaries(runs, "uniform", noisy(BASE), replicates=50)
    _summaries(runs, "copy", noisy(BASE, noise=1.0), replicates=50)
    fast = [(s // 2, f) for s, f in BASE] + [(s, 20.0 - s / 300) for s in (400, 500, 600)]
    _summaries(runs, "fast", noisy(sorted(dict(fast).items())), replicates=50)
    out = tmp_path / "cmp"
    assert compare.main(["--runs", str(runs), "--source", "ledger", "--boot", "300", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())["strategies"]
    assert result["copy"]["verdict"] == "not resolved" and result["copy"]["speedup_lo"] <= 1 <= result["copy"]["speedup_hi"]
    assert result["fast"]["verdict"] == "resolved" and result["fast"]["speedup_lo"] > 1
    assert len(result["fast"]["iters_to_target_per_seed"]) == 3
    assert "| fast | 3 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 1000


def test_compare_refuses_runs_with_different_yardsticks(tmp_path, monkeypatch, capsys):
    from stages import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    _summaries(runs, "uniform", noisy(BASE))
    other = {"featnet_sha256": "e" * 64, "num_samples": 1000, "sampler": "ddim", "steps": 25, "eta": None,
             "noise_seed": 0}
    _summaries(runs, "min_snr", noisy(BASE), ys=other)
    out = tmp_path / "cmp"
    assert compare.main(["--runs", str(runs), "--source", "ledger", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "different yardsticks" in err and "uniform/seed0" in err and "min_snr/seed0" in err and "\n" not in err
    assert not out.with_suffix(".json").exists()
    assert compare.main(["--runs", str(runs), "--source", "ledger", "--out", str(out), "--baseline", "min_snr",
                         "--yardstick", __import__("stepwise.ledger").ledger.yardstick_id(other)]) == 0


def test_compare_without_runs_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from stages import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert compare.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "cmp")]) == 2
    assert "no comparison runs found" in capsys.readouterr().err


def test_missing_prints_the_queue_commands_of_runs_not_done(tmp_path, monkeypatch, capsys):
    """A comparison built up over sittings: --missing names exactly the (strategy, seed) runs without a summary."""
    from stages import compare
    from stepwise.comparison import missing_runs, queue_commands

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    _summaries(runs, "uniform", noisy(BASE))
    assert compare.main(["--runs", str(runs), "--source", "ledger", "--missing"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    strategies = sorted(p.stem for p in (compare.REPO / "conf" / "strategy").glob("*.yaml"))
    assert len(lines) == len(strategies) - 1 and not any("strategy=uniform " in line for line in lines)
    assert "dvc exp run evaluate --queue -S experiment=compare -S strategy=min_snr -S 'train.seed=0,1,2'" in lines
    done = [{"strategy": "a", "seed": 0}, {"strategy": "a", "seed": 2}, {"strategy": "b", "seed": 1}]
    assert missing_runs(done, ["a", "b"], [0, 1, 2]) == {"a": [1], "b": [0, 2]}
    assert missing_runs(done, ["a"], [0, 2]) == {}
    assert queue_commands({"a": [1]}) == ["dvc exp run evaluate --queue -S experiment=compare -S strategy=a "
                                          "-S 'train.seed=1'"]
