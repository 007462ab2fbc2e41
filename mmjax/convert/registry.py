"""Which converter handles which Hugging Face `model_type` / mmjax model family.

A `Converter` bundles the four mappings of one model family (config and weights, both ways)
and the kind of reference comparison `mmjax compare` runs for it (`task`). Families register
lazily by module path, so adding one (vit, clip, ...) is one line in `_MODEL_TYPES` and a
module exposing `CONVERTER`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import numpy as np

from mmjax.configs import closest_name
from mmjax.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class Converter:
    """Conversion between one Hugging Face model family and one mmjax model family.

    family: the mmjax family name for `mmjax.models.build_model`.
    model_types: HF `model_type` values handled; the first is the default for export.
    architectures: HF `architectures` entries accepted (e.g. "LlamaForCausalLM").
    task: which comparison `mmjax compare` runs ("causal_lm", ...).
    config_from_hf(hf_config_dict) -> mmjax config dataclass (strict: unknown keys raise).
    config_to_hf(config, model_type) -> HF config dict (`model_type` None = best guess).
    params_from_hf(tensors, config) -> mmjax params (nested dict of numpy arrays).
    params_to_hf(params, config) -> {HF tensor name: numpy array}.
    """

    family: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    task: str
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    config_to_hf: Callable[[Any, str | None], dict[str, Any]]
    params_from_hf: Callable[[Mapping[str, np.ndarray], Any], dict[str, Any]]
    params_to_hf: Callable[[Mapping[str, Any], Any], dict[str, np.ndarray]]


# HF model_type -> module defining CONVERTER ("module:NAME" for another attribute)
_MODEL_TYPES: dict[str, str] = {
    "llama": "mmjax.convert.llama",
    "mistral": "mmjax.convert.llama",
    "mixtral": "mmjax.convert.mixtral",
    "vit": "mmjax.convert.vit",
    "clip": "mmjax.convert.clip",
    "clip_vision_model": "mmjax.convert.clip:VISION_CONVERTER",
    "clip_text_model": "mmjax.convert.clip:TEXT_CONVERTER",
    "siglip": "mmjax.convert.siglip",
    "siglip_vision_model": "mmjax.convert.siglip:VISION_CONVERTER",
}


def supported_model_types() -> list[str]:
    return sorted(_MODEL_TYPES)


def _load(module: str) -> Converter:
    path, _, name = module.partition(":")
    return getattr(importlib.import_module(path), name or "CONVERTER")


def for_model_type(model_type: Any) -> Converter:
    """The converter for an HF `model_type`; UnsupportedModelError listing the supported ones."""
    if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
        hint = closest_name(model_type, _MODEL_TYPES) if isinstance(model_type, str) else ""
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}{hint}; supported: {', '.join(supported_model_types())}"
        )
    return _load(_MODEL_TYPES[model_type])


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
    bad = [a for a in archs if a not in converter.architectures]
    if bad:
        raise UnsupportedModelError(
            f"unsupported architecture {', '.join(map(repr, bad))} for model_type "
            f"{hf_config['model_type']!r}; supported: {', '.join(converter.architectures)}"
        )
    return converter


def for_family(family: str) -> Converter:
    """The converter that exports mmjax `family` to Hugging Face format."""
    for module in dict.fromkeys(_MODEL_TYPES.values()):
        converter = _load(module)
        if converter.family == family:
            return converter
    families = sorted({_load(m).family for m in set(_MODEL_TYPES.values())})
    raise UnsupportedModelError(
        f"no Hugging Face exporter for mmjax family {family!r}; supported: {', '.join(families)}"
    )
