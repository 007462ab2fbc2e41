"""Hugging Face `SiglipModel` <-> mmjax `SigLIP`; `SiglipVisionModel` <-> `ViT` (SigLIP layout).

Config: the top level and both sub-configs are checked key by key (as `mmjax.convert.clip`):
every key is mapped to a field or is on an explicit list of keys that do not change the
function computed at inference; anything else raises `UnsupportedModelError` naming it.

Decisions on keys accepted without a field:
  * `attention_dropout` (>= 0): training only; the converted model computes `eval()` mode.
  * `initializer_factor`: initialisation only.
  * text `bos_token_id` / `eos_token_id` / `pad_token_id`: kept for export; SigLIP pools at the
    last position, whatever the ids.
  * `vision_use_head` must be true: without the attention-pooling head HF's vision tower has
    no pooled output, so `SiglipModel` could not compute image embeddings.
  * `image_size` must be one int: HF sizes the position table as (image_size // patch)^2.

Weights: as `mmjax.convert.clip` for the encoders. The pooling head's
`torch.nn.MultiheadAttention` packs q, k, v into `in_proj_weight [3*dim, dim]` /
`in_proj_bias [3*dim]`: they are split into mmjax's `map_head/attn/{query,key,value}` (heads
kept as their own dimension) and concatenated back on export. `probe [1, 1, dim]` ->
`map_head/probe [dim]`; `logit_scale` / `logit_bias` `[1]` -> 0-d params; the text head
`[proj, dim]` -> `text_head/kernel [dim, proj]`. The head's in_proj is split and joined with
`mmjax.convert.core.split_rows` / `join_rows`; the text tower reuses CLIP's rules
(`mmjax.convert.clip.text_tower_rules`), the encoder blocks ViT's. `VISION_CONVERTER` declares
SigLIP's image-tower layout (`Converter.export_when`), so `mmjax.convert.to_hf` exports such a
ViT as `SiglipVisionModel`.

`mmjax compare`: `compare_siglip` (embeddings, logits, pooled image output, both towers' hidden
states; text unpadded and unmasked, as SigLIP was trained) and ViT's `compare_image_encoder` for
`SiglipVisionModel`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import reference
from mmjax.convert.clip import CLIP_LAYER_NAMES, DERIVED_BUFFERS, text_tower_rules
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_config_keys, check_dropout, check_model_type, int_or_none, join_rows,
                                split_rows, stamp_version, strip_prefix, sub_config)
from mmjax.convert.vit import compare_image_encoder, encoder_layer_rules
from mmjax.errors import UnsupportedModelError
from mmjax.models.clip import CLIPTextConfig
from mmjax.models.siglip import SIGLIP_TEXT_LAYOUT, SIGLIP_VISION_LAYOUT, SigLIPConfig
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("SiglipModel",)
VISION_ARCHITECTURES = ("SiglipVisionModel",)

_TOP_KEYS = {"text_config", "vision_config", "initializer_factor"}
_TEXT_KEYS = {  # HF key -> CLIPTextConfig field (None: handled separately)
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "mlp_dim",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_len", "layer_norm_eps": "norm_eps",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
    "hidden_act": None, "attention_dropout": None, "projection_size": None, "initializer_factor": None,
}
_VISION_KEYS = {  # HF key -> ViTConfig field
    "hidden_size": "dim", "intermediate_size": "mlp_dim", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_channels": "channels", "image_size": "image_size",
    "patch_size": "patch_size", "layer_norm_eps": "norm_eps",
    "hidden_act": None, "attention_dropout": None, "vision_use_head": None, "initializer_factor": None,
}
# transformers SiglipTextConfig / SiglipVisionConfig class defaults
_TEXT_DEFAULTS = dict(vocab_size=32000, dim=768, mlp_dim=3072, num_layers=12, num_heads=12, max_len=64,
                      norm_eps=1e-6, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
_VISION_DEFAULTS = dict(dim=768, mlp_dim=3072, num_layers=12, num_heads=12, channels=3, image_size=224,
                        patch_size=16, norm_eps=1e-6)
_LAYOUT_KEYS = ("pool", "posemb", "class_token", "pre_norm", "patch_bias", "qkv_bias")


# --- config ---------------------------------------------------------------------------------

def text_config_from_hf(hf: Mapping[str, Any], where: str = "text_config") -> tuple[CLIPTextConfig, int]:
    """(CLIPTextConfig with SigLIP's layout, head width) of a SigLIP text config."""
    check_config_keys(hf, _TEXT_KEYS, f"siglip {where}")
    kw = dict(_TEXT_DEFAULTS)
    kw.update({field: hf[k] for k, field in _TEXT_KEYS.items() if field and k in hf})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kw[key] = int_or_none(kw[key], f"{where}.{key}")
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu_pytorch_tanh"), f"{where}.hidden_act")
    check_dropout(hf, "attention_dropout")
    projection = hf.get("projection_size") or kw["dim"]
    return build_config(CLIPTextConfig, {**kw, **SIGLIP_TEXT_LAYOUT}, f"siglip {where}"), projection


def vision_config_from_hf(hf: Mapping[str, Any], where: str = "vision_config") -> ViTConfig:
    """ViTConfig with SigLIP's layout of a SigLIP vision config."""
    check_config_keys(hf, _VISION_KEYS, f"siglip {where}")
    if hf.get("vision_use_head", True) is not True:
        raise UnsupportedModelError(f"siglip {where}.vision_use_head={hf['vision_use_head']!r}: only the "
                                    "attention-pooling head (true) has a pooled output")
    kw = dict(_VISION_DEFAULTS)
    kw.update({field: hf[k] for k, field in _VISION_KEYS.items() if field and k in hf})
    for key in ("image_size", "patch_size"):
        if isinstance(kw[key], bool) or not isinstance(kw[key], int):
            raise UnsupportedModelError(f"siglip {where}.{key} must be one int (square images), got {kw[key]!r}")
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu_pytorch_tanh"), f"{where}.hidden_act")
    check_dropout(hf, "attention_dropout")
    return build_config(ViTConfig, {**kw, **SIGLIP_VISION_LAYOUT}, f"siglip {where}")


def config_from_hf(hf: Mapping[str, Any]) -> SigLIPConfig:
    """`SigLIPConfig` for a parsed `SiglipModel` config.json (strict)."""
    check_model_type(hf, "siglip", "SigLIP")
    check_architecture(hf, ARCHITECTURES)
    check_config_keys(hf, _TOP_KEYS, "siglip config.json")
    what = "siglip config.json"
    text, projection = text_config_from_hf(sub_config(hf, "text_config", "siglip_text_model", what))
    vision = vision_config_from_hf(sub_config(hf, "vision_config", "siglip_vision_model", what))
    return build_config(SigLIPConfig, dict(vision=vision, text=text, projection_dim=projection), what)


def has_vision_layout(v: ViTConfig) -> bool:
    """Whether a ViT has SigLIP's image-tower layout (and so exports as `SiglipVisionModel`)."""
    return all(getattr(v, k) == SIGLIP_VISION_LAYOUT[k] for k in _LAYOUT_KEYS)


def _check_vision_exportable(v: ViTConfig, what: str) -> None:
    differ = [f"{k}={getattr(v, k)!r}" for k in _LAYOUT_KEYS if getattr(v, k) != SIGLIP_VISION_LAYOUT[k]]
    if v.num_classes or v.representation:
        differ.append(f"num_classes={v.num_classes}, representation={v.representation}")
    if v.image_hw[0] != v.image_hw[1] or v.patch_hw[0] != v.patch_hw[1]:
        differ.append(f"image_size={v.image_size!r}, patch_size={v.patch_size!r} (HF SigLIP is square)")
    if differ:
        raise UnsupportedModelError(f"cannot export this model to Hugging Face {what}: {', '.join(differ)}")


def _check_text_exportable(t: CLIPTextConfig) -> None:
    differ = [f"text.{k}={getattr(t, k)!r}" for k, v in SIGLIP_TEXT_LAYOUT.items() if getattr(t, k) != v]
    if differ:
        raise UnsupportedModelError(f"cannot export this text tower to Hugging Face SiglipModel: {', '.join(differ)}")


def _vision_dict(v: ViTConfig) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model", "hidden_size": v.dim, "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": v.channels,
        "image_size": v.image_hw[0], "patch_size": v.patch_hw[0], "hidden_act": activation_to_hf(v.activation),
        "layer_norm_eps": v.norm_eps, "attention_dropout": 0.0, "vision_use_head": True,
    }


