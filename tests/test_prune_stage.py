"""The TDC pruning stages end to end on the ci preset: prune@i (progressive budget, proxy search with a persistent
memory bank, fine-tune) -> evaluate_pruned (arXiv 2312.13307; methods-notes checklist 13-15)."""
import json
import math
import sys

import pytest
import torch
import yaml
from conftest import pipeline_copy, run

from stepwise.config import parse
from stepwise.errors import ConfigError
from stepwise.config import PruneConfig, PruneEvalConfig

torch.set_num_threads(1)  # tiny models; the box is shared
K, T, RES = 2, 100, 16  # the ci preset: tdc.num_groups, diffusion.T, data.image_size
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pruned_repro(tmp_path_factory):
    """`dvc repro evaluate_pruned` (ci preset, 2 groups) in a temp git+DVC copy with its own MLflow store."""
    root = tmp_path_factory.mktemp("prune")
    dest = pipeline_copy(root / "repo", ["experiment=ci"])
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    run(["dvc", "repro", "evaluate_pruned"], dest, env=env, timeout=900)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    return dest, env, parse(PruneConfig, params["tdc"]["prune"], "tdc.prune")


def read_json(path):
    return json.loads(path.read_text())


def test_budgets_are_progressive_and_met(pruned_repro):
    from stepwise.pruning import count_macs, example_inputs, progressive_budgets
    from stepwise.pruning.model_file import load_pruned as load_model

    dest, _, pcfg = pruned_repro
    metrics = [read_json(dest / f"metrics/prune_{i}.json") for i in range(K)]
    full = metrics[0]["full_macs"]
    assert [m["budget_macs"] for m in metrics] == progressive_budgets(full, K, pcfg.k, pcfg.direction)
    assert metrics[0]["budget_macs"] == full and metrics[0]["searched"] == 0.0  # rank N (low t) keeps F
    assert metrics[1]["budget_macs"] == pytest.approx((1 + pcfg.k) / 2 * full) and metrics[1]["searched"] == 1.0
    for i, m in enumerate(metrics):
        assert m["macs"] <= m["budget_macs"] * (1 + pcfg.tol)
        assert m["macs"] >= m["budget_macs"] * (1 - 0.1), "well below the budget: the fit wasted capacity"
        model, _, _, meta = load_model(dest / f"models/pruned/{i}/model.pt")
        assert count_macs(model, example_inputs(1, RES)) == m["macs"] == meta["macs_per_forward"]
        assert sum(p.numel() for p in model.parameters()) == m["params"]
    assert metrics[1]["params"] < metrics[1]["full_params"] and metrics[1]["pruned_groups"] > 0


