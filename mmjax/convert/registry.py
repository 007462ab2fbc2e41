"""Which converter handles which Hugging Face `model_type` / mmjax model family, derived from the
converter records themselves.

Discovery: on first use, every module of the `mmjax.convert` package (`pkgutil.iter_modules`
over this directory, in name order; names starting with "_" skipped) is imported, and each one
that exposes `CONVERTERS` (a tuple of `mmjax.convert.core.Converter`) or `CONVERTER` (one)
contributes its records; helper modules expose neither. Adding a family is adding its converter
file -- there is no list to edit. Two records claiming one `model_type`, or a family without
exactly one default exporter (`export_when=None`), is a programming error raised at discovery.
A module that fails to import (an ImportError: a missing optional dependency, a broken name) is
left out rather than breaking every other family's conversion; "unsupported model_type" and
"no exporter" errors then name it and the error.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from typing import Any, Mapping

from mmjax.configs import closest_name
from mmjax.convert.core import Converter
from mmjax.errors import UnsupportedModelError

__all__ = ["Converter", "converters", "for_model_type", "for_hf_config", "for_family", "for_export",
           "supported_model_types"]


@functools.lru_cache(maxsize=None)
def _discovered() -> tuple[tuple[Converter, ...], dict[str, Converter], dict[str, str]]:
    package = __name__.rpartition(".")[0]
    this = __name__.rpartition(".")[2]
    records: list[tuple[str, Converter]] = []
    broken: dict[str, str] = {}  # module -> why it did not import
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == this:
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except ImportError as e:
            broken[f"{package}.{info.name}"] = f"{type(e).__name__}: {e}"
            continue
        found = getattr(module, "CONVERTERS", None)
        if found is None:
            found = (module.CONVERTER,) if hasattr(module, "CONVERTER") else ()
        for record in found:
            if not isinstance(record, Converter):
                raise TypeError(f"{module.__name__}: CONVERTER(S) holds {record!r}, not a Converter")
            records.append((module.__name__, record))
    # model_type -> its records in module order (the first is the model_type's default); two
    # records may share a model_type when their architectures differ (LlamaForCausalLM and
    # LlamaForSequenceClassification are both "llama")
    by_type: dict[str, list[Converter]] = {}
    owner: dict[tuple[str, str], str] = {}
    for module_name, record in records:
        for model_type in record.model_types:
            for arch in record.architectures or ("",):
                if (model_type, arch) in owner:
                    raise ValueError(f"model_type {model_type!r}{f' / {arch}' if arch else ''} is "
                                     f"claimed by {owner[model_type, arch]} and {module_name}")
                owner[model_type, arch] = module_name
            by_type.setdefault(model_type, []).append(record)
    for family in dict.fromkeys(r.family for _, r in records):
        defaults = [m for m, r in records if r.family == family and r.export_when is None]
        if len(defaults) != 1:
            raise ValueError(f"mmjax family {family!r} needs exactly one default exporter "
                             f"(export_when=None), found {len(defaults)}: {', '.join(defaults)}")
    return tuple(r for _, r in records), by_type, broken


def _broken_note() -> str:
    broken = _discovered()[2]
    return "".join(f" ({name} could not be imported: {why})" for name, why in broken.items())


def converters() -> tuple[Converter, ...]:
    """Every discovered converter record, in module-name order."""
    return _discovered()[0]


def supported_model_types() -> list[str]:
    return sorted(_discovered()[1])


def for_model_type(model_type: Any) -> Converter:
    """The converter for an HF `model_type`; UnsupportedModelError listing the supported ones."""
    by_type = _discovered()[1]
    if not isinstance(model_type, str) or model_type not in by_type:
        hint = closest_name(model_type, by_type) if isinstance(model_type, str) else ""
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}{hint}; supported: {', '.join(supported_model_types())}"
            + _broken_note()
        )
    return by_type[model_type][0]


def for_hf_config(hf_config: Mapping[str, Any]) -> Converter:
    """The converter for a parsed `config.json`, checking `model_type` and `architectures`."""
    if "model_type" not in hf_config:
        raise UnsupportedModelError(
            f"config.json has no 'model_type'; supported: {', '.join(supported_model_types())}"
        )
    converter = for_model_type(hf_config["model_type"])
    archs = hf_config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    candidates = _discovered()[1][hf_config["model_type"]]
    for candidate in candidates:  # the record whose architectures hold the config's
        if archs and all(a in candidate.architectures for a in archs):
            return candidate
    bad = [a for a in archs if not any(a in c.architectures for c in candidates)] or archs
    if bad:
        supported = [a for c in candidates for a in c.architectures]
        raise UnsupportedModelError(
            f"unsupported architecture {', '.join(map(repr, bad))} for model_type "
            f"{hf_config['model_type']!r}; supported: {', '.join(supported)}"
        )
    return converter


def _of_family(family: str) -> list[Converter]:
    found = [c for c in converters() if c.family == family]
    if not found:
        families = sorted({c.family for c in converters()})
        raise UnsupportedModelError(
            f"no Hugging Face exporter for mmjax family {family!r}; supported: {', '.join(families)}"
            + _broken_note()
        )
    return found


def for_family(family: str) -> Converter:
    """The default converter that exports mmjax `family` to Hugging Face format."""
    return next(c for c in _of_family(family) if c.export_when is None)


def for_export(family: str, config: Any, model_type: str | None = None) -> Converter:
    """The converter that exports `config` of mmjax `family`: the one handling `model_type` when
    given, else the first whose `export_when(config)` holds, else the family's default."""
    found = _of_family(family)
    if model_type is not None:
        for c in found:
            if model_type in c.model_types:
                return c
        types = [t for c in found for t in c.model_types]
        raise UnsupportedModelError(f"cannot export mmjax family {family!r} as model_type {model_type!r}; "
                                    f"supported: {', '.join(types)}")
    for c in found:
        if c.export_when is not None and c.export_when(config):
            return c
    return next(c for c in found if c.export_when is None)
