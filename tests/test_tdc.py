"""The TDC library procedures behind the stages, on hand-made inputs (no pipeline run): groups from the profile,
expert checks, range-restricted fine-tuning, compute accounting, the pruned ensemble's metrics and goal."""
from dataclasses import replace

import pytest
import torch

from stepwise.checkpoint import RESUME_NEUTRAL, resume_relevant
from stepwise.config import TrainConfig
from stepwise.consistency import check_sample_sets
from stepwise.difficulty import check_profile
from stepwise.errors import ConfigError, StepwiseError
from stepwise.evaluation import score_deltas
from stepwise.flops import training_flops
from stepwise.router import ExpertRouter
from stepwise.seeding import derive_seed, run_seed
from stepwise.pruning.ensemble import GOAL_MACS_SAVING, pruned_ensemble_metrics
from stepwise.tdc import (check_expert, compute_accounting, dp_signal,
                          tdc_groups, trajectory_macs)
from stepwise.config import ClusterConfig, ProfileConfig

pytestmark = pytest.mark.usefixtures("one_thread")
T = 20


def profile_with_a_step():
    """A 5-point profile whose log loss jumps between t = 6 and t = 10, and a 5 x 5 similarity matrix."""
    t = torch.tensor([2.0, 6.0, 10.0, 14.0, 18.0], dtype=torch.float64)
    profile = {"t": t, "log_loss_mean": torch.tensor([1.0, 1.0, 5.0, 5.0, 5.0], dtype=torch.float64),
               "rel_entropy_mc": torch.tensor([float("nan"), 1, 1, 1, 1], dtype=torch.float64)}
    similarity = {"t": t, **{str(int(v)): torch.eye(5, dtype=torch.float64)[i] for i, v in enumerate(t)}}
    return profile, similarity


def test_tdc_groups_by_method():
    profile, similarity = profile_with_a_step()
    snr_db = torch.linspace(30, -30, T, dtype=torch.float64)
    dp = tdc_groups(ClusterConfig(method="dp"), 2, T, snr_db, profile, similarity)
    assert dp[0][0] == 0 and dp[-1][1] == T and 6 < dp[0][1] <= 10  # the break lies between the profiled points
    assert tdc_groups(ClusterConfig(method="uniform"), 4, T, snr_db, profile, similarity) == [(0, 5), (5, 10),
                                                                                             (10, 15), (15, 20)]
    assert tdc_groups(ClusterConfig(method="equal_snr_db"), 2, T, snr_db, profile, similarity) == [(0, 10), (10, 20)]
    assert tdc_groups(ClusterConfig(method="manual", boundaries=[0, 3, T]), 2, T, snr_db, profile, similarity) == [
        (0, 3), (3, T)]
    with pytest.raises(ConfigError, match="boundaries has 3 entries; num_groups=3 needs 4"):
        tdc_groups(ClusterConfig(method="manual", boundaries=[0, 3, T]), 3, T, snr_db, profile, similarity)
    with pytest.raises(ConfigError, match=r"boundaries=\[0, 30, 20\]: group 0 \[0, 30\) lies outside"):
        tdc_groups(ClusterConfig(method="manual", boundaries=[0, 30, T]), 2, T, snr_db, profile, similarity)


def test_dp_signal_columns_and_errors():
    profile, similarity = profile_with_a_step()
    x = dp_signal(ClusterConfig(method="dp", signal=["log_loss_mean", "similarity"]), profile, similarity, T)
    assert x.shape == (T, 6) and torch.allclose(x.mean(0), x.mean(0).new_zeros(6), atol=0.2)  # z-scored columns
    with pytest.raises(ConfigError, match=r"'loss' is not a profile column; valid: \['log_loss_mean'"):
        dp_signal(ClusterConfig(method="dp", signal=["loss"]), profile, similarity, T)
    with pytest.raises(ConfigError, match=r"\['rel_entropy_mc'\] hold non-finite values"):
        dp_signal(ClusterConfig(method="dp", signal=["rel_entropy_mc"]), profile, similarity, T)


def test_check_expert_names_the_stale_stage():
    check_expert("e.pt", {"lo": 0, "hi": 5, "unified_sha256": "u"}, 0, (0, 5), "u")
    for meta in ({"lo": 0, "hi": 6, "unified_sha256": "u"}, {"lo": 0, "hi": 5, "unified_sha256": "v"}):
        with pytest.raises(ConfigError, match=r"e.pt was fine-tuned on .* rerun `dvc repro finetune@0`"):
            check_expert("e.pt", meta, 0, (0, 5), "u")