def config_to_hf(config: SigLIPConfig, model_type: str | None = None) -> dict[str, Any]:
    """`config.json` dict of a `SiglipModel` (transformers 5 layout)."""
    if model_type not in (None, "siglip"):
        raise UnsupportedModelError(f"cannot export a SigLIP as model_type {model_type!r}; supported: siglip")
    _check_vision_exportable(config.vision, "SiglipModel")
    _check_text_exportable(config.text)
    t = config.text
    text = {
        "model_type": "siglip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.dim,
        "intermediate_size": t.mlp_dim, "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "max_position_embeddings": t.max_len, "hidden_act": activation_to_hf(t.activation),
        "layer_norm_eps": t.norm_eps, "attention_dropout": 0.0, "projection_size": config.embed_dim,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
    }
    hf = {"architectures": list(ARCHITECTURES), "model_type": "siglip", "initializer_factor": 1.0,
          "text_config": text, "vision_config": _vision_dict(config.vision), "dtype": "float32"}
    return stamp_version(hf)


def vision_model_config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    check_model_type(hf, "siglip_vision_model", "SiglipVisionModel")
    check_architecture(hf, VISION_ARCHITECTURES)
    return vision_config_from_hf(hf, where="siglip_vision_model config.json")


def vision_model_config_to_hf(config: ViTConfig, model_type: str | None = None) -> dict[str, Any]:
    _check_vision_exportable(config, "SiglipVisionModel")
    hf = _vision_dict(config)
    hf.update(architectures=list(VISION_ARCHITECTURES), dtype="float32")
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def vision_tower_rules(v: ViTConfig, hf: str = "") -> list[TensorRule]:
    """Tensors of a SigLIP image tower (HF names under `hf`, mmjax paths from the ViT's root).
    The pooling head's packed in_proj appears as virtual `head.attention.{q,k,v}_proj` names
    (see `head_in_proj`)."""
    R = TensorRule
    d, m, heads = v.dim, v.mlp_dim, v.num_heads
    ph, pw = v.patch_hw
    rules = [
        R(hf + "embeddings.patch_embedding.weight", ("patch_embed", "kernel"), (d, v.channels, ph, pw), "patch"),
        R(hf + "embeddings.patch_embedding.bias", ("patch_embed", "bias"), (d,), "copy"),
        R(hf + "embeddings.position_embedding.weight", ("pos_embedding", "embedding"), (v.num_tokens, d), "copy"),
    ]
    for i in range(v.num_layers):
        rules += encoder_layer_rules(f"{hf}encoder.layers.{i}.", f"layers_{i}", d, heads, m, True,
                                     CLIP_LAYER_NAMES)
    rules += [R(hf + "post_layernorm.weight", ("final_norm", "scale"), (d,), "copy"),
              R(hf + "post_layernorm.bias", ("final_norm", "bias"), (d,), "copy")]
    h = hf + "head."
    mh = "map_head"
    rules.append(R(h + "probe", (mh, "probe"), (1, 1, d), "squeeze"))
    for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [R(f"{h}attention.{role}_proj.weight", (mh, "attn", name, "kernel"), (d, d), "in_proj", heads),
                  R(f"{h}attention.{role}_proj.bias", (mh, "attn", name, "bias"), (d,), "in_bias", heads)]
    rules += [
        R(h + "attention.out_proj.weight", (mh, "attn", "out", "kernel"), (d, d), "out_proj", heads),
        R(h + "attention.out_proj.bias", (mh, "attn", "out", "bias"), (d,), "copy"),
        R(h + "layernorm.weight", (mh, "norm", "scale"), (d,), "copy"),
        R(h + "layernorm.bias", (mh, "norm", "bias"), (d,), "copy"),
        R(h + "mlp.fc1.weight", (mh, "mlp", "fc1", "kernel"), (m, d), "linear"),
        R(h + "mlp.fc1.bias", (mh, "mlp", "fc1", "bias"), (m,), "copy"),
        R(h + "mlp.fc2.weight", (mh, "mlp", "fc2", "kernel"), (d, m), "linear"),
        R(h + "mlp.fc2.bias", (mh, "mlp", "fc2", "bias"), (d,), "copy"),
    ]
    return rules


