"""Value checks: one line per user-caused mistake, naming the key, the value and what is allowed.

Every section of the config (`p2prl.config`, each algorithm's own in `p2prl.algos`) checks its values
with these, and every user error anywhere is a `ConfigError`.
"""
from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A user-caused configuration error; `str()` is the one line shown to the user."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={show(value)}: {allowed}")

    @classmethod
    def line(cls, text: str) -> "ConfigError":
        """An error whose one line is already written (e.g. agreed between peers)."""
        e = cls.__new__(cls)
        ValueError.__init__(e, text)
        e.key = e.value = e.allowed = None
        return e


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def is_number(value: Any, integer: bool = False) -> bool:
    """A finite int (or, unless `integer`, float); never a bool."""
    kind = int if integer else (int, float)
    return not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)


def positive(key: str, value: Any, integer: bool = False) -> None:
    if not is_number(value, integer) or value <= 0:
        raise ConfigError(key, value, f"must be a positive {'integer' if integer else 'number'}")


def nonneg(key: str, value: Any, integer: bool = False) -> None:
    if not is_number(value, integer) or value < 0:
        raise ConfigError(key, value, f"must be {'an integer' if integer else 'a number'} >= 0")


def unit(key: str, value: Any, low_open: bool = False) -> None:
    ok = is_number(value, False) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ConfigError(key, value, f"must be in {'(0, 1]' if low_open else '[0, 1]'}")


def number(key: str, value: Any) -> None:
    if not is_number(value, False):
        raise ConfigError(key, value, "must be a number")


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {', '.join(allowed)}")


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")


def optional(check, key: str, value: Any, **kw: Any) -> None:
    if value is not None:
        check(key, value, **kw)


RULES = {
    "positive": positive, "positive_int": lambda k, v: positive(k, v, integer=True),
    "nonneg": nonneg, "nonneg_int": lambda k, v: nonneg(k, v, integer=True),
    "number": number, "unit": unit, "unit_open": lambda k, v: unit(k, v, low_open=True), "boolean": boolean,
    "optional_positive": lambda k, v: optional(positive, k, v),
    "optional_positive_int": lambda k, v: optional(positive, k, v, integer=True),
    "optional_nonneg": lambda k, v: optional(nonneg, k, v),
    "optional_nonneg_int": lambda k, v: optional(nonneg, k, v, integer=True),
}


def fields(obj: Any, prefix: str, **rules: tuple[str, ...]) -> None:
    """Check `obj`'s fields by rule: `fields(cfg, "algo.", positive=("lr",), boolean=("norm_adv",))`.
    Rules: number, positive, positive_int, nonneg, nonneg_int, unit ([0, 1]), unit_open ((0, 1]), boolean,
    optional_positive, optional_positive_int, optional_nonneg, optional_nonneg_int (None allowed)."""
    for rule, names in rules.items():
        for name in names:
            RULES[rule](prefix + name, getattr(obj, name))


def net(prefix: str, hidden_sizes: Any, activation: Any) -> None:
    """A network's `hidden_sizes` (list of positive integers) and `activation`."""
    if not isinstance(hidden_sizes, (list, tuple)) or not all(is_number(h, True) and h > 0 for h in hidden_sizes):
        raise ConfigError(prefix + "hidden_sizes", hidden_sizes, "must be a list of positive integers")
    choice(prefix + "activation", activation, ("tanh", "relu"))
