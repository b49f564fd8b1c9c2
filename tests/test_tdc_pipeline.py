"""The TDC stages end to end on the ci preset: profile -> cluster -> finetune@i / continue_unified -> evaluate_tdc ->
consistency (arXiv 2312.13307, 2403.10348, 2404.07946), their MLflow runs, resumption and config errors."""
import itertools
import json
import math
import shutil
import sys

import pytest
import torch
import yaml
from conftest import run

from stepwise.config import parse
from stepwise.errors import ConfigError, StepwiseError
from stepwise.grouping import group_index, groups_from_dict, validate_groups
from stepwise.config import ClusterConfig, ConsistencyConfig, FinetuneConfig, TdcConfig
from stepwise.timestep_samplers import RangeRecorder, build_timestep_sampler

K, T, STEPS, BATCH = 2, 100, 5, 32  # the ci preset: tdc.num_groups, diffusion.T, tdc.finetune.steps, train.batch_size


@pytest.fixture
def tdc_repro(ci_repro):
    """The shared `dvc repro` of the whole pipeline on the ci preset, 2 groups (tests/conftest.py)."""
    return ci_repro


def read_json(path):
    return json.loads(path.read_text())


def test_groups_tile_timesteps(tdc_repro):
    dest, _ = tdc_repro
    record = read_json(dest / "outputs/groups.json")
    groups = groups_from_dict(record)
    assert record["T"] == T and record["num_groups"] == K and record["method"] == "dp"
    assert validate_groups(groups, T) == groups and groups[0][0] == 0 and groups[-1][1] == T
    assert (dest / "outputs/groups.png").stat().st_size > 0


