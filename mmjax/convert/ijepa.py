"""Hugging Face `IJepaModel` / `IJepaForImageClassification` <-> an mmjax `ViT` in I-JEPA's layout.

The I-JEPA encoder (the context and the target encoder of the paper; transformers ships the
target encoder of the released checkpoints) is a pre-norm ViT without a [CLS] token: patch
convolution with bias, a position table over the patches only (`position_embeddings [1, N, d]`;
the reference fills it with fixed 2-D sin-cos values, transformers stores it as a tensor, so
mmjax loads it as the learned table and it stays bit-identical), biased q/k/v/o projections, a
final LayerNorm. So it converts to the "vit" family with the layout `IJEPA_LAYOUT`
(`class_token=False`, `pool="gap"`): `IJepaModel`'s `last_hidden_state` is mmjax's
`final_hidden`, and `IJepaForImageClassification`'s classifier reads the mean of those tokens,
which is mmjax's "gap" pooling under `head`.

Config: every key is mapped or on an explicit list (as `mmjax.convert.vit`); `pooler_act` /
`pooler_output_size` describe `IJepaPooler`, which transformers only builds with
`add_pooling_layer=True` (a Dense + tanh on the first *patch* token): a checkpoint holding its
tensors is refused by name (the strict tensor rules), one without is converted. Export: a ViT of
this layout (no [CLS], mean pooling, learned table, no pre-norm; `export_when`) goes out as
`IJepaModel`, or `IJepaForImageClassification` when it has a head.

`mmjax compare`: `last_hidden_state` and every hidden state (IJepaModel), or logits
(classification), on random images.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from mmjax.convert import hf_io, reference
from mmjax.convert.core import (Converter, TensorRule, activation_to_hf, apply_rules_from_hf,
                                apply_rules_to_hf, build_config, check_architecture, check_config_keys,
                                check_model_type, size_to_hf, stamp_version)
from mmjax.convert.vit import _DIRECT_KEYS, encoder_config_kwargs, encoder_layer_rules
from mmjax.convert.vit import _VIT_LAYER_NAMES as VIT_LAYER_NAMES
from mmjax.errors import UnsupportedModelError
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("IJepaModel", "IJepaForImageClassification")
# ViTConfig fields that make a ViT an I-JEPA encoder
IJEPA_LAYOUT = dict(pool="gap", posemb="learned", class_token=False, pre_norm=False, patch_bias=True,
                    patch_embed="linear")

# the config keys, class defaults and key -> field mapping are ViT's (`mmjax.convert.vit`)
_SPECIAL_KEYS = {"hidden_act", "pooler_output_size", "pooler_act", "id2label", "label2id",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "problem_type"}
# checkpoints name the blocks as ViT does (`encoder.layer.N.attention.attention.query`, what
# save_pretrained writes and the released models use); transformers' in-memory module names
# (`layers.N.attention.q_proj`) are accepted too and renamed on load
_LEGACY = (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
           ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
           ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
_LAYER = re.compile(r"^((?:ijepa\.)?)layers\.(\d+)\.(.*)$")


def _legacy_name(name: str) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    rest = m.group(3)
    for new, old in _LEGACY:
        if rest.startswith(new + "."):
            rest = old + rest[len(new):]
    return f"{m.group(1)}encoder.layer.{m.group(2)}.{rest}"


def has_layout(v: ViTConfig) -> bool:
    """Whether a ViT has I-JEPA's encoder layout (and so exports as `IJepaModel`)."""
    return all(getattr(v, k) == val for k, val in IJEPA_LAYOUT.items())


def config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    """`ViTConfig` for a parsed I-JEPA `config.json` (strict)."""
    check_model_type(hf, "ijepa", "I-JEPA")
    check_config_keys(hf, set(_DIRECT_KEYS) | _SPECIAL_KEYS, "ijepa config.json")
    arch = check_architecture(hf, ARCHITECTURES)
    kw = encoder_config_kwargs(hf, classifier=arch == "IJepaForImageClassification")
    return build_config(ViTConfig, {**kw, **IJEPA_LAYOUT}, "ijepa config.json")


