"""Model families by name: `build_model(family, config_dict) -> (module, config)`."""

from __future__ import annotations

from typing import Any, Callable

from mmjax.configs import closest_name
from mmjax.errors import UnsupportedModelError


def _llama():
    from mmjax.models.llama import Llama, LlamaConfig

    return LlamaConfig, Llama


def _vit():
    from mmjax.models.vit import ViT, ViTConfig

    return ViTConfig, ViT


def _clip():
    from mmjax.models.clip import CLIP, CLIPConfig

    return CLIPConfig, CLIP


# family name -> lazy loader of (config class, module class)
FAMILIES: dict[str, Callable[[], tuple[type, type]]] = {
    "llama": _llama,
    "vit": _vit,
    "clip": _clip,
}


def get_family(family: str) -> tuple[type, type]:
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"unknown model family {family!r}{closest_name(family, FAMILIES)}; known: {', '.join(FAMILIES)}"
        )
    return FAMILIES[family]()


def build_model(family: str, config: dict[str, Any] | Any):
    """Module for `family` from a config dataclass or its dict form. Returns (module, config)."""
    config_cls, module_cls = get_family(family)
    if isinstance(config, dict):
        config = config_cls.from_dict(config)
    return module_cls(config), config
