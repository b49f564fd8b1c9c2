"""The committed params.yaml is Hydra's composition of conf/, and every preset composes into valid sections."""
import pytest
import yaml

from stages.compose import CONF_DIR, compose
from dataclasses import asdict

from stepwise.config import (DATA_CONFIGS, MODEL_CONFIGS, ComparisonConfig, DiffusionConfig, EvalConfig, SampleConfig,
                             FinetuneConfig, TdcConfig, TrainConfig, load_config, parse, validate)
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
    cfg = validate(yaml.safe_load(compose([override])))
    build_model(cfg.model, cfg.data.image_size, cfg.data.channels)


def test_typed_defaults_equal_conf():
    """conf/ is the one source of defaults: every section dataclass's defaults equal the default composition."""
    params = yaml.safe_load(compose([]))
    for name, cls in (("diffusion", DiffusionConfig), ("train", TrainConfig), ("sample", SampleConfig),
                      ("eval", EvalConfig), ("tdc", TdcConfig), ("comparison", ComparisonConfig)):
        assert asdict(cls()) == params[name], name


@pytest.mark.parametrize("group,table", [("data", DATA_CONFIGS), ("model", MODEL_CONFIGS)])
def test_typed_option_defaults_equal_conf(group, table):
    """Each dataset's / architecture's typed defaults equal its conf/<group>/<name>.yaml."""
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        option = yaml.safe_load(path.read_text())
        assert asdict(table[option["name"]]()) == option, path.name


def test_whole_params_validated_in_one_pass(tmp_path):
    """Rules of every section, unknown top-level sections and cross-section rules all fail at load."""
    base = yaml.safe_load(compose([]))
    cases = [({"trian": {}}, "unknown top-level section\\(s\\) \\['trian'\\]"),
             ({"tdc": {**base["tdc"], "num_groups": 3}}, "groups_list=\\[0, 1, 2, 3\\] must be \\[0, 1, 2\\]"),
             ({"sample": {**base["sample"], "steps": 2000}}, "sample.steps=2000 must be <= diffusion.T=1000"),
             ({"tdc": {**base["tdc"], "finetune": {**base["tdc"]["finetune"], "train": {"lr": -1}}}},
              "tdc.finetune.train: lr=-1.0 must be > 0"),
             ({"tdc": {**base["tdc"], "prune": {**base["tdc"]["prune"], "train": {"timestep_sampler": "x"}}}},
              "tdc.prune.train: timestep_sampler='x' is not valid"),
             ({"train": {**base["train"], "lr": "abc"}}, "train.lr='abc' must be a number"),
             ({"model": {**base["model"], "widht": 3}}, "model: unknown key\\(s\\) \\['widht'\\]")]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match):
            validate({**base, **change})


def test_yaml_number_without_point_explained():
    base = yaml.safe_load(compose([]))
    with pytest.raises(ConfigError, match="YAML reads 1e-4 as a string"):
        validate({**base, "train": {**base["train"], "lr": "1e-4"}})


@pytest.mark.parametrize("text,match", [("train:\n\tlr: 1\n", "not valid YAML at line 2"),
                                        ("train: [1, 2\n", "not valid YAML"), ("- 1\n", "expected a mapping")])
def test_params_file_syntax_errors_are_one_line(tmp_path, text, match):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


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
    ("train", TrainConfig, {"ema_warmup_steps": 1.5}, "must be an integer"),
    ("train", TrainConfig, {"sampler_feedback": "grad"}, "valid: \\['loss', 'mse'\\]"),
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


def test_segment_schedules_hand_computed():
    """Each fine-tune gets its own warm-up (ceil(0.1 x its steps)); the continued baseline gets exactly the experts'
    schedule (same warm-up, same overrides), only its length and seed differ."""
    cfg = validate(yaml.safe_load(compose([])))
    ft, K = cfg.tdc.finetune, cfg.tdc.num_groups
    expert = ft.train_config(cfg.train, seed=7)
    continued = ft.train_config(cfg.train, seed=8, steps=K * ft.steps)
    assert (expert.steps, expert.warmup_steps, expert.ema_warmup_steps, expert.ema_decay) == (100, 10, 10, 0.95)
    assert (continued.steps, continued.warmup_steps, continued.ema_warmup_steps) == (400, 10, 10)
    assert asdict(expert) | {"steps": 0, "seed": 0} == asdict(continued) | {"steps": 0, "seed": 0}
    assert expert.eval_steps == [] and expert.lr == cfg.train.lr
    pruned = cfg.tdc.prune.train_config(cfg.train, seed=1)
    assert (pruned.steps, pruned.warmup_steps, pruned.ema_warmup_steps) == (50, 5, 5)
    over = parse(FinetuneConfig, {**asdict(ft), "steps": 30, "train": {"warmup_steps": 3}}, "tdc.finetune")
    assert over.train_config(cfg.train, seed=1).warmup_steps == 3  # an explicit override wins
    assert over.train_config(cfg.train, seed=1).ema_warmup_steps == 3  # ceil(0.1 x 30)