def test_pruned_models_reload_weights_only_and_keep_shapes(pruned_repro):
    from stepwise.pruning.model_file import PRUNED_FORMAT
    from stepwise.pruning.model_file import load_pruned as load_model

    dest, _, _ = pruned_repro
    groups = read_json(dest / "outputs/groups.json")["groups"]
    x = torch.randn(3, 1, RES, RES)
    for i in range(K):
        raw = torch.load(dest / f"models/pruned/{i}/model.pt", weights_only=True)
        spec = raw["meta"]["pruning"]
        assert spec["format"] == PRUNED_FORMAT and raw["model"]["name"] == "unet"
        model, diffusion, shape, meta = load_model(dest / f"models/pruned/{i}/model.pt")
        expert, _, _, _ = load_model(dest / f"models/experts/{i}/model.pt", use_ema=True)
        assert shape == (1, RES, RES) and (meta["lo"], meta["hi"]) == (groups[i]["lo"], groups[i]["hi"])
        t = torch.tensor([meta["lo"], (meta["lo"] + meta["hi"]) // 2, meta["hi"] - 1])
        with torch.no_grad():
            y = model(x, t)
        assert y.shape == expert(x, t).shape == x.shape and bool(torch.isfinite(y).all())
        raw_model, _, _, _ = load_model(dest / f"models/pruned/{i}/model.pt", use_ema=False)
        assert raw_model(x, t).shape == x.shape
        if meta["searched"]:
            assert meta["lo"] <= meta["t_min"] <= meta["t_max"] < meta["hi"]  # fine-tuned on its range only
        else:  # the full-budget expert is kept as it is
            source = torch.load(dest / f"models/experts/{i}/model.pt", weights_only=True)
            assert all(torch.equal(raw["ema_state_dict"][k], v) for k, v in source["ema_state_dict"].items())
            assert meta["steps"] == 0 and spec["ratios"] == {}


def test_bank_persists_and_every_candidate_respects_the_budget(pruned_repro):
    dest, _, pcfg = pruned_repro
    m = read_json(dest / "metrics/prune_1.json")
    bank = read_json(dest / "models/pruned/1/bank.json")
    assert [e["round"] for e in bank["rounds"]] == list(range(pcfg.rounds)) and m["rounds_run_this_run"] == pcfg.rounds
    assert bank["meta"]["importance"] == pcfg.importance and bank["meta"]["gradients"]["t_range"] == [m["lo"], m["hi"]]
    for e in bank["rounds"]:
        assert e["macs"] <= m["budget_macs"] * (1 + pcfg.tol)
        assert e["score"] is None or math.isfinite(e["score"])
    scored = [e for e in bank["rounds"] if e["score"] is not None]
    assert m["best_round"] == min(scored, key=lambda e: (e["score"], e["round"]))["round"]
    assert read_json(dest / "models/pruned/1/search.json")["group"] == 1
    curve = (dest / "plots/prune_search/1.csv").read_text().splitlines()
    assert curve[0].startswith("round,proposer,score,best_score") and len(curve) == 1 + pcfg.rounds
    assert (dest / "plots/prune_search/1.png").stat().st_size > 0
    assert read_json(dest / "models/pruned/0/bank.json")["rounds"] == []  # the full-budget expert is not searched


def test_evaluate_pruned_metrics(pruned_repro):
    dest, env, _ = pruned_repro
    m = read_json(dest / "metrics/evaluate_pruned.json")
    for name in ("unified", "tdc", "pruned"):
        assert math.isfinite(m[f"{name}.fid_featnet"]) and m[f"{name}.images_per_second"] > 0
        assert m[f"{name}.macs_per_sample"] > 0
    assert m["pruned.macs_per_sample"] < m["unified.macs_per_sample"] == m["tdc.macs_per_sample"]
    assert m["macs_saving_vs_unified"] == pytest.approx(1 - m["pruned.macs_per_sample"] / m["unified.macs_per_sample"])
    assert m["unified.fid_featnet"] == read_json(dest / "metrics/evaluate.json")["fid_featnet"]  # reused
    assert m["tdc.fid_featnet"] == read_json(dest / "metrics/evaluate_tdc.json")["tdc.fid_featnet"]
    assert m["unified.scores_reused"] == m["tdc.scores_reused"] == 1.0
    assert m["goal.fid_delta"] == m["pruned.fid_featnet"] - m["unified.fid_featnet"]
    assert m["goal.met"] == float(m["goal.macs_saving_vs_unified"] >= 0.4 and m["goal.fid_delta"] <= 0)
    steps = [m[f"expert_{i}.steps_owned"] for i in range(K)]
    assert sum(steps) == m["sampling_steps"] and steps[1] > 0
    rows = (dest / "plots/prune_macs_trajectory.csv").read_text().splitlines()
    assert rows[0] == "step,t,unified,tdc,pruned" and len(rows) == 1 + m["sampling_steps"]
    assert sum(float(r.split(",")[4]) for r in rows[1:]) == pytest.approx(m["pruned.macs_per_sample"])
    obj = torch.load(dest / "samples/pruned/samples.pt", weights_only=True)
    assert obj["images"].shape == (64, 1, RES, RES) and obj["images"].dtype == torch.uint8


def test_mlflow_child_runs(pruned_repro):
    import mlflow

    _, env, _ = pruned_repro
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    children = {r.data.tags.get("stage"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    for i in range(K):
        r = children[f"prune@{i}"]
        assert r.info.status == "FINISHED" and r.data.tags["tdc.role"] == "pruned_expert"
        assert r.data.tags["dvc_stage"] == f"prune@{i}" and "macs" in r.data.metrics
    bank = read_json(pruned_repro[0] / "models/pruned/1/bank.json")["rounds"]
    history = client.get_metric_history(children["prune@1"].info.run_id, "search_score")
    assert sorted(h.step for h in history) == [e["round"] for e in bank if e["score"] is not None]
    assert "goal.macs_saving_vs_unified" in children["evaluate_pruned"].data.metrics


def test_rerun_after_deleting_the_model_resumes_without_redoing_rounds(pruned_repro):
    """A killed/rerun prune@1 reuses the persistent bank (no round redone) and the final fine-tune checkpoint."""
    dest, env, pcfg = pruned_repro
    before = torch.load(dest / "models/pruned/1/model.pt", weights_only=True)["ema_state_dict"]
    bank = (dest / "models/pruned/1/bank.json").read_text()
    (dest / "models/pruned/1/model.pt").unlink()
    run(["dvc", "repro", "prune@1"], dest, env=env)
    m = read_json(dest / "metrics/prune_1.json")
    assert m["rounds_run_this_run"] == 0 and m["rounds_resumed"] == pcfg.rounds
    assert m["resumed_from_step"] == pcfg.finetune_steps
    assert (dest / "models/pruned/1/bank.json").read_text() == bank
    after = torch.load(dest / "models/pruned/1/model.pt", weights_only=True)["ema_state_dict"]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_group_fails_in_one_line(pruned_repro):
    dest, env, _ = pruned_repro
    proc = run([sys.executable, "-m", "stages.prune", "--group", "5", "--out", "models/bad", "--curve", "bad.csv",
                "--curve-png", "bad.png", "--metrics", "metrics/bad.json"], dest, env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stepwise prune: error: --group 5 is not a group index: tdc.num_groups=2" in proc.stderr


# ---- fast, in-process checks --------------------------------------------------------------------------------------


def test_stale_bank_is_discarded(tmp_path):
    from stepwise.pruning.expert import prepare_bank

    bank, ident = tmp_path / "bank.json", tmp_path / "search.json"
    assert prepare_bank(bank, ident, {"fingerprint": "a"}) == 0 and json.loads(ident.read_text())["fingerprint"] == "a"
    bank.write_text(json.dumps({"format": "stepwise-pruning-bank/1", "meta": {}, "rounds": [{}, {}]}))
    assert prepare_bank(bank, ident, {"fingerprint": "a"}) == 2  # same search: kept, resumed
    assert prepare_bank(bank, ident, {"fingerprint": "b"}) == 0 and not bank.exists()  # another search: discarded
    bank.write_text("{}")
    ident.unlink()
    assert prepare_bank(bank, ident, {"fingerprint": "b"}) == 0 and not bank.exists()  # no identity: discarded


@pytest.mark.parametrize("section, match", [
    ({"k": 0}, r"tdc.prune: k=0.0 must lie in \(0, 1\]"),
    ({"k": 1.5}, r"k=1.5 must lie in \(0, 1\]"),
    ({"direction": "middle"}, "direction='middle' is not valid"),
    ({"importance": "hessian"}, "importance='hessian' is not valid"),
    ({"proposer": "gpt4"}, "proposer='gpt4' is not valid"),
    ({"rounds": 0}, "rounds=0 must be > 0"),
    ({"tol": 0}, r"tol=0.0 must lie in \(0, 1\)"),
    ({"proxy_batch_size": 64, "proxy_images": 32}, "proxy_batch_size=64 must be <= proxy_images=32"),
    ({"train": {"steps": 3}}, r"train: \['steps'\] cannot be overridden"),
    ({"ignored": [3]}, "ignored=\\[3\\] must be a list of module names"),
    ({"budget": 1}, r"unknown key\(s\) \['budget'\]"),
])
def test_prune_config_errors(section, match):
    with pytest.raises(ConfigError, match=match):
        parse(PruneConfig, section, "tdc.prune")


def test_prune_config_train_and_identity():
    pcfg = parse(PruneConfig, {"finetune_steps": 7, "train": {"lr": 1e-4}}, "tdc.prune")
    tcfg = pcfg.train_config({"batch_size": 8, "lr": 1e-3, "eval_steps": [1000], "steps": 1000}, seed=3)
    assert (tcfg.steps, tcfg.lr, tcfg.batch_size, tcfg.seed, tcfg.eval_steps) == (7, 1e-4, 8, 3, [])
    settings = pcfg.search_settings()
    assert "rounds" not in settings and "finetune_steps" not in settings and settings["importance"] == "diff_pruning"
    with pytest.raises(ConfigError, match="throughput_repeats=0 must be > 0"):
        parse(PruneEvalConfig, {"throughput_repeats": 0}, "tdc.prune_eval")


def test_pruned_file_round_trip_is_exact(tmp_path):
    """save_model + meta['pruning'] -> load_pruned rebuilds the same function; a foreign record, ratios that do not
    fit, pruned weights without a record, or a pruned file loaded as a plain one fail clearly."""
    from stepwise.artifacts import load_denoiser, save_model
    from stepwise.pruning.model_file import load_pruned as load_model
    from stepwise.diffusion import Diffusion
    from stepwise.errors import CheckpointError
    from stepwise.models import build_model
    from stepwise.pruning import count_macs, example_inputs, prune_to_budget
    from stepwise.pruning.model_file import PRUNED_FORMAT, pruning_record

    cfg = {"name": "unet", "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
           "head_dim": 8}
    inputs = example_inputs(1, RES)
    model = build_model(cfg, RES, 1)
    full = count_macs(model, inputs)
    pruned, ratios, macs = prune_to_budget(model, 0.5 * full, inputs, "magnitude")
    diffusion = Diffusion("linear", T)

    def save(name, meta):
        save_model(tmp_path / name, model_cfg=cfg, diffusion_cfg={"schedule": "linear", "T": T},
                   image_shape=(1, RES, RES), state_dict=pruned.state_dict(), ema_state_dict=pruned.state_dict(),
                   diffusion_state=diffusion.state_dict(), meta=meta)
        return tmp_path / name

    spec = pruning_record(ratios, {}, [], "magnitude")
    assert spec["format"] == PRUNED_FORMAT
    loaded, _, shape, meta = load_model(save("model.pt", {"pruning": spec}))
    x, t = torch.randn(2, 1, RES, RES), torch.tensor([3, 70])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), pruned.eval()(x, t)) and shape == (1, RES, RES)
        assert torch.equal(load_model(tmp_path / "model.pt")[0](x, t), loaded(x, t))
    with pytest.raises(CheckpointError, match="holds a pruned expert: load it with stepwise.pruning.load_pruned"):
        load_denoiser(tmp_path / "model.pt")
    assert count_macs(loaded, inputs) == macs <= 0.5 * full * 1.02 and meta["pruning"] == spec
    with pytest.raises(CheckpointError, match="weights do not fit the model it describes"):
        load_model(save("unrecorded.pt", {}))
    with pytest.raises(CheckpointError, match="pruning record has format 'other/1'"):
        load_model(save("foreign.pt", {"pruning": {**spec, "format": "other/1"}}))
    with pytest.raises(CheckpointError, match="do not fit the model rebuilt from its config and pruning ratios"):
        load_model(save("bad.pt", {"pruning": {**spec, "ratios": {"no_such_group": 0.5}}}))
