"""The one validation style of every config section: typed dataclass fields, checked in `__post_init__`.

`parse(cls, section, name)` builds a section dataclass from its params.yaml mapping: unknown keys and wrongly typed
values are rejected with one message that starts with the section's dotted name and lists the valid choices.
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError


def parse(cls, section, name: str):
    """Build dataclass `cls` from a params section, rejecting unknown keys and wrongly typed values."""
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping of settings, got {type(section).__name__} {section!r}"[:300])
    valid = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; valid: {sorted(valid)}")
    kwargs = {}
    for key, value in section.items():
        kind = {"dict": dict, "list": list}.get(str(valid[key].type))
        if kind is not None and not isinstance(value, kind):
            raise ConfigError(f"{name}.{key}={value!r} must be a {'mapping' if kind is dict else 'list'}")
        default = _default(valid[key])
        kwargs[key] = coerce(value, default, f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def coerce(value, default, where: str):
    """Coerce a YAML scalar to the type of the field's default (int -> float allowed; bool never from int)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(default, int) and float(value) != int(value):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return type(default)(value)
    if isinstance(default, (int, float)):
        raise ConfigError(f"{where}={value!r} must be a number{_yaml_hint(value)}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}={value!r} must be a string")
    return value


def _yaml_hint(value) -> str:
    """Why YAML gave a string where a number was meant: PyYAML (YAML 1.1) reads 1e-4 (no '.') as a string."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (YAML reads {value} as a string: write it with a decimal point and a signed exponent, e.g. 1.0e-4)"
    return ""


def choice(value, choices, where: str) -> None:
    """ConfigError unless `value` is one of `choices` (the message lists them)."""
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not valid; valid: {sorted(choices)}")


def positive(where: str, value, allow_zero: bool = False) -> None:
    """ConfigError unless value > 0 (or >= 0)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def unit_interval(where: str, value, closed_low: bool = True) -> None:
    """ConfigError unless value in [0, 1) (or (0, 1))."""
    if not ((0 <= value if closed_low else 0 < value) and value < 1):
        raise ConfigError(f"{where}={value!r} must be in {'[' if closed_low else '('}0, 1)")


def int_list(value, where: str) -> list[int]:
    """`value` as a list of ints, else ConfigError."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}={value!r} must be a list of integers")
    return [int(v) for v in value]


def device_name(where: str, name: str) -> None:
    """ConfigError unless name is 'auto', 'cpu' or 'cuda[:N]'."""
    if not (name in ("auto", "cpu") or name.startswith("cuda")):
        raise ConfigError(f"{where}={name!r} must be 'auto', 'cpu' or 'cuda[:N]'")