def _check_exportable(config: ViTConfig) -> None:
    differ = [f"{k}={getattr(config, k)!r}" for k, v in IJEPA_LAYOUT.items() if getattr(config, k) != v]
    if config.representation:
        differ.append(f"representation={config.representation} (HF I-JEPA has no pre-logits layer)")
    if differ:
        raise UnsupportedModelError("cannot export this ViT to Hugging Face I-JEPA: " + ", ".join(differ))


def config_to_hf(config: ViTConfig, model_type: str | None = None) -> dict[str, Any]:
    if model_type not in (None, "ijepa"):
        raise UnsupportedModelError(f"cannot export an I-JEPA encoder as model_type {model_type!r}; supported: ijepa")
    _check_exportable(config)
    hf: dict[str, Any] = {
        "model_type": "ijepa", "hidden_size": config.dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_dim,
        "hidden_act": activation_to_hf(config.activation), "layer_norm_eps": config.norm_eps,
        "image_size": size_to_hf(config.image_size), "patch_size": size_to_hf(config.patch_size),
        "num_channels": config.channels, "qkv_bias": config.qkv_bias,
        "initializer_range": config.initializer_range, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "pooler_act": "tanh", "pooler_output_size": config.dim,
        "dtype": "float32",
    }
    if config.num_classes:
        hf["architectures"] = ["IJepaForImageClassification"]
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
    else:
        hf["architectures"] = ["IJepaModel"]
    return stamp_version(hf)


def tensor_rules(c: ViTConfig) -> list[TensorRule]:
    R = TensorRule
    d = c.dim
    ph, pw = c.patch_hw
    p = "ijepa." if c.num_classes else ""
    rules = [
        R(p + "embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"), (d, c.channels, ph, pw),
          "patch"),
        R(p + "embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias"), (d,), "copy"),
        R(p + "embeddings.position_embeddings", ("pos_embedding", "embedding"), (1, c.num_tokens, d), "squeeze"),
    ]
    for i in range(c.num_layers):
        rules += encoder_layer_rules(f"{p}encoder.layer.{i}.", f"layers_{i}", d, c.num_heads, c.mlp_dim,
                                     c.qkv_bias, VIT_LAYER_NAMES)
    rules += [R(p + "layernorm.weight", ("final_norm", "scale"), (d,), "copy"),
              R(p + "layernorm.bias", ("final_norm", "bias"), (d,), "copy")]
    if c.num_classes:
        rules += [R("classifier.weight", ("head", "kernel"), (c.num_classes, d), "linear"),
                  R("classifier.bias", ("head", "bias"), (c.num_classes,), "copy")]
    return rules


def params_from_hf(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    return apply_rules_from_hf({_legacy_name(k): v for k, v in tensors.items()}, tensor_rules(config))


def params_to_hf(params: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    _check_exportable(config)
    return apply_rules_to_hf(params, tensor_rules(config))


def compare_ijepa(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """IJepaModel: last_hidden_state and every hidden state; IJepaForImageClassification: logits."""
    import jax.numpy as jnp

    arch = (hf_io.read_config(hf_dir).get("architectures") or ["IJepaModel"])[0]
    images = reference.random_images(np.random.default_rng(seed), batch, config)
    hf_model = reference.load_reference(transformers, torch, arch, hf_dir)
    with torch.no_grad():
        ref = hf_model(pixel_values=torch.from_numpy(images), output_hidden_states=True)
    output, inter = reference.run_mmjax(module, np_params, jnp.asarray(reference.nhwc(images)))
    layer_diffs = reference.layer_diffs(inter["hidden_states"], ref.hidden_states)
    diffs = {"embeddings": layer_diffs[0], "hidden_states": max(layer_diffs)}
    if config.num_classes:
        diffs["logits"] = reference.max_abs(output, ref.logits)
    else:
        diffs["last_hidden_state"] = reference.max_abs(inter["final_hidden"], ref.last_hidden_state)
    extra = {"hidden_state_diffs": layer_diffs,
             "inputs": {"batch": batch, "image_size": list(config.image_hw), "seed": seed}}
    return diffs, extra


# an I-JEPA encoder is a ViT of IJEPA_LAYOUT: the "vit" family exports such a ViT as I-JEPA
CONVERTER = Converter(
    family="vit", model_types=("ijepa",), architectures=ARCHITECTURES, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    compare=compare_ijepa, export_when=has_layout,
)