def test_train_on_range_stays_in_its_range(tmp_path):
    from stepwise.diffusion import Diffusion
    from stepwise.models import build_model
    from stepwise.tdc import range_sampler, train_on_range

    cfg = TrainConfig(steps=3, batch_size=4, log_every=1, ckpt_every=3, device="cpu", loss_bins=2)
    model = build_model({"name": "unet", "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                         "attn_resolutions": []}, 8, 1, seed=0)
    diffusion = Diffusion("linear", T)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    result = train_on_range(model, diffusion, images, cfg, range_sampler(cfg, diffusion, (5, 9)), tmp_path, "id", "x")
    seen = result["seen"]
    assert 5 <= seen["t_min"] <= seen["t_max"] < 9 and seen["t_draws"] == 12 and result["images_seen"] == 12
    assert result["final_loss"] == result["history"][-1]["loss"]  # a tenth of 3 rows is the last one


def test_resume_rule_and_run_seeds():
    cfg = TrainConfig()
    relevant = resume_relevant(cfg)
    assert not set(RESUME_NEUTRAL) & set(relevant) and relevant["lr"] == cfg.lr
    assert resume_relevant(replace(cfg, steps=cfg.steps + 5)) == relevant  # more steps resume the same run
    demon = replace(cfg, momentum_decay="demon")  # its schedule spans train.steps: steps are part of the run
    assert resume_relevant(demon)["steps"] == cfg.steps
    assert "steps" not in resume_relevant(replace(demon, momentum_decay_args={"total_steps": 10}))
    assert run_seed(3, -1) == derive_seed(3, -1) % 2**31 != run_seed(3, 0) and run_seed(3, 0) < 2**31


def test_compute_accounting_and_trajectory_macs():
    experts = [{"images_seen": 64, "train_flops": 6.0}, {"images_seen": 64, "train_flops": 4.0}]
    out = compute_accounting({"images_seen": 640}, experts, {"images_seen": 128, "train_flops": 12.0})
    assert out == {"compute/pretrain_images": 640, "compute/tdc_finetune_images": 128,
                   "compute/tdc_finetune_flops": 10.0, "compute/continued_images": 128,
                   "compute/continued_flops": 12.0, "compute/matched": 1.0}
    assert compute_accounting({}, experts, {"images_seen": 100, "train_flops": 1})["compute/matched"] == 0.0
    router = ExpertRouter([torch.nn.Identity()], [(0, 10)], fallback=torch.nn.Identity())  # t >= 10: fallback
    assert trajectory_macs(router, [3.0], 7.0, torch.tensor([15, 9, 0])) == [7.0, 3.0, 3.0]
    assert training_flops(5, 10) == 3 * 2 * 5 * 10


def test_pruned_ensemble_metrics_and_goal():
    scores = {"unified": {"fid_featnet": 10.0, "kid_featnet": 0.1}, "tdc": {"fid_featnet": 9.0},
              "pruned": {"fid_featnet": 9.5, "kid_featnet": 0.2}}
    per_step = {"unified": [100, 100], "tdc": [100, 100], "pruned": [50, 100]}
    speed = {"unified": 2.0, "tdc": 2.0, "pruned": 3.0}
    metas = [{"budget_macs": 50, "num_params": 7}, {"budget_macs": 100, "num_params": 9}]
    m = pruned_ensemble_metrics(scores, per_step, speed, [50, 100], metas, 100, [0, 1])
    assert m["pruned/macs_per_sample"] == 150 and m["macs_saving_vs_unified"] == 0.25 and m["speedup_vs_tdc"] == 1.5
    assert m["delta_pruned_vs_unified/fid_featnet"] == -0.5 and "delta_pruned_vs_tdc/kid_featnet" not in m
    assert m["expert_0/macs_fraction"] == 0.5 and m["expert_1/steps_owned"] == 1 and m["expert_0/params"] == 7
    assert m["goal/fid_delta"] == -0.5 and m["goal/met"] == 0.0  # 25 % < 40 % saving
    cheap = pruned_ensemble_metrics(scores, {**per_step, "pruned": [50, 50]}, speed, [50, 50], metas, 100, [0, 1])
    assert cheap["goal/macs_saving_vs_unified"] == 0.5 >= GOAL_MACS_SAVING and cheap["goal/met"] == 1.0
    assert score_deltas(scores, "tdc", ["unified"]) == {"delta_tdc_vs_unified/fid_featnet": -1.0}


def test_stage_input_checks():
    sets = {"a": torch.zeros(8, 1, 6, 6, dtype=torch.uint8), "b": torch.zeros(4, 1, 6, 6, dtype=torch.uint8)}
    check_sample_sets(sets, 4, 5)
    with pytest.raises(ConfigError, match="num_samples=5 exceeds the 4 evaluation samples"):
        check_sample_sets(sets, 5, 5)
    with pytest.raises(ConfigError, match="window_size=7 exceeds the image size 6x6"):
        check_sample_sets(sets, 4, 7)
    check_profile(ProfileConfig(num_timesteps=4, num_examples=8, grad_examples=8), 8, 1000)
    with pytest.raises(ConfigError, match="grad_examples=9 exceeds the 8 training images"):
        check_profile(ProfileConfig(num_examples=8, grad_examples=9), 8, 1000)
    with pytest.raises(ConfigError, match="needs 8 MiB of gradients .* > grad_max_mib=1"):
        check_profile(ProfileConfig(num_timesteps=1, num_examples=1, grad_examples=1, grad_max_mib=1), 8, 2**20)


def test_fid_curve_needs_checkpoints(tmp_path):
    from stepwise.fidelity import fid_curve

    with pytest.raises(StepwiseError, match="holds no training checkpoints"):
        fid_curve(torch.nn.Identity(), None, (1, 8, 8), None, None, tmp_path, 4, device="cpu")
