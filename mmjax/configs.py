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
    renamed = getattr(cls, "RENAMED", {})
    if renamed:  # dicts written before a field was renamed
        d = {renamed.get(k, k) if renamed.get(k) not in d else k: v for k, v in d.items()}
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
    """`dataclasses.asdict`, with dtype objects (jnp.float32, np.dtype) as their names, so the
    dict is JSON-able (configs store dtypes as names; a field given a dtype object still is)."""
    return _dtype_names(dataclasses.asdict(obj))


def _dtype_names(value):
    if isinstance(value, dict):
        return {k: _dtype_names(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_dtype_names(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    import numpy as np

    if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
        try:
            return np.dtype(value).name
        except TypeError:
            return value
    return value


def _dataclass_in(tp) -> type | None:
    if tp is None:
        return None
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


class Config:
    """The one shared behaviour of mmjax's frozen dataclass configs (mix in, then decorate the
    subclass with `@dataclasses.dataclass(frozen=True)`):

      replace(**kw)           strict: unknown keys raise ConfigError with a "did you mean" hint
      to_dict() / from_dict() plain dicts (JSON-able), nested configs built from nested dicts,
                              strict about unknown keys, old names in RENAMED accepted
      from_variant(name, **kw) named sizes from the class's VARIANTS table
      check_dtypes(*fields)   ConfigError for a field that is not a dtype name

    Class attributes a config may set: NAME (the family's display name in messages), VARIANTS
    {name: dict of fields, or a callable returning one}, RENAMED {old key: new key} for dicts
    written before a field was renamed.
    """

    NAME: typing.ClassVar[str] = ""
    VARIANTS: typing.ClassVar[Mapping[str, Any]] = {}
    RENAMED: typing.ClassVar[Mapping[str, str]] = {}

    def replace(self: T, **kw) -> T:
        renamed = type(self).RENAMED
        kw = {renamed.get(k, k): v for k, v in kw.items()}
        check_keys(type(self).__name__, kw, {f.name for f in dataclasses.fields(self)})
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
        return from_dict(cls, d)

    @classmethod
    def from_variant(cls: type[T], name: str, **overrides) -> T:
        variants = cls.VARIANTS
        if name not in variants:
            known = ", ".join(variants) or "none"
            raise ConfigError(f"unknown {cls.NAME or cls.__name__} variant {name!r}"
                              f"{closest_name(name, variants)}; known: {known}")
        base = variants[name]
        return cls(**{**(base() if callable(base) else base), **overrides})

    def check_dtypes(self, *names: str) -> None:
        import jax.numpy as jnp

        for name in names:
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ConfigError(f"{type(self).__name__}.{name}: unknown dtype "
                                  f"{getattr(self, name)!r}") from None
