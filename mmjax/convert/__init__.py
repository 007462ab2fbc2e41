"""Hugging Face checkpoints <-> mmjax models.

    module, params = from_hf("path/to/hf_dir")          # LLaMA / Mistral save_pretrained dir
    module, params = from_hf("org/name")                # a Hub id, from huggingface_hub's cache
    logits = module.apply({"params": params}, tokens)
    to_hf(module, params, "path/to/out_dir")              # config.json + model.safetensors

`from_hf` returns plain (unboxed) float32 params as a nested dict of jax arrays. Conversion is
strict: config keys mmjax does not understand raise `UnsupportedModelError`, missing,
unexpected or wrongly shaped tensors raise `InputError` (see `mmjax.convert.core`).

Each family is one converter file here (`llama.py`, `vit.py`, ...) exposing its
`mmjax.convert.core.Converter` record(s); `mmjax.convert.registry` discovers them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mmjax.convert import hf_io, registry


def read_hf(path: str, *, download: bool = False):
    """(converter, hf_config dict, mmjax config, params as numpy) for an HF directory or Hub id
    (`hf_io.resolve`)."""
    path = hf_io.resolve(path, download=download)
    hf_config = hf_io.read_config(path)
    converter = registry.for_hf_config(hf_config)
    config = converter.config_from_hf(hf_config)
    tensors = hf_io.read_weights(path)
    params = converter.params_from_hf(tensors, config)
    return converter, hf_config, config, params


def from_hf(path: str, *, download: bool = False) -> tuple[Any, dict[str, Any]]:
    """(mmjax module, params) for the Hugging Face checkpoint directory `path`, or a Hub id
    `org/name[@revision]` found in huggingface_hub's cache (`download=True`: fetched when
    missing, unless HF_HUB_OFFLINE=1)."""
    from mmjax.models import build_model

    converter, _, config, np_params = read_hf(path, download=download)
    module, _ = build_model(converter.family, config)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), np_params)
    return module, params


def to_hf(module_or_config: Any, params: Mapping[str, Any], out_dir: str, *,
          family: str | None = None, model_type: str | None = None) -> None:
    """Write `params` of a model (a module with `.config`, or its config) as an HF directory.

    family: mmjax family name; default: found from the config's class (e.g. LlamaConfig ->
      "llama"). model_type: the HF model_type to write (default: the best fit, e.g. "mistral"
      for a sliding-window LLaMA, "mixtral" for an MoE one, "clip_vision_model" for a ViT with
      CLIP's image-tower layout; `registry.for_export`).
    """
    import flax.linen as nn
    import numpy as np

    from mmjax.nn.transformer import unstack_layer_params

    config = getattr(module_or_config, "config", module_or_config)
    family = family or _family_of(config)
    converter = registry.for_export(family, config, model_type)
    hf_config = converter.config_to_hf(config, model_type)
    plain = nn.meta.unbox(params)
    if isinstance(plain, Mapping) and set(plain) == {"params"}:
        plain = plain["params"]
    np_params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), plain)
    np_params = unstack_layer_params(np_params)  # a scanned stack exports as its layers
    tensors = converter.params_to_hf(np_params, config)
    hf_io.write_hf_dir(out_dir, hf_config, tensors)


def _family_of(config: Any) -> str:
    from mmjax.errors import UnsupportedModelError
    from mmjax.models import family_of

    try:
        return family_of(config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"to_hf: {e}; pass family=...") from None


__all__ = ["from_hf", "to_hf", "read_hf"]
