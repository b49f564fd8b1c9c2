"""The committed params.yaml is Hydra's composition of conf/, and every preset composes into valid sections."""
import pytest
import yaml

from stages.compose import CONF_DIR, compose
from stepwise.config import DiffusionConfig, EvalConfig, SampleConfig, TrainConfig, parse
from stepwise.errors import ConfigError
from stepwise.models import build_model

from conftest import REPO


def test_committed_params_equal_composition():
    """`dvc repro` reads params.yaml; `dvc exp run` composes conf/. They must agree."""
    assert (REPO / "params.yaml").read_text() == compose([])


def every_option():
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            yield f"{group.name}={option.stem}"


@pytest.mark.parametrize("override", list(every_option()))
def test_every_option_composes_to_valid_config(override):
    params = yaml.safe_load(compose([override]))
    assert {"data", "model", "diffusion", "train", "sample", "eval"} <= set(params)
    parse(DiffusionConfig, params["diffusion"], "diffusion")
    parse(TrainConfig, params["train"], "train")
    parse(SampleConfig, params["sample"], "sample")
    parse(EvalConfig, params["eval"], "eval")
    build_model(params["model"], params["data"]["image_size"], params["data"]["channels"])


def test_gpu_preset_scales_up():
    base, gpu = yaml.safe_load(compose([])), yaml.safe_load(compose(["experiment=gpu"]))
    assert gpu["train"]["precision"] == "bf16" and gpu["train"]["steps"] > base["train"]["steps"]
    assert gpu["model"]["base_channels"] > base["model"]["base_channels"]
    assert gpu["data"] == base["data"]


@pytest.mark.parametrize("section,cls,bad,match", [
    ("train", TrainConfig, {"lr": -1}, "lr=-1.0 must be > 0"),
    ("train", TrainConfig, {"steps": 0}, "steps=0 must be > 0"),
    ("train", TrainConfig, {"lrr": 1}, "unknown key\\(s\\) \\['lrr'\\]; valid: \\["),
    ("train", TrainConfig, {"precision": "fp8"}, "valid: \\['bf16', 'fp32'\\]"),
    ("train", TrainConfig, {"timestep_sampler": "nope"}, "timestep_sampler='nope' is not valid"),
    ("train", TrainConfig, {"beta1": 1.0}, "beta1=1.0 must be in \\[0, 1\\)"),
    ("train", TrainConfig, {"ckpt_every": 15, "log_every": 10}, "multiple of log_every"),
    ("train", TrainConfig, {"batch_size": 2.5}, "must be an integer"),
    ("train", TrainConfig, {"ema_warmup": 1}, "true or false"),
    ("train", TrainConfig, {"lr": "fast"}, "must be a number"),
    ("train", TrainConfig, {"device": "tpu"}, "'auto', 'cpu' or 'cuda"),
    ("diffusion", DiffusionConfig, {"schedule": "sigmoid"}, "valid: \\['cosine', 'linear'\\]"),
    ("diffusion", DiffusionConfig, {"prediction": "score"}, "valid: \\['eps', 'mixed_x0', 'v', 'x0'\\]"),
    ("diffusion", DiffusionConfig, {"T": 1}, "T=1 must be in \\[2, 100000\\]"),
    ("sample", SampleConfig, {"sampler": "euler"}, "valid: \\['ddim', 'ddpm'\\]"),
    ("sample", SampleConfig, {"eta": -0.5}, "eta=-0.5 must be >= 0"),
    ("eval", EvalConfig, {"num_samples": 1}, "num_samples=1 must be >= 2"),
    ("eval", EvalConfig, {"featnet": {"epochs": 0}}, "eval: featnet: epochs=0 must be > 0"),
])
def test_invalid_settings_give_one_clear_message(section, cls, bad, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse(cls, bad, section)
    assert str(info.value).startswith(section)
