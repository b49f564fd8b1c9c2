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
