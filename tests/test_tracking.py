"""MLflow bookkeeping (stepwise/tracking.py): parent per pipeline version, stage statuses, kills, bad URIs."""
import os
import signal
import subprocess
import sys
import time

import pytest

from stepwise.errors import StepwiseError
from stepwise.tracking import EXPERIMENT, stage_run, tracking_uri

from conftest import REPO


def _client():
    import mlflow

    client = mlflow.MlflowClient()
    return client, client.get_experiment_by_name(EXPERIMENT).experiment_id


def _parents(client, exp_id):
    return client.search_runs([exp_id], "tags.`stepwise.pipeline` = 'workspace'")


def test_failed_stage_marks_runs_failed_and_a_rerun_rejoins():
    params = {"train": {"lr": 1}}
    with pytest.raises(StepwiseError):
        with stage_run("pretrain", params, params) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            raise StepwiseError("boom")
    client, exp_id = _client()
    (run_,) = client.search_runs([exp_id], "tags.stage = 'pretrain'")
    assert run_.info.status == "FAILED" and run_.data.metrics["loss"] == 1.0
    (parent,) = _parents(client, exp_id)
    assert parent.info.status == "FAILED"
    with stage_run("pretrain", params, params):  # the rerun joins the same parent run
        assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    (again,) = _parents(client, exp_id)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"


def test_parent_is_per_pipeline_version_not_per_stage_order():
    """Any stage, in any order, joins the parent of the same params; other params start a new parent."""
    a, b = {"train": {"lr": 1}}, {"train": {"lr": 2}}
    for stage in ("consistency", "prepare", "evaluate"):
        with stage_run(stage, a, {}):
            pass
    client, exp_id = _client()
    (parent,) = _parents(client, exp_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["consistency", "evaluate", "prepare"]
    with stage_run("prepare", b, {}):
        pass
    assert len(_parents(client, exp_id)) == 2


def test_stale_run_of_a_killed_process_is_closed_by_the_rerun(tmp_path):
    """A stage run left RUNNING by SIGKILL (its PID is dead) is marked KILLED when the stage runs again."""
    params = {"train": {"lr": 1}}
    code = ("import os, time\nfrom stepwise.tracking import stage_run\n"
            "with stage_run('pretrain', {'train': {'lr': 1}}, {}):\n"
            "    open(os.environ['READY'], 'w').close()\n    time.sleep(60)\n")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "READY": str(ready)})
    for _ in range(1800):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert ready.exists(), "the stage process did not open its run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client, exp_id = _client()
    (stale,) = client.search_runs([exp_id], "tags.stage = 'pretrain'")
    assert stale.info.status == "RUNNING"
    with stage_run("pretrain", params, {}):
        pass
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    (parent,) = _parents(client, exp_id)
    assert parent.info.status == "FINISHED"


def test_sigterm_marks_the_stage_run_killed(tmp_path):
    code = ("import os, time\nfrom stepwise.tracking import stage_run\n"
            "with stage_run('evaluate', {}, {}):\n"
            "    open(os.environ['READY'], 'w').close()\n    time.sleep(60)\n")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "READY": str(ready)})
    for _ in range(1800):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert ready.exists(), "the stage process did not open its run"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    client, exp_id = _client()
    (run_,) = client.search_runs([exp_id], "tags.stage = 'evaluate'")
    assert run_.info.status == "KILLED"


def test_scheme_less_tracking_uri_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlflow.db")
    with pytest.raises(StepwiseError, match="has no scheme"):
        tracking_uri()


def test_headline_metrics_and_tags_go_on_the_parent_run():
    with stage_run("report", {"a": 1}, {}) as tracker:
        tracker.log_parent_metrics({"unified/fid_featnet": 40.1, "delta.fid": -1.5})
        tracker.set_parent_tags({"verdict.tdc": "not resolved"})
    client, exp_id = _client()
    (parent,) = _parents(client, exp_id)
    assert parent.data.metrics == {"unified.fid_featnet": 40.1, "delta.fid": -1.5}
    assert parent.data.tags["verdict.tdc"] == "not resolved"


def test_denoiser_logged_as_mlflow_model_loads_back_safely(tmp_path):
    """A model file logged with log_denoiser appears as a logged model and loads back with weights_only."""
    import torch

    from stepwise.artifacts import save_model
    from stepwise.diffusion import Diffusion
    from stepwise.mlflow_model import load_logged_denoiser
    from stepwise.models import build_model

    cfg = {"name": "unet", "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": []}
    model = build_model(cfg, 8, 1)
    save_model(tmp_path / "model.pt", model_cfg=cfg, diffusion_cfg={"schedule": "linear", "T": 10}, image_shape=(1, 8, 8),
               state_dict=model.state_dict(), ema_state_dict=model.state_dict(),
               diffusion_state=Diffusion(T=10).state_dict(), meta={"steps": 1})
    with stage_run("pretrain", {}, {}) as tracker:
        model_id = tracker.log_denoiser(tmp_path / "model.pt", "unified", {"final_loss": 0.5})
    assert model_id
    loaded, diffusion, shape, meta = load_logged_denoiser(f"models:/{model_id}")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 5])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model.eval()(x, t))
    assert shape == (1, 8, 8) and meta == {"steps": 1} and diffusion.T == 10
