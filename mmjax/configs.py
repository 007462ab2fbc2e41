"""Dataclass configs <-> plain dicts, strictly: unknown keys are errors that suggest a name."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping, TypeVar

from mmjax.errors import ConfigError

T = TypeVar("T")


def closest_name(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(cls_name: str, keys, allowed) -> None:
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        hints = "; ".join(f"{k!r}{closest_name(k, allowed)}" for k in unknown)
        raise ConfigError(f"{cls_name}: unknown config key(s): {hints}")


def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """Build dataclass `cls` from `d`; nested dataclass fields are built from nested dicts."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(cls.__name__, d.keys(), fields)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_in(hints.get(k))
        if sub is not None and isinstance(v, Mapping):
            v = from_dict(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _dataclass_in(tp) -> type | None:
    if tp is None:
        return None
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
