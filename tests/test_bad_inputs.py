"""Property-based: random invalid params must raise the project's ConfigError with a message, never a deep error.

Every example perturbs one key of the real composed config (experiment=ci) in a way that is invalid by
construction: wrong type, unknown choice, out-of-range number, unknown key, or a whole section of the wrong type.
"""
import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.compose import compose
from stepwise.errors import ConfigError
from stepwise.config import validate as validate_params

BASE = yaml.safe_load(compose(["experiment=ci"]))
SECTIONS = ("data", "model", "diffusion", "train", "sample", "eval")
CHOICE_KEYS = {("data", "name"), ("model", "name"), ("diffusion", "schedule"), ("diffusion", "prediction"),
               ("diffusion", "loss_weight"), ("diffusion", "mixing"), ("train", "precision"),
               ("train", "timestep_sampler"), ("train", "momentum_decay"), ("train", "device"),
               ("sample", "sampler")}
# numbers that must be > 0 (or in a range): an invalid value for each
OUT_OF_RANGE = {("train", "lr"): [0, -1e-3], ("train", "steps"): [0, -5], ("train", "batch_size"): [0, -1],
                ("train", "beta1"): [1.0, -0.1, 7], ("train", "beta2"): [1.5], ("train", "ema_decay"): [1.0, -1],
                ("train", "log_every"): [0], ("train", "ckpt_every"): [0, 7], ("train", "loss_bins"): [0],
                ("train", "grad_clip"): [-1], ("train", "warmup_steps"): [-1], ("train", "weight_decay"): [-0.5],
                ("diffusion", "T"): [1, 0, -3, 10**7], ("sample", "steps"): [0, -1, 101], ("sample", "batch_size"): [0],
                ("sample", "eta"): [-0.1], ("eval", "num_samples"): [0, 1, -7], ("eval", "kid_subset_size"): [0],
                ("eval", "curve_samples"): [-1, 1], ("data", "image_size"): [0, -16], ("data", "channels"): [0, 2, 4],
                ("model", "base_channels"): [0, -8], ("model", "num_res_blocks"): [-1]}
SCALARS = [(s, k) for s in SECTIONS for k, v in BASE[s].items() if v is not None and not isinstance(v, (dict, list))
           and (s, k) not in CHOICE_KEYS and not (s == "train" and k == "seed") and not (s == "sample" and k == "seed")
           and not (s, k) == ("data", "seed") and not (s, k) == ("eval", "inception")]
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


@st.composite
def invalid_params(draw):
    params = copy.deepcopy(BASE)
    kind = draw(st.sampled_from(["wrong_type", "bad_choice", "out_of_range", "unknown_key", "bad_section",
                                 "bad_args"]))
    if kind == "wrong_type":
        section, key = draw(st.sampled_from(SCALARS))
        current = params[section][key]
        if isinstance(current, bool):
            value = draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
        elif isinstance(current, (int, float)):
            value = draw(st.one_of(st.text(min_size=1, max_size=5), st.lists(st.integers(), max_size=2),
                                   st.dictionaries(NAMES, st.integers(), max_size=1)))
        else:
            value = draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2)))
        params[section][key] = value
        kind = f"{section}.{key}={value!r}"
    elif kind == "bad_choice":
        section, key = draw(st.sampled_from(sorted(CHOICE_KEYS)))
        params[section][key] = "bogus_" + draw(NAMES)
    elif kind == "out_of_range":
        (section, key), values = draw(st.sampled_from(sorted(OUT_OF_RANGE.items())))
        params[section][key] = draw(st.sampled_from(values))
    elif kind == "unknown_key":
        section = draw(st.sampled_from([s for s in SECTIONS if s != "model"]))
        params[section]["zz_" + draw(NAMES)] = draw(st.integers())
    elif kind == "bad_section":
        params[draw(st.sampled_from(SECTIONS))] = draw(st.one_of(st.integers(), st.text(max_size=4),
                                                                 st.lists(st.integers(), max_size=2)))
    else:
        section, key = draw(st.sampled_from([("train", "timestep_sampler_args"), ("train", "momentum_decay_args"),
                                             ("diffusion", "loss_weight_args"), ("diffusion", "mixing_args")]))
        if key == "momentum_decay_args":
            params["train"]["momentum_decay"] = "demon"
        if key == "loss_weight_args":
            params["diffusion"]["loss_weight"] = "min_snr"
        if key == "mixing_args":
            params["diffusion"]["prediction"] = "mixed_x0"
        params[section][key] = draw(st.one_of(st.dictionaries(st.just("zz_" + draw(NAMES)), st.integers(),
                                                              min_size=1, max_size=1),
                                              st.integers(), st.text(max_size=3)))
    return kind, params


def test_base_config_is_valid():
    validate_params(BASE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_params())
def test_random_invalid_params_raise_config_error(case):
    kind, params = case
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 600, message
