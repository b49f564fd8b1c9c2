"""The fair-comparison workflow as a user runs it: `dvc exp run` per strategy, then `python -m stages.compare`."""
import json

import pytest
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
    proc = run(["python", "-m", "stages.compare", "--out", "reports/cmp"], dest, env=env)
    assert "| clts_md |" in proc.stdout and "| uniform |" in proc.stdout
    result = json.loads((dest / "reports/cmp.json").read_text())
    assert [s for s, _ in result["curves"]["uniform"]] == [10, 20]
    assert result["result"]["uniform"]["speedup"] == pytest.approx(1.0)
    assert (dest / "reports/cmp.png").stat().st_size > 1000


def _log_strategy(client, exp_id, strategy, curve):
    """A finished pipeline parent (param comparison.strategy) with an `evaluate` child that logged an FID curve."""
    parent = client.create_run(exp_id, tags={"stepwise.pipeline": strategy}).info.run_id
    client.log_param(parent, "comparison.strategy", strategy)
    child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "stage": "evaluate"}).info.run_id
    for step, fid in curve:
        client.log_metric(child, "curve_fid_featnet", fid, step=step)
    client.set_terminated(child, "FINISHED")


def test_compare_reads_mlflow_and_writes_report(tmp_path, monkeypatch):
    import mlflow

    from stages import compare
    from stepwise.tracking import EXPERIMENT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "reports" / "cmp"
    assert compare.main(["--out", str(out)]) == 2  # no experiment yet: one clear error, no report
    assert not out.with_suffix(".md").exists()
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "art").as_uri())
    _log_strategy(client, exp_id, "uniform", [(100, 80.0), (200, 40.0), (400, 20.0)])
    _log_strategy(client, exp_id, "clts_md", [(100, 60.0), (200, 20.0), (400, 15.0)])
    assert compare.main(["--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["result"]["clts_md"]["speedup"] == pytest.approx(2.0)  # reaches 20 at step 200 of the baseline's 400
    assert "| clts_md | 15.0000 | 200 | 2.00x |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000