def test_profile_outputs(tdc_repro):
    dest, _ = tdc_repro
    lines = (dest / "outputs/profile/profile.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 1 + 10  # tdc.profile.num_timesteps=10 in the ci preset
    assert {"t", "snr_db", "loss_mean", "loss_var", "convergence_speed", "rel_entropy_gauss", "rel_entropy_mc",
            "grad_sim_mean"} <= set(header)
    rows = [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
    assert all(r["loss_mean"] > 0 and r["loss_var"] >= 0 and 0 <= r["convergence_speed"] <= 1 for r in rows)
    assert all(a["snr_db"] > b["snr_db"] for a, b in itertools.pairwise(rows))
    sim = [[float(v) for v in line.split(",")[1:]] for line in (dest / "outputs/profile/similarity.csv")
           .read_text().splitlines()[1:]]
    S = torch.tensor(sim)
    assert S.shape == (10, 10) and torch.allclose(S, S.T) and torch.allclose(S.diagonal(), torch.ones(10))
    assert (dest / "outputs/profile/profile.png").stat().st_size > 0


def test_experts_trained_only_in_their_range(tdc_repro):
    dest, _ = tdc_repro
    groups = groups_from_dict(read_json(dest / "outputs/groups.json"))
    total = 0
    for i, (lo, hi) in enumerate(groups):
        m = read_json(dest / f"metrics/finetune_{i}.json")
        assert (m["group"], m["lo"], m["hi"]) == (i, lo, hi)
        assert lo <= m["t_min"] <= m["t_max"] < hi
        assert m["t_draws"] == m["images_seen"] == STEPS * BATCH
        assert m["train_flops"] == 6 * m["macs_per_forward"] * m["images_seen"] > 0
        meta = torch.load(dest / f"models/experts/{i}/model.pt", weights_only=True)["meta"]
        assert (meta["lo"], meta["hi"], meta["t_min"], meta["t_max"]) == (lo, hi, m["t_min"], m["t_max"])
        assert list((dest / f"models/experts/{i}/checkpoints").glob("step_*.pt"))
        total += m["images_seen"]
    base = read_json(dest / "metrics/continue_unified.json")
    assert base["images_seen"] == total == K * STEPS * BATCH and base["steps"] == K * STEPS
    assert base["lo"] == 0 and base["hi"] == T and 0 <= base["t_min"] <= base["t_max"] < T


def test_router_covers_every_timestep(tdc_repro):
    from stepwise.tdc import load_router

    dest, _ = tdc_repro
    router, diffusion, _, metas, _ = load_router(dest / "outputs/groups.json", dest / "models/experts",
                                                 dest / "models/unified/model.pt", K, use_ema=True)
    t = torch.arange(T)
    assert diffusion.T == T and bool(router.covers(t).all())
    idx = router.expert_index(t)
    assert bool((idx >= 0).all())  # every t goes to an expert, none to the fallback
    assert torch.equal(idx, group_index(t, groups_from_dict(read_json(dest / "outputs/groups.json"))))
    assert [(m["lo"], m["hi"]) for m in metas] == router.ranges


def test_evaluate_tdc_metrics(tdc_repro):
    dest, env = tdc_repro
    m = read_json(dest / "metrics/evaluate_tdc.json")
    for key in ("tdc.fid_featnet", "continued.fid_featnet", "unified.fid_featnet", "tdc.kid_featnet",
                "tdc.precision_featnet", "delta_tdc_vs_unified.fid_featnet", "delta_tdc_vs_continued.fid_featnet"):
        assert math.isfinite(m[key]), key
    assert m["unified.fid_featnet"] == read_json(dest / "metrics/evaluate.json")["fid_featnet"]
    assert m["expert_coverage"] == 1.0 and m["compute.matched"] == 1.0
    assert m["compute.tdc_finetune_images"] == m["compute.continued_images"] == K * STEPS * BATCH
    for name in ("tdc", "continued"):
        assert (dest / f"samples/{name}/grid.png").is_file()
        obj = torch.load(dest / f"samples/{name}/samples.pt", weights_only=True)
        assert obj["images"].shape == (64, 1, 16, 16) and obj["images"].dtype == torch.uint8
    assert "tdc.fid_featnet" in run(["dvc", "metrics", "show", "--json"], dest, env=env).stdout


def test_consistency_metrics(tdc_repro):
    dest, _ = tdc_repro
    m = read_json(dest / "metrics/consistency.json")
    assert m["num_samples"] == 16
    for pair in ("unified_vs_tdc", "unified_vs_continued", "tdc_vs_continued"):
        assert m[f"pair.{pair}.mse"] > 0 and -1 <= m[f"pair.{pair}.ssim"] < 1
        assert math.isfinite(m[f"pair.{pair}.feature_l2"])
        assert (dest / f"outputs/consistency/pair_{pair}.png").is_file()
    # split at s = 0 is the unified model compared with itself: identical samples
    assert m["split.unified_to_tdc.t0.mse"] == 0.0 and m["split.unified_to_tdc.t0.feature_l2"] == 0.0
    assert abs(m["split.unified_to_tdc.t0.ssim"] - 1.0) < 1e-12
    # the later the switch to the experts, the closer to the unified model's own samples
    assert m["split.unified_to_tdc.t50.mse"] <= m["split.unified_to_tdc.t100.mse"]
    assert (dest / "outputs/consistency/split.csv").read_text().splitlines()[0].startswith("pair,split_t,mse")
    assert read_json(dest / "models/consistency/extras.json")["models"] == {}


def test_mlflow_child_runs_under_one_parent(tdc_repro):
    import mlflow

    _, env = tdc_repro
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    parents = [r for r in runs if r.data.tags.get("stepwise.pipeline") == "workspace"]
    assert len(parents) == 1, [(p.data.tags, {r.data.tags.get("stage") for r in runs
                                              if r.data.tags.get("mlflow.parentRunId") == p.info.run_id})
                               for p in parents]
    assert parents[0].info.status == "FINISHED"  # no stage runs
    parent = parents[0].info.run_id
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert {"profile", "cluster", "finetune@0", "finetune@1", "continue_unified", "evaluate_tdc",
            "consistency"} <= set(children)
    for i in range(K):
        r = children[f"finetune@{i}"]
        assert r.info.status == "FINISHED" and r.data.tags["dvc_stage"] == f"finetune@{i}"
        assert r.data.tags["tdc.group"] == str(i) and r.data.tags["tdc.role"] == "expert"
        assert r.data.metrics["images_seen"] == STEPS * BATCH and "train_flops" in r.data.metrics
    assert children["continue_unified"].data.tags["tdc.group"] == "-1"
    assert "tdc.fid_featnet" in children["evaluate_tdc"].data.metrics
    assert "split.unified_to_tdc.t0.mse" in children["consistency"].data.metrics


def test_pipeline_is_up_to_date_after_repro(tdc_repro):
    dest, env = tdc_repro
    assert json.loads(run(["dvc", "status", "--json"], dest, env=env).stdout) == {}


def test_finetune_resumes_from_its_checkpoint(tdc_repro):
    """Rerunning an expert on a copy of its finished checkpoints resumes at the end, with its t-record intact."""
    dest, env = tdc_repro
    shutil.copytree(dest / "models/experts/1/checkpoints", dest / "models/resume_test/checkpoints")
    run([sys.executable, "-m", "stages.finetune", "--group", "1", "--out", "models/resume_test", "--metrics",
         "scratch/resume_test.json"], dest, env={**env, "STEPWISE_PIPELINE_RUN": "resume-test"})
    again, first = read_json(dest / "scratch/resume_test.json"), read_json(dest / "metrics/finetune_1.json")
    assert again["resumed_from_step"] == STEPS
    for key in ("t_min", "t_max", "t_draws", "t_distinct", "images_seen", "train_flops", "final_loss"):
        assert again[key] == first[key], key
    a = torch.load(dest / "models/resume_test/model.pt", weights_only=True)["ema_state_dict"]
    b = torch.load(dest / "models/experts/1/model.pt", weights_only=True)["ema_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_groups_not_covering_T_fail_in_one_line(tdc_repro):
    dest, env = tdc_repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["tdc"]["cluster"] = {"method": "manual", "boundaries": [0, 40, 90]}
    (dest / "bad.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.cluster", "--params", "bad.yaml", "--out", "outputs/bad.json"], dest,
               check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("stepwise cluster: error: tdc.cluster.boundaries=[0, 40, 90] must be 3 increasing integers from 0 to "
            "diffusion.T=100 (num_groups=2)") in proc.stderr
    assert not (dest / "outputs/bad.json").exists()


# ---- fast, in-process checks of the pieces the stages are made of -------------------------------------------------


def test_groups_list_must_match_num_groups():
    assert parse(TdcConfig, {"num_groups": 3, "groups_list": [0, 1, 2]}, "tdc").num_groups == 3
    with pytest.raises(ConfigError, match=r"tdc: groups_list=\[0, 1\] must be \[0, 1, 2\]"):
        parse(TdcConfig, {"num_groups": 3, "groups_list": [0, 1]}, "tdc")
    with pytest.raises(ConfigError, match="must be <= diffusion.T=2"):
        parse(TdcConfig, {"num_groups": 3, "groups_list": [0, 1, 2]}, "tdc").check_T(2)


def test_config_errors_are_one_clear_message():
    with pytest.raises(ConfigError, match="tdc.cluster: method='kmeans' is not valid"):
        parse(ClusterConfig, {"method": "kmeans"}, "tdc.cluster")
    with pytest.raises(ConfigError, match="method=manual needs boundaries"):
        parse(ClusterConfig, {"method": "manual"}, "tdc.cluster")
    with pytest.raises(ConfigError, match=r"pairs: unknown model\(s\) \['dit'\]"):
        parse(ConsistencyConfig, {"pairs": [["unified", "dit"]]}, "tdc.consistency")
    with pytest.raises(ConfigError, match=r"train: \['steps'\] cannot be overridden"):
        parse(FinetuneConfig, {"train": {"steps": 5}}, "tdc.finetune")
    fcfg = parse(FinetuneConfig, {"steps": 7, "train": {"lr": 1e-4, "timestep_sampler": "clts"}}, "tdc.finetune")
    tcfg = fcfg.train_config({"batch_size": 8, "lr": 1e-3, "eval_steps": [1000], "steps": 1000}, seed=3)
    assert (tcfg.steps, tcfg.lr, tcfg.batch_size, tcfg.seed, tcfg.timestep_sampler) == (7, 1e-4, 8, 3, "clts")
    assert parse(ConsistencyConfig, {"split_fractions": [0, 0.5, 1.0, 0.5]}, "c").split_timesteps(100) == [0, 50, 100]


def test_range_recorder_rejects_and_remembers():
    rec = RangeRecorder(build_timestep_sampler("uniform", 100, seed=0, t_range=(20, 40)), 20, 40)
    t, _ = rec.sample(64, 0)
    assert 20 <= int(t.min()) and int(t.max()) < 40 and rec.seen()["t_draws"] == 64
    restored = RangeRecorder(build_timestep_sampler("uniform", 100, seed=0, t_range=(20, 40)), 20, 40)
    restored.load_state_dict(rec.state_dict())
    assert restored.seen() == rec.seen() and torch.equal(restored.sample(8, 1)[0], rec.sample(8, 1)[0])
    leaky = RangeRecorder(build_timestep_sampler("uniform", 100, seed=0), 20, 40)  # sampler not restricted
    with pytest.raises(StepwiseError, match=r"outside the group's range \[20, 40\)"):
        leaky.sample(64, 0)


@pytest.mark.slow
def test_consistency_with_a_second_seed_model(tdc_repro):
    """tdc.consistency.extra_models trains a unified model from another seed and compares it pairwise."""
    dest, env = tdc_repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["tdc"]["consistency"].update({"extra_models": {"seed1": {"seed": 1}},
                                         "pairs": [["unified", "seed1"]], "split_pairs": [["unified", "seed1"]]})
    (dest / "extra.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "stages.consistency", "--params", "extra.yaml", "--extras", "models/extra_test",
         "--out", "outputs/extra_test", "--metrics", "scratch/extra_test.json"], dest,
        env={**env, "STEPWISE_PIPELINE_RUN": "extra-test"})
    m = read_json(dest / "scratch/extra_test.json")
    assert m["pair.unified_vs_seed1.mse"] > 0 and m["split.unified_to_seed1.t0.mse"] == 0.0
    assert (dest / "models/extra_test/seed1/model.pt").is_file()
    assert read_json(dest / "models/extra_test/extras.json")["models"]["seed1"]["seed"] == 1