def tensor_rules(c: SigLIPConfig) -> list[TensorRule]:
    """Every tensor of an HF `SiglipModel` checkpoint of `c` (in_proj unpacked)."""
    R = TensorRule
    t = c.text
    rules = [R("logit_scale", ("logit_scale",), (1,), "scalar"),
             R("logit_bias", ("logit_bias",), (1,), "scalar")]
    rules += [r.under("text") for r in text_tower_rules(t, "text_model.")]
    rules += [R("text_model.head.weight", ("text_head", "kernel"), (c.embed_dim, t.dim), "linear"),
              R("text_model.head.bias", ("text_head", "bias"), (c.embed_dim,), "copy")]
    rules += [r.under("vision") for r in vision_tower_rules(c.vision, "vision_model.")]
    return rules


def head_in_proj(hf: str = "") -> dict[str, tuple[str, ...]]:
    """The pooling head's packed tensors (`torch.nn.MultiheadAttention`, under `hf`) -> the
    virtual per-projection names the rules use, for `split_rows` / `join_rows`."""
    a = hf + "head.attention."
    return {f"{a}in_proj_{leaf}": tuple(f"{a}{role}_proj.{leaf}" for role in "qkv")
            for leaf in ("weight", "bias")}


def params_from_hf(tensors: Mapping[str, np.ndarray], config: SigLIPConfig) -> dict[str, Any]:
    """mmjax SigLIP params (nested dict of float32 numpy arrays) from HF `SiglipModel` tensors."""
    return apply_rules_from_hf(split_rows(tensors, head_in_proj("vision_model.")), tensor_rules(config),
                               derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: SigLIPConfig) -> dict[str, np.ndarray]:
    """HF `SiglipModel` tensors from plain mmjax SigLIP params."""
    _check_vision_exportable(config.vision, "SiglipModel")
    _check_text_exportable(config.text)
    return join_rows(apply_rules_to_hf(params, tensor_rules(config)), head_in_proj("vision_model."))


