"""Resume is exact: a run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted run."""
from dataclasses import asdict

import pytest
import torch

from stepwise.checkpoint import checkpoint_paths, load_latest_checkpoint
from stepwise.config import DiffusionConfig, TrainConfig, parse
from stepwise.data import make_synthetic
from stepwise.diffusion import Diffusion
from stepwise.errors import CheckpointError, ConfigError
from stepwise.models import build_model
from stepwise.training import train

IMAGES = make_synthetic(num_train=64, num_test=8)["splits"]["train"][0]
MODEL = dict(name="unet", base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.1)


def run(tmp, steps, **over):
    torch.manual_seed(123)  # model init
    cfg = parse(TrainConfig, dict(steps=steps, batch_size=8, ckpt_every=4, log_every=2, warmup_steps=3, device="cpu",
                                  **over), "train")
    return train(build_model(MODEL, 16, 1), Diffusion("linear", 50, "eps"), IMAGES, cfg, tmp, fingerprint="fp",
                 progress=False)


def state(result):
    return {k: v.clone() for k, v in result["model"].state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    full = run(tmp_path / "a", 12)
    part = run(tmp_path / "b", 8)
    assert part["resumed_from"] is None
    resumed = run(tmp_path / "b", 12)  # same fingerprint, more steps: continues from step 8
    assert resumed["resumed_from"] == 8
    for k, v in state(full).items():
        torch.testing.assert_close(resumed["model"].state_dict()[k], v, rtol=0, atol=0)
    for k, v in full["ema"].state_dict().items():
        torch.testing.assert_close(resumed["ema"].state_dict()[k], v, rtol=0, atol=0)
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"]]
    assert [r["step"] for r in resumed["history"]] == list(range(2, 13, 2))


def test_keeps_newest_checkpoints(tmp_path):
    run(tmp_path, 12)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000008.pt", "step_00000012.pt"]


def test_other_configuration_starts_afresh(tmp_path):
    run(tmp_path, 8)
    torch.manual_seed(123)
    cfg = parse(TrainConfig, dict(steps=4, batch_size=8, ckpt_every=4, log_every=2, device="cpu"), "train")
    r = train(build_model(MODEL, 16, 1), Diffusion("linear", 50, "eps"), IMAGES, cfg, tmp_path, fingerprint="other",
              progress=False)
    assert r["resumed_from"] is None
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000004.pt"]


def test_corrupt_checkpoint_is_refused_with_previous_offered(tmp_path):
    run(tmp_path, 8)
    newest = checkpoint_paths(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step_00000008.pt.*truncated or corrupt.*step_00000004.pt"):
        load_latest_checkpoint(tmp_path, "fp")
    with pytest.raises(CheckpointError):
        run(tmp_path, 12)


def test_incompatible_checkpoint_for_model(tmp_path):
    run(tmp_path, 4)
    cfg = parse(TrainConfig, dict(steps=8, batch_size=8, ckpt_every=4, log_every=2, device="cpu"), "train")
    other = build_model(dict(MODEL, base_channels=16), 16, 1)
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        train(other, Diffusion("linear", 50, "eps"), IMAGES, cfg, tmp_path, fingerprint="fp", progress=False)


def test_batch_larger_than_dataset(tmp_path):
    cfg = parse(TrainConfig, dict(steps=2, batch_size=65, ckpt_every=2, log_every=2, device="cpu"), "train")
    with pytest.raises(ConfigError, match="batch_size=65 is larger than the dataset \\(64 images\\)"):
        train(build_model(MODEL, 16, 1), Diffusion("linear", 50, "eps"), IMAGES, cfg, tmp_path, fingerprint="x",
              progress=False)


def test_loss_decreases_and_bins_logged(tmp_path):
    r = run(tmp_path, 30, lr=3e-3)
    h = r["history"]
    assert h[-1]["loss"] < h[0]["loss"]
    from stepwise.schedules import parse_bin_key

    names = {p[0] for k in h[-1] if (p := parse_bin_key(k))}
    assert names == {"loss", "loss_var"} and "loss_t00-04" in {k for row in h for k in row}  # T = 50, 10 bins


@pytest.mark.parametrize("diff,over", [
    (dict(prediction="mixed_x0", mixing="loss_based"), dict(timestep_sampler="speed")),
    (dict(prediction="mixed_x0", mixing="learned"), dict(timestep_sampler="iddpm")),
    (dict(prediction="v", loss_weight="min_snr"), dict(timestep_sampler="clts", momentum_decay="demon",
                                                        momentum_decay_args={"total_steps": 12},
                                                        timestep_sampler_args={"ramp_steps": 8})),
    (dict(prediction="eps", loss_weight="p2"), dict(timestep_sampler="curriculum", momentum_decay="exp_floor",
                                                     momentum_decay_args={"total_steps": 12},
                                                     timestep_sampler_args={"patience": 1, "num_clusters": 3})),
    (dict(prediction="x0"), dict(timestep_sampler="lognormal")),
])
def test_strategies_resume_exactly(tmp_path, diff, over):
    """Every strategy's state (sampler, momentum schedule, route mixing) survives a checkpoint bit-exactly."""

    def go(path, steps):
        torch.manual_seed(123)
        d = Diffusion("linear", 50, **diff)
        cfg = parse(TrainConfig, dict(steps=steps, batch_size=8, ckpt_every=4, log_every=2, warmup_steps=2,
                                      device="cpu", **over), "train")
        model = build_model(MODEL, 16, 1, out_channels=d.out_channels_factor)
        return train(model, d, IMAGES, cfg, path, fingerprint="fp", progress=False), d

    (full, d_full), _ = go(tmp_path / "a", 12), go(tmp_path / "b", 8)
    resumed, d_res = go(tmp_path / "b", 12)
    assert resumed["resumed_from"] == 8
    for k, v in full["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[k], v, rtol=0, atol=0)
    for k, v in d_full.state_dict().items():
        torch.testing.assert_close(d_res.state_dict()[k], v, rtol=0, atol=0)
    assert resumed["history"] == full["history"]
    if over.get("momentum_decay"):
        assert full["history"][-1]["beta1"] < 0.9
    if diff["prediction"] == "mixed_x0":
        assert any(k.startswith("x0err_acc_t") for k in full["history"][-1])


def test_default_eps_path_matches_values_recorded_before_the_prediction_interface(tmp_path):
    """Default diffusion (linear, T=1000, eps, no loss weight) and train settings: the logged losses and the weights
    after 4 steps equal those recorded from the code before predictions owned their loss (commit ad7b21b). They were
    bit-identical on the recording machine; the tolerances only absorb other CPUs' summation order."""
    torch.manual_seed(123)
    cfg = parse(TrainConfig, dict(steps=4, batch_size=8, ckpt_every=4, log_every=1, device="cpu", lr=2e-4,
                                  warmup_steps=100), "train")  # the train defaults of that commit
    model = build_model(MODEL, 16, 1)
    init = [p.detach().clone() for p in model.parameters()]
    diffusion = Diffusion.from_config(asdict(parse(DiffusionConfig, {}, "diffusion")))
    r = train(model, diffusion, IMAGES, cfg, tmp_path, fingerprint="fp", progress=False)
    moved = sum(float((p.detach().double() - q.double()).pow(2).sum()) for p, q in zip(r["model"].parameters(), init))
    ema = sum(float(p.detach().double().sum()) for p in r["ema"].parameters())
    losses = [row["loss"] for row in r["history"]]
    assert losses == pytest.approx([0.9884283542633057, 0.9828219413757324, 0.9859814047813416, 0.99531489610672],
                                   rel=1e-6)
    assert moved == pytest.approx(9.638703956220266e-07, rel=1e-4)  # squared distance travelled by the weights
    # the weight EMA is stepwise.ema.EMA since the fair-comparison change (timm's ModelEmaV3 gave 330.36371986627034)
    assert ema == pytest.approx(330.36239141462397, rel=1e-7)
    assert diffusion.state_dict() == {} and list(diffusion.parameters()) == []
