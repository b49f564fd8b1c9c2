"""The real entry points on the shrunk config (experiment=ci): `dvc repro` end to end, MLflow runs, stage errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import pipeline_copy, run


@pytest.fixture
def repro(ci_repro):
    """The shared `dvc repro` of the ci preset (tests/conftest.py)."""
    return ci_repro


def test_outputs_and_metrics(repro):
    dest, env = repro
    for path in ("data/prepared/train.pt", "data/prepared/test.pt", "data/prepared/card.json", "models/featnet.pt",
                 "models/unified/model.pt", "samples/unified/grid.png", "plots/pretrain_loss.csv", "dvc.lock"):
        assert (dest / path).is_file(), path
    card = json.loads((dest / "data/prepared/card.json").read_text())
    assert card["splits"]["train"]["count"] == 512 and card["splits"]["train"]["shape"] == [1, 16, 16]
    metrics = json.loads((dest / "metrics/evaluate.json").read_text())
    assert math.isfinite(metrics["fid_featnet"]) and metrics["fid_featnet"] > 0
    assert {"kid_featnet", "precision_featnet", "recall_featnet"} <= set(metrics)
    assert not any(k.endswith("_inception") for k in metrics)  # eval.inception=off in the ci preset
    shown = run(["dvc", "metrics", "show", "--json"], dest, env=env).stdout
    assert "fid_featnet" in shown
    assert json.loads((dest / "metrics/pretrain.json").read_text())["images_seen"] == 20 * 32


def test_mlflow_parent_and_nested_runs(repro):
    import mlflow

    dest, env = repro
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("stepwise")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stepwise.pipeline") == "workspace"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"prepare", "featnet", "pretrain", "evaluate"} <= set(children)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True).stdout.strip()
    for stage, r in children.items():
        assert r.info.status == "FINISHED" and r.data.tags["git_sha"] == sha and r.data.tags["dvc_stage"] == stage
    assert "fid_featnet" in children["evaluate"].data.metrics
    history = client.get_metric_history(children["pretrain"].info.run_id, "loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert children["pretrain"].data.params["train.steps"] == "20"
    artifacts = [a.path for a in client.list_artifacts(children["evaluate"].info.run_id)]
    assert "grid.png" in artifacts


def test_eval_change_does_not_retrain(repro):
    dest, env = repro
    original = (dest / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["eval"]["num_samples"] = 32
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], dest, env=env).stdout)
    finally:
        (dest / "params.yaml").write_text(original)
    assert "evaluate" in status  # and stages downstream of it, but nothing that trains
    assert not {"prepare", "featnet", "pretrain", "continue_unified"} & set(status)
    assert not any(s.startswith("finetune@") for s in status)


def test_invalid_param_fails_fast_with_one_line(repro):
    dest, env = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["timestep_sampler"] = "bogus"
    (dest / "bad.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.pretrain", "--params", "bad.yaml", "--out", "models/bad"], dest,
               check=False, env=env)
    assert proc.returncode == 2
    assert "stepwise pretrain: error: train: timestep_sampler='bogus' is not valid; valid: [" in proc.stderr
    assert "Traceback" not in proc.stderr and not (dest / "models/bad").exists()


@pytest.mark.parametrize("stage,upstream,overrides,ckpts,metrics,steps", [
    ("pretrain", "prepare", ["train.steps=200", "train.ckpt_every=10"], "models/unified/checkpoints",
     "metrics/pretrain.json", 200),
    pytest.param("finetune@0", "cluster", ["tdc.finetune.steps=200", "train.ckpt_every=10"],
                 "models/experts/0/checkpoints", "metrics/finetune_0.json", 200,
                 marks=pytest.mark.slow),  # the same resume code as pretrain's; ~60 s, kept out of the CI budget
])
def test_kill_9_then_rerun_resumes(tmp_path, stage, upstream, overrides, ckpts, metrics, steps):
    """SIGKILL `dvc repro <stage>` mid-run; rerunning the same command continues from the last checkpoint."""
    dest = pipeline_copy(tmp_path / "repo", ["experiment=ci", *overrides])
    run(["dvc", "repro", upstream], dest)
    env = {**os.environ, "PYTHONPATH": str(dest)}
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=dest, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = dest / ckpts
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpts.glob("step_*.pt"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.stem.split("_")[1]) for p in ckpts.glob("step_*.pt"))
    assert 20 <= killed_at < steps
    run(["dvc", "repro", "--single-item", stage], dest)
    result = json.loads((dest / metrics).read_text())
    assert result["resumed_from_step"] >= killed_at and result["images_seen"] == steps * 32
    if stage == "pretrain":
        rows = (dest / "plots/pretrain_loss.csv").read_text().splitlines()
        assert len(rows) == 1 + steps // 5  # the history is complete across the kill
        # and identical to an uninterrupted run's: same batches, timesteps and losses after the resume
        clean = pipeline_copy(tmp_path / "clean", ["experiment=ci", *overrides])
        run(["dvc", "repro", "--single-item", "prepare"], clean)
        run(["dvc", "repro", "--single-item", stage], clean)
        assert (clean / "plots/pretrain_loss.csv").read_text().splitlines() == rows
        resumed = torch.load(dest / "models/unified/model.pt", weights_only=True)["ema_state_dict"]
        uninterrupted = torch.load(clean / "models/unified/model.pt", weights_only=True)["ema_state_dict"]
        assert all(torch.allclose(resumed[k], uninterrupted[k], rtol=0, atol=1e-6) for k in resumed)


def test_unreachable_tracking_server_fails_before_work(repro):
    dest, env = repro
    proc = run([sys.executable, "-m", "stages.pretrain", "--out", "models/other"], dest, check=False,
               env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and "MLflow tracking server http://127.0.0.1:9 is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr and not (dest / "models/other").exists()



def test_corrupt_featnet_fails_before_sampling(repro):
    dest, env = repro
    featnet = dest / "models/featnet.pt"
    good = featnet.read_bytes()
    featnet.write_bytes(good[: len(good) // 3])
    try:
        proc = run([sys.executable, "-m", "stages.evaluate", "--out", "samples/x", "--metrics", "metrics/x.json",
                    "--curve", "plots/x.csv"], dest, check=False, env=env)
    finally:
        featnet.write_bytes(good)
    assert proc.returncode == 2 and "featnet.pt: cannot be read" in proc.stderr and "dvc repro featnet" in proc.stderr
    assert not (dest / "samples/x").exists() and not (dest / "metrics/x.json").exists()


def test_pretrain_data_parallel_via_config(repro):
    """train.nproc=2 relaunches the stage under torchrun (gloo on CPU); rank 0 writes the outputs and MLflow run."""
    dest, env = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["nproc"] = 2
    (dest / "ddp.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "stages.pretrain", "--params", "ddp.yaml", "--out", "models/ddp", "--metrics",
         "scratch/ddp.json", "--plot", "scratch/ddp.csv", "--bin-plots", "scratch/ddp_bins"], dest,
        env={**env, "OMP_NUM_THREADS": "1", "STEPWISE_PIPELINE_RUN": "ddp-test"})
    metrics = json.loads((dest / "scratch/ddp.json").read_text())
    assert metrics["images_seen"] == 20 * 32
    ckpt = sorted((dest / "models/ddp/checkpoints").glob("step_*.pt"))[-1]
    assert torch.load(ckpt, weights_only=True)["world_size"] == 2


def test_checkpoints_from_before_seeded_init_are_not_resumed():
    """run_fingerprint covers the weight-init stream: a checkpoint fingerprinted the pre-seeding way never matches."""
    from dataclasses import asdict, replace

    from stepwise.checkpoint import RESUME_NEUTRAL, fingerprint
    from stepwise.training import run_fingerprint
    from stepwise.config import TrainConfig

    model, diffusion, tcfg = {"name": "unet"}, {"T": 1000}, TrainConfig()
    old = fingerprint(model, diffusion, {k: v for k, v in asdict(tcfg).items() if k not in RESUME_NEUTRAL}, "sha")
    new = run_fingerprint(model, diffusion, tcfg, "sha")
    assert new != old and new == run_fingerprint(model, diffusion, tcfg, "sha")
    assert run_fingerprint(model, diffusion, replace(tcfg, seed=1), "sha") != new