def vision_model_params_from_hf(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    tensors = split_rows(strip_prefix(tensors, "vision_model."), head_in_proj())
    return apply_rules_from_hf(tensors, vision_tower_rules(config), derived=DERIVED_BUFFERS)


def vision_model_params_to_hf(params: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    _check_vision_exportable(config, "SiglipVisionModel")
    return join_rows(apply_rules_to_hf(params, vision_tower_rules(config)), head_in_proj())


# --- mmjax compare --------------------------------------------------------------------------

def compare_siglip(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """SiglipModel: normalised embeddings, logits (scale and bias), the image tower's pooled
    (attention-pooling head) output and both towers' hidden states. SigLIP's text is padded to
    its full length and read without an attention mask, as the model was trained."""
    import jax.numpy as jnp

    seq_len = min(seq_len, config.text.max_len)
    rng = np.random.default_rng(seed)
    images = reference.random_images(rng, batch, config.vision)
    tokens = rng.integers(0, config.text.vocab_size, size=(batch, seq_len)).astype(np.int64)
    hf_model = reference.load_reference(transformers, torch, "SiglipModel", hf_dir)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                       output_hidden_states=True)
    out, inter = reference.run_mmjax(module, np_params, jnp.asarray(reference.nhwc(images)),
                                     jnp.asarray(tokens, jnp.int32))
    vref, tref = ref.vision_model_output, ref.text_model_output
    vision_diffs = reference.layer_diffs(inter["vision"]["hidden_states"], vref.hidden_states)
    text_diffs = reference.layer_diffs(inter["text"]["hidden_states"], tref.hidden_states)
    diffs = {
        "image_embeds": reference.max_abs(out["image_embeds"], ref.image_embeds),
        "text_embeds": reference.max_abs(out["text_embeds"], ref.text_embeds),
        "logits_per_image": reference.max_abs(out["logits_per_image"], ref.logits_per_image),
        "vision_pooler_output": reference.max_abs(inter["vision"]["pooled"], vref.pooler_output),
        "vision_hidden_states": max(vision_diffs),
        "text_hidden_states": max(text_diffs),
    }
    extra = {"vision_hidden_state_diffs": vision_diffs, "text_hidden_state_diffs": text_diffs,
             "inputs": {"batch": batch, "seq_len": seq_len, "image_size": list(config.vision.image_hw),
                        "seed": seed},
             "reference_logits_max_abs": float(np.abs(ref.logits_per_image.numpy()).max())}
    return diffs, extra


CONVERTER = Converter(
    family="siglip", model_types=("siglip",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf, compare=compare_siglip,
)
# a ViT of SigLIP's layout: the "vit" family exports it as SiglipVisionModel (export_when)
VISION_CONVERTER = Converter(
    family="vit", model_types=("siglip_vision_model",), architectures=VISION_ARCHITECTURES,
    config_from_hf=vision_model_config_from_hf, config_to_hf=vision_model_config_to_hf,
    params_from_hf=vision_model_params_from_hf, params_to_hf=vision_model_params_to_hf,
    compare=compare_image_encoder, export_when=has_vision_layout,
)
CONVERTERS = (CONVERTER, VISION_CONVERTER)
