"""Hugging Face `ViTModel` / `ViTForImageClassification` <-> mmjax `ViT`.

Config: every key of `config.json` is mapped to a `ViTConfig` field or is on an explicit list
of keys that do not change the function computed at inference; anything else raises
`UnsupportedModelError` naming the key.

Decisions on keys accepted without a field:
  * `hidden_dropout_prob`, `attention_probs_dropout_prob` (>= 0): dropout acts only in
    training; the converted model computes the HF model in `eval()` mode. Export writes 0.0.
  * `encoder_stride`: used only by `ViTForMaskedImageModeling`'s pixel decoder.
  * `id2label` / `label2id` / `problem_type`: label names and the training loss; for
    `ViTForImageClassification` the number of labels is `len(id2label)`.
  * `pooler_act`: must be "tanh" (the only pooler activation mmjax has).

The architecture decides the head: `ViTModel` keeps HF's pooler (Dense + tanh on the
normalised [CLS] token) as mmjax's `representation` layer; `ViTForImageClassification` has no
pooler and a linear classifier on the normalised [CLS] token (`num_classes`). A `ViTModel`
saved with `add_pooling_layer=False` lacks the pooler tensors and is refused by name.

Export of the "vit" family goes by the model's layout: the HF ViT layout exports as `vit`
(here, the family's default exporter), CLIP's image-tower layout as `clip_vision_model`
(`CLIPVisionModel`, `mmjax.convert.clip`), SigLIP's as `siglip_vision_model`
(`SiglipVisionModel`, `mmjax.convert.siglip`): those records declare the layout they take
(`Converter.export_when`) and `mmjax.convert.to_hf` picks by it, so this module imports neither;
an explicit `model_type` (e.g. recorded at conversion) picks one.

Weights: the patch convolution `[dim, C, ph, pw]` becomes a Dense kernel `[ph*pw*C, dim]` on
(row, column, channel)-ordered patches; `cls_token [1, 1, dim]` and `position_embeddings
[1, tokens, dim]` lose their leading ones; attention projections keep heads as their own
dimension as in `mmjax.convert.llama`. Images are NHWC in mmjax and NCHW in transformers:
transpose with `images_nchw.transpose(0, 2, 3, 1)`. `encoder_layer_rules` (one pre-norm encoder
block under any HF naming) is shared with the CLIP and SigLIP towers.

`mmjax compare` (`compare_image_encoder`, also the runner of the CLIP / SigLIP vision towers):
pooled output or logits, last hidden state and every hidden state on random images.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import hf_io, reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_config_keys, check_dropout, check_model_type, size_to_hf,
                                stamp_version, tuple_sizes)
from mmjax.errors import UnsupportedModelError
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("ViTModel", "ViTForImageClassification")

# config.json key -> ViTConfig field
_DIRECT_KEYS = {
    "hidden_size": "dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_dim",
    "layer_norm_eps": "norm_eps",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "channels",
    "qkv_bias": "qkv_bias",
    "initializer_range": "initializer_range",
}
_SPECIAL_KEYS = {"hidden_act", "pooler_output_size", "pooler_act", "id2label", "label2id",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "encoder_stride",
                 "problem_type"}
# transformers.ViTConfig class defaults, used when a key is absent
_HF_DEFAULTS = dict(dim=768, num_layers=12, num_heads=12, mlp_dim=3072, norm_eps=1e-12,
                    image_size=224, patch_size=16, channels=3, qkv_bias=True, initializer_range=0.02)
# mmjax fields fixed by the HF ViT architecture
_HF_LAYOUT = dict(pool="cls", posemb="learned", class_token=True, pre_norm=False, patch_bias=True)


# --- config ---------------------------------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    """`ViTConfig` for a parsed ViT `config.json` (strict, see the module docstring)."""
    check_model_type(hf, "vit", "ViT")
    check_config_keys(hf, set(_DIRECT_KEYS) | _SPECIAL_KEYS, "vit config.json")
    arch = check_architecture(hf, ARCHITECTURES)
    kw = encoder_config_kwargs(hf, classifier=arch == "ViTForImageClassification")
    if hf.get("pooler_act", "tanh") != "tanh":
        raise UnsupportedModelError(f"pooler_act {hf['pooler_act']!r} is not supported; supported: tanh")
    if arch != "ViTForImageClassification":
        kw["representation"] = hf.get("pooler_output_size") or kw["dim"]
    return build_config(ViTConfig, {**kw, **_HF_LAYOUT}, "vit config.json")


def encoder_config_kwargs(hf: Mapping[str, Any], classifier: bool) -> dict[str, Any]:
    """ViTConfig fields of an HF ViT-style encoder config (ViT, I-JEPA share the keys and
    defaults): sizes, activation, dropout checks and, for a classifier, `num_classes` from
    `id2label`."""
    kw: dict[str, Any] = dict(_HF_DEFAULTS)
    for hf_key, field in _DIRECT_KEYS.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    tuple_sizes(kw, "image_size", "patch_size")
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu"))
    check_dropout(hf, "hidden_dropout_prob", "attention_probs_dropout_prob")
    if classifier:
        labels = hf.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
        if not isinstance(labels, Mapping) or not labels:
            raise UnsupportedModelError(f"id2label must be a non-empty object, got {labels!r}")
        kw["num_classes"] = len(labels)
    return kw


def _check_exportable(config: ViTConfig) -> None:
    differ = [f"{k}={getattr(config, k)!r}" for k, v in _HF_LAYOUT.items() if getattr(config, k) != v]
    if differ:
        raise UnsupportedModelError(
            f"cannot export this ViT to Hugging Face ViT: {', '.join(differ)} (HF ViT has "
            + ", ".join(f"{k}={v!r}" for k, v in _HF_LAYOUT.items()) + ")"
        )


def config_to_hf(config: ViTConfig, model_type: str | None = None) -> dict[str, Any]:
    """HF ViT `config.json` dict: `ViTForImageClassification` when the model has a
    classification head (and no pre-logits layer), `ViTModel` when it has a pre-logits layer
    (HF's pooler). (CLIP / SigLIP tower layouts export through their own converters, see the
    module docstring.)"""
    if model_type not in (None, "vit"):
        raise UnsupportedModelError(f"cannot export a ViT as model_type {model_type!r} here; supported: vit "
                                    "(mmjax.convert.to_hf also knows the CLIP / SigLIP tower types)")
    _check_exportable(config)
    hf: dict[str, Any] = {
        "model_type": "vit",
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": activation_to_hf(config.activation),
        "layer_norm_eps": config.norm_eps,
        "image_size": size_to_hf(config.image_size),
        "patch_size": size_to_hf(config.patch_size),
        "num_channels": config.channels,
        "qkv_bias": config.qkv_bias,
        "initializer_range": config.initializer_range,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": config.patch_hw[0],
        "pooler_act": "tanh",
        "dtype": "float32",
    }
    if config.num_classes:
        if config.representation:
            raise UnsupportedModelError(
                "cannot export a ViT with both a pre-logits layer (representation) and a head: HF "
                "ViTForImageClassification has no pooler before its classifier")
        hf["architectures"] = ["ViTForImageClassification"]
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
    else:
        if not config.representation:
            raise UnsupportedModelError(
                "cannot export a features-only ViT without a pre-logits layer: HF ViTModel always "
                "has a pooler (Dense + tanh); set representation=dim or add a classification head")
        hf["architectures"] = ["ViTModel"]
        hf["pooler_output_size"] = config.representation
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def encoder_layer_rules(hf: str, mj: str, dim: int, heads: int, mlp: int, qkv_bias: bool,
                        names: Mapping[str, str]) -> list[TensorRule]:
    """Rules of one pre-norm encoder block (`mmjax.nn.transformer.Block`, `vit_block_spec`) whose HF tensor
    names are `hf` + names[role] for the roles ln1, q, k, v, o, ln2, fc1, fc2."""
    R = TensorRule
    rules = [R(f"{hf}{names['ln1']}.weight", (mj, "attn_norm", "scale"), (dim,), "copy"),
             R(f"{hf}{names['ln1']}.bias", (mj, "attn_norm", "bias"), (dim,), "copy")]
    for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules.append(R(f"{hf}{names[role]}.weight", (mj, "attn", name, "kernel"), (dim, dim), "in_proj", heads))
        if qkv_bias:
            rules.append(R(f"{hf}{names[role]}.bias", (mj, "attn", name, "bias"), (dim,), "in_bias", heads))
    rules += [
        R(f"{hf}{names['o']}.weight", (mj, "attn", "out", "kernel"), (dim, dim), "out_proj", heads),
        R(f"{hf}{names['o']}.bias", (mj, "attn", "out", "bias"), (dim,), "copy"),
        R(f"{hf}{names['ln2']}.weight", (mj, "mlp_norm", "scale"), (dim,), "copy"),
        R(f"{hf}{names['ln2']}.bias", (mj, "mlp_norm", "bias"), (dim,), "copy"),
        R(f"{hf}{names['fc1']}.weight", (mj, "mlp", "fc1", "kernel"), (mlp, dim), "linear"),
        R(f"{hf}{names['fc1']}.bias", (mj, "mlp", "fc1", "bias"), (mlp,), "copy"),
        R(f"{hf}{names['fc2']}.weight", (mj, "mlp", "fc2", "kernel"), (dim, mlp), "linear"),
        R(f"{hf}{names['fc2']}.bias", (mj, "mlp", "fc2", "bias"), (dim,), "copy"),
    ]
    return rules


_VIT_LAYER_NAMES = {
    "ln1": "layernorm_before", "q": "attention.attention.query", "k": "attention.attention.key",
    "v": "attention.attention.value", "o": "attention.output.dense", "ln2": "layernorm_after",
    "fc1": "intermediate.dense", "fc2": "output.dense",
}


def tensor_rules(c: ViTConfig) -> list[TensorRule]:
    """Every tensor of an HF ViT checkpoint of `c` (classification models under `vit.`)."""
    R = TensorRule
    d = c.dim
    ph, pw = c.patch_hw
    p = "vit." if c.num_classes else ""
    rules = [
        R(p + "embeddings.cls_token", ("cls",), (1, 1, d), "squeeze"),
        R(p + "embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"),
          (d, c.channels, ph, pw), "patch"),
        R(p + "embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias"), (d,), "copy"),
        R(p + "embeddings.position_embeddings", ("pos_embedding", "embedding"), (1, c.num_tokens, d),
          "squeeze"),
    ]
    for i in range(c.num_layers):
        rules += encoder_layer_rules(f"{p}encoder.layer.{i}.", f"layers_{i}", d, c.num_heads, c.mlp_dim,
                                     c.qkv_bias, _VIT_LAYER_NAMES)
    rules += [R(p + "layernorm.weight", ("final_norm", "scale"), (d,), "copy"),
              R(p + "layernorm.bias", ("final_norm", "bias"), (d,), "copy")]
    if c.representation:
        rules += [R("pooler.dense.weight", ("pre_logits", "kernel"), (c.representation, d), "linear"),
                  R("pooler.dense.bias", ("pre_logits", "bias"), (c.representation,), "copy")]
    if c.num_classes:
        width = c.representation or d
        rules += [R("classifier.weight", ("head", "kernel"), (c.num_classes, width), "linear"),
                  R("classifier.bias", ("head", "bias"), (c.num_classes,), "copy")]
    return rules


def params_from_hf(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    """mmjax ViT params (nested dict of float32 numpy arrays) from HF ViT tensors."""
    return apply_rules_from_hf(tensors, tensor_rules(config))


def params_to_hf(params: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    """HF ViT tensors from plain mmjax ViT params."""
    _check_exportable(config)
    return apply_rules_to_hf(params, tensor_rules(config))


# --- mmjax compare --------------------------------------------------------------------------

def compare_image_encoder(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers,
                          last_hidden_is_encoder_output: bool = False):
    """ViTModel / CLIPVisionModel / SiglipVisionModel (pooler output, last hidden state) and
    ViTForImageClassification (logits), and every hidden state, on random images (mmjax gets
    them NHWC). `last_hidden_is_encoder_output`: the HF model's `last_hidden_state` is the
    encoder output before the final norm (CLIPVisionModel's, before `post_layernorm`)."""
    import jax.numpy as jnp

    arch = (hf_io.read_config(hf_dir).get("architectures") or ["ViTModel"])[0]
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
        ours_last = inter["hidden_states"][-1] if last_hidden_is_encoder_output else inter["final_hidden"]
        diffs["last_hidden_state"] = reference.max_abs(ours_last, ref.last_hidden_state)
        diffs["pooler_output"] = reference.max_abs(output, ref.pooler_output)
    extra = {"hidden_state_diffs": layer_diffs,
             "inputs": {"batch": batch, "image_size": list(config.image_hw), "seed": seed}}
    return diffs, extra


CONVERTER = Converter(
    family="vit",
    model_types=("vit",),
    architectures=ARCHITECTURES,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    compare=compare_image_encoder,
)
