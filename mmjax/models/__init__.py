"""Model families by name, derived from the records each family declares next to its model.

    module, config = build_model("llama", {"dim": 64, ...})   # or a LlamaConfig
    family_of(config)                                         # -> "llama"
    families()                                                # {name: Family}

A family is `mmjax/models/<file>.py` ending in `FAMILIES = (Family(name, ConfigClass,
ModuleClass, example_inputs, summary),)` (`mmjax.models.family`). `families()` imports every
module of this package once and collects those records: adding a family edits no list here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from mmjax.configs import closest_name
from mmjax.errors import UnsupportedModelError
from mmjax.models.family import Family

_NOT_MODEL_FILES = {"family"}


@functools.lru_cache(maxsize=None)
def _discover() -> tuple[Family, ...]:
    records: list[Family] = []
    seen: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_MODEL_FILES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for record in getattr(module, "FAMILIES", ()):
            if record.name in seen:
                raise RuntimeError(f"model family {record.name!r} is declared twice: in "
                                   f"{seen[record.name]} and {module.__name__}")
            seen[record.name] = module.__name__
            records.append(record)
    return tuple(records)


def families() -> dict[str, Family]:
    """Every declared family by name."""
    return {f.name: f for f in _discover()}


def get_family(family: str) -> tuple[type, type]:
    """(config class, module class) of `family`; UnsupportedModelError listing the known ones."""
    record = family_record(family)
    return record.config_class, record.module_class


def family_record(family: str) -> Family:
    known = families()
    if family not in known:
        raise UnsupportedModelError(
            f"unknown model family {family!r}{closest_name(str(family), known)}; "
            f"known: {', '.join(known)}")
    return known[family]


def family_of(config: Any) -> str:
    """The family whose config class `config` is an instance of (exact class first)."""
    records = _discover()
    for record in records:
        if type(config) is record.config_class:
            return record.name
    for record in records:
        if isinstance(config, record.config_class):
            return record.name
    raise UnsupportedModelError(
        f"no model family has config class {type(config).__name__}; known: "
        f"{', '.join(f'{r.name} ({r.config_class.__name__})' for r in records)}")


def example_inputs(family: str, config: Any) -> tuple:
    """Inputs with which `module.init` builds every param of `family` (batch 1)."""
    return family_record(family).example_inputs(config)


def abstract_params(family: str, module: Any, config: Any) -> Any:
    """Unboxed ShapeDtypeStructs of `module`'s params (no computation, no memory)."""
    import flax.linen as nn
    import jax

    args = example_inputs(family, config)
    boxed = jax.eval_shape(lambda r: module.init(r, *args)["params"], jax.random.PRNGKey(0))
    return nn.meta.unbox(boxed)


def build_model(family: str, config: dict[str, Any] | Any):
    """Module for `family` from a config dataclass or its dict form. Returns (module, config)."""
    return family_record(family).build(config)


__all__ = ["Family", "families", "family_record", "family_of", "get_family", "example_inputs",
           "abstract_params", "build_model"]
