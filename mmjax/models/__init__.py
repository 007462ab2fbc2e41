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


def _clip_text():
    from mmjax.models.clip import CLIPTextConfig, TextTransformer

    return CLIPTextConfig, TextTransformer


def _siglip():
    from mmjax.models.siglip import SigLIP, SiglipConfig

    return SiglipConfig, SigLIP


# family name -> lazy loader of (config class, module class)
FAMILIES: dict[str, Callable[[], tuple[type, type]]] = {
    "llama": _llama,
    "vit": _vit,
    "clip": _clip,
    "clip_text": _clip_text,
    "siglip": _siglip,
}


def get_family(family: str) -> tuple[type, type]:
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"unknown model family {family!r}{closest_name(family, FAMILIES)}; known: {', '.join(FAMILIES)}"
        )
    return FAMILIES[family]()


def _example_vision(config) -> tuple:
    import jax.numpy as jnp

    h, w = config.image_hw
    return (jnp.zeros((1, h, w, config.channels), jnp.float32),)


def _example_clip_text(config) -> tuple:
    import jax.numpy as jnp

    # the end-of-text id where the tower pools at it (it refuses concrete rows without one)
    eos = config.eos_token_id if config.eos_pooling == "first_eos" else 0
    return (jnp.full((1, 1), eos, jnp.int32),)


def _example_clip(config) -> tuple:
    return _example_vision(config.vision) + _example_clip_text(config.text)


def _example_tokens(config) -> tuple:
    import jax.numpy as jnp

    return (jnp.zeros((1, 1), jnp.int32),)


# family -> config -> positional inputs of a smallest `module.init` call (param shapes only)
EXAMPLE_INPUTS: dict[str, Callable[[Any], tuple]] = {
    "llama": _example_tokens,
    "vit": _example_vision,
    "clip": _example_clip,
    "clip_text": _example_clip_text,
    "siglip": _example_clip,
}


def example_inputs(family: str, config: Any) -> tuple:
    """Inputs with which `module.init` builds every param of `family` (batch 1)."""
    if family not in EXAMPLE_INPUTS:
        raise UnsupportedModelError(f"model family {family!r} has no example inputs registered")
    return EXAMPLE_INPUTS[family](config)


def abstract_params(family: str, module: Any, config: Any) -> Any:
    """Unboxed ShapeDtypeStructs of `module`'s params (no computation, no memory)."""
    import flax.linen as nn
    import jax

    args = example_inputs(family, config)
    boxed = jax.eval_shape(lambda r: module.init(r, *args)["params"], jax.random.PRNGKey(0))
    return nn.meta.unbox(boxed)


def build_model(family: str, config: dict[str, Any] | Any):
    """Module for `family` from a config dataclass or its dict form. Returns (module, config)."""
    config_cls, module_cls = get_family(family)
    if isinstance(config, dict):
        config = config_cls.from_dict(config)
    return module_cls(config), config
