"""Hugging Face `CLIPModel` <-> mmjax `CLIP`; `CLIPVisionModel` <-> `ViT`; `CLIPTextModel` <->
`TextTransformer`.

Three converters: `CONVERTER` (model_type "clip", family "clip"), `VISION_CONVERTER`
("clip_vision_model" -> family "vit", a ViT with CLIP's layout whose output is HF's
`pooler_output`) and `TEXT_CONVERTER` ("clip_text_model" -> family "clip_text", the text tower
whose output is HF's `pooler_output`, the final-normed hidden state at the end-of-text token).
Stand-alone towers are written by transformers 5 without a `vision_model.` / `text_model.`
prefix; checkpoints with the prefix (older versions) are read too.

Config: the top level and both sub-configs (`text_config`, `vision_config`) are checked key by
key like `mmjax.convert.llama`: every key is mapped to a field or on an explicit list of keys
that do not change the function computed at inference; anything else raises
`UnsupportedModelError` naming the key (with its sub-config).

Decisions on keys accepted without a field:
  * `attention_dropout` (>= 0): training only; the converted model computes `eval()` mode.
  * `initializer_factor`, sub-config `projection_dim` (read only by the `...WithProjection`
    models; `CLIPModel` uses the top-level one), `logit_scale_init_value` (the checkpoint's
    `logit_scale` tensor is what counts; it is kept as `logit_scale_init`), `bos_token_id`,
    `pad_token_id`: initialisation and tokenizer bookkeeping.
  * `eos_token_id` picks the text pooling exactly as transformers does: 2 (the value of
    configs written before transformers PR #24773) -> the position of the largest token id
    (`eos_pooling="argmax"`), anything else -> the first occurrence of that id.

Weights: as `mmjax.convert.vit`, with CLIP's names (`self_attn.{q,k,v,out}_proj`,
`layer_norm1/2`, `mlp.fc1/fc2`), `pre_layrnorm` -> `vision/pre_norm`, `post_layernorm` ->
`vision/final_norm` (mmjax normalises every token, HF only the pooled [CLS] one: the pooled
feature is the same), projections `[proj, dim]` -> `[dim, proj]`. Rules and helpers come from
`mmjax.convert.core`; the encoder blocks reuse `mmjax.convert.vit.encoder_layer_rules`.
`VISION_CONVERTER` declares CLIP's image-tower layout (`Converter.export_when`), so
`mmjax.convert.to_hf` exports such a ViT as `CLIPVisionModel`.

`mmjax compare`: `compare_clip` (embeddings, logits, both towers' hidden states, right-padded
text of different lengths), `compare_text_encoder` (`CLIPTextModel`), and ViT's
`compare_image_encoder` for `CLIPVisionModel`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_config_keys, check_dropout, check_model_type, size_to_hf,
                                stamp_version, strip_prefix, sub_config, tuple_sizes)
from mmjax.convert.vit import compare_image_encoder, encoder_layer_rules
from mmjax.errors import UnsupportedModelError
from mmjax.models.clip import CLIP_VISION_LAYOUT, CLIPConfig, CLIPTextConfig
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("CLIPModel",)
VISION_ARCHITECTURES = ("CLIPVisionModel",)
TEXT_ARCHITECTURES = ("CLIPTextModel",)
LEGACY_EOS_ID = 2  # transformers pools at argmax(token id) when eos_token_id == 2

_TOP_KEYS = {"text_config", "vision_config", "projection_dim", "logit_scale_init_value",
             "initializer_factor"}
_TEXT_KEYS = {  # HF key -> CLIPTextConfig field (None: handled separately)
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "mlp_dim",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_len", "layer_norm_eps": "norm_eps",
    "initializer_range": "initializer_range", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
    "hidden_act": None, "attention_dropout": None, "initializer_factor": None, "projection_dim": None,
}
_VISION_KEYS = {  # HF key -> ViTConfig field
    "hidden_size": "dim", "intermediate_size": "mlp_dim", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_channels": "channels", "image_size": "image_size",
    "patch_size": "patch_size", "layer_norm_eps": "norm_eps", "initializer_range": "initializer_range",
    "hidden_act": None, "attention_dropout": None, "initializer_factor": None, "projection_dim": None,
}
# transformers CLIPTextConfig / CLIPVisionConfig / CLIPConfig class defaults
_TEXT_DEFAULTS = dict(vocab_size=49408, dim=512, mlp_dim=2048, num_layers=12, num_heads=8, max_len=77,
                      norm_eps=1e-5, initializer_range=0.02, bos_token_id=49406, eos_token_id=49407,
                      pad_token_id=1)
_VISION_DEFAULTS = dict(dim=768, mlp_dim=3072, num_layers=12, num_heads=12, channels=3, image_size=224,
                        patch_size=32, norm_eps=1e-5, initializer_range=0.02)
_DEFAULT_PROJECTION_DIM = 512
_DEFAULT_LOGIT_SCALE_INIT = 2.6592
# buffers of old checkpoints computed from the config
DERIVED_BUFFERS = ("embeddings.position_ids",)
# the ViTConfig fields that make a ViT CLIP's image tower
_LAYOUT_KEYS = ("pool", "posemb", "class_token", "pre_norm", "patch_bias", "qkv_bias")


# --- config ---------------------------------------------------------------------------------

def text_config_from_hf(hf: Mapping[str, Any], where: str = "text_config") -> CLIPTextConfig:
    check_config_keys(hf, _TEXT_KEYS, f"clip {where}")
    kw = dict(_TEXT_DEFAULTS)
    kw.update({field: hf[k] for k, field in _TEXT_KEYS.items() if field and k in hf})
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "quick_gelu"), f"{where}.hidden_act")
    check_dropout(hf, "attention_dropout")
    eos = kw["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise UnsupportedModelError(f"{where}.eos_token_id must be one int (the text is pooled at it), "
                                    f"got {eos!r}")
    kw["eos_pooling"] = "argmax" if eos == LEGACY_EOS_ID else "first_eos"
    return build_config(CLIPTextConfig, kw, f"clip {where}")


def vision_config_from_hf(hf: Mapping[str, Any], where: str = "vision_config") -> ViTConfig:
    check_config_keys(hf, _VISION_KEYS, f"clip {where}")
    kw = dict(CLIP_VISION_LAYOUT)
    kw.update(_VISION_DEFAULTS)
    kw.update({field: hf[k] for k, field in _VISION_KEYS.items() if field and k in hf})
    tuple_sizes(kw, "image_size", "patch_size")
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "quick_gelu"), f"{where}.hidden_act")
    check_dropout(hf, "attention_dropout")
    return build_config(ViTConfig, kw, f"clip {where}")


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
    """`CLIPConfig` for a parsed `CLIPModel` `config.json` (strict, see the module docstring)."""
    check_model_type(hf, "clip", "CLIP")
    check_config_keys(hf, _TOP_KEYS, "clip config.json")
    check_architecture(hf, ARCHITECTURES)
    text = text_config_from_hf(sub_config(hf, "text_config", "clip_text_model", "clip config.json"))
    vision = vision_config_from_hf(sub_config(hf, "vision_config", "clip_vision_model", "clip config.json"))
    try:
        logit_scale_init = float(hf.get("logit_scale_init_value", _DEFAULT_LOGIT_SCALE_INIT))
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"clip config.json: {e}") from None
    return build_config(CLIPConfig, dict(vision=vision, text=text, logit_scale_init=logit_scale_init,
                                         projection_dim=hf.get("projection_dim") or _DEFAULT_PROJECTION_DIM),
                        "clip config.json")


def has_vision_layout(v: ViTConfig) -> bool:
    """Whether a ViT has CLIP's image-tower layout (and so exports as `CLIPVisionModel`)."""
    return all(getattr(v, k) == CLIP_VISION_LAYOUT[k] for k in _LAYOUT_KEYS)


def _check_vision_exportable(v: ViTConfig, what: str, prefix: str = "vision.") -> None:
    differ = [f"{prefix}{k}={getattr(v, k)!r}" for k in _LAYOUT_KEYS
              if getattr(v, k) != CLIP_VISION_LAYOUT[k]]
    if v.num_classes or v.representation:
        differ.append(f"{prefix}num_classes={v.num_classes}, representation={v.representation}")
    if differ:
        raise UnsupportedModelError(f"cannot export this model to Hugging Face {what}: {', '.join(differ)} "
                                    "(not CLIP's image-tower layout)")


def _check_text_exportable(t: CLIPTextConfig, what: str) -> None:
    if not t.causal or t.eos_pooling == "last":
        raise UnsupportedModelError(
            f"cannot export this text tower to Hugging Face {what}: causal={t.causal}, "
            f"eos_pooling={t.eos_pooling!r} (CLIP's text tower is causal and pools at the end-of-text token)")
    if t.eos_pooling == "first_eos" and t.eos_token_id == LEGACY_EOS_ID:
        raise UnsupportedModelError(
            "cannot export text eos_pooling='first_eos' with eos_token_id=2: transformers pools "
            "configs with eos_token_id 2 at the largest token id instead")


def _check_exportable(config: CLIPConfig) -> None:
    _check_vision_exportable(config.vision, "CLIPModel")
    _check_text_exportable(config.text, "CLIPModel")
    if config.logit_bias_init is not None:
        raise UnsupportedModelError("cannot export a CLIP with a logit bias (logit_bias_init) to Hugging "
                                    "Face CLIPModel, which has none")


def config_to_hf(config: CLIPConfig, model_type: str | None = None) -> dict[str, Any]:
    """`config.json` dict of a `CLIPModel` (transformers 5 layout)."""
    if model_type not in (None, "clip"):
        raise UnsupportedModelError(f"cannot export a CLIP as model_type {model_type!r}; supported: clip")
    _check_exportable(config)
    text = _text_dict(config.text, config.projection_dim)
    vision = _vision_dict(config.vision, config.projection_dim)
    hf: dict[str, Any] = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.projection_dim,
        "logit_scale_init_value": config.logit_scale_init, "initializer_factor": 1.0,
        "text_config": text, "vision_config": vision, "dtype": "float32",
    }
    return stamp_version(hf)


def _text_dict(t: CLIPTextConfig, projection_dim: int) -> dict[str, Any]:
    return {
        "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.dim,
        "intermediate_size": t.mlp_dim, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_len,
        "hidden_act": activation_to_hf(t.activation), "layer_norm_eps": t.norm_eps,
        "initializer_range": t.initializer_range, "initializer_factor": 1.0, "attention_dropout": 0.0,
        "projection_dim": projection_dim, "bos_token_id": t.bos_token_id,
        # argmax pooling is what transformers does for eos_token_id 2 (see the module docstring)
        "eos_token_id": LEGACY_EOS_ID if t.eos_pooling == "argmax" else t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }


def _vision_dict(v: ViTConfig, projection_dim: int) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model", "hidden_size": v.dim, "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
        "num_channels": v.channels,
        "image_size": size_to_hf(v.image_size), "patch_size": size_to_hf(v.patch_size),
        "hidden_act": activation_to_hf(v.activation), "layer_norm_eps": v.norm_eps,
        "initializer_range": v.initializer_range, "initializer_factor": 1.0, "attention_dropout": 0.0,
        "projection_dim": projection_dim,
    }


# --- weights --------------------------------------------------------------------------------

CLIP_LAYER_NAMES = {
    "ln1": "layer_norm1", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.out_proj", "ln2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
}


def text_tower_rules(t: CLIPTextConfig, hf: str = "") -> list[TensorRule]:
    """Tensors of a CLIP / SigLIP text tower (HF names under `hf`, mmjax paths from the
    tower's root): embeddings, encoder layers, final norm."""
    R = TensorRule
    rules = [
        R(hf + "embeddings.token_embedding.weight", ("embed", "embedding"), (t.vocab_size, t.dim), "copy"),
        R(hf + "embeddings.position_embedding.weight", ("pos_embedding", "embedding"), (t.max_len, t.dim),
          "copy"),
    ]
    for i in range(t.num_layers):
        rules += encoder_layer_rules(f"{hf}encoder.layers.{i}.", f"layers_{i}", t.dim, t.num_heads, t.mlp_dim,
                                     True, CLIP_LAYER_NAMES)
    return rules + [R(hf + "final_layer_norm.weight", ("final_norm", "scale"), (t.dim,), "copy"),
                    R(hf + "final_layer_norm.bias", ("final_norm", "bias"), (t.dim,), "copy")]


def vision_tower_rules(v: ViTConfig, hf: str = "") -> list[TensorRule]:
    """Tensors of a CLIP image tower (HF names under `hf`, mmjax paths from the ViT's root)."""
    R = TensorRule
    ph, pw = v.patch_hw
    rules = [
        R(hf + "embeddings.class_embedding", ("cls",), (v.dim,), "copy"),
        R(hf + "embeddings.patch_embedding.weight", ("patch_embed", "kernel"), (v.dim, v.channels, ph, pw),
          "patch"),
        R(hf + "embeddings.position_embedding.weight", ("pos_embedding", "embedding"), (v.num_tokens, v.dim),
          "copy"),
        R(hf + "pre_layrnorm.weight", ("pre_norm", "scale"), (v.dim,), "copy"),
        R(hf + "pre_layrnorm.bias", ("pre_norm", "bias"), (v.dim,), "copy"),
    ]
    for i in range(v.num_layers):
        rules += encoder_layer_rules(f"{hf}encoder.layers.{i}.", f"layers_{i}", v.dim, v.num_heads, v.mlp_dim,
                                     True, CLIP_LAYER_NAMES)
    return rules + [R(hf + "post_layernorm.weight", ("final_norm", "scale"), (v.dim,), "copy"),
                    R(hf + "post_layernorm.bias", ("final_norm", "bias"), (v.dim,), "copy")]


def tensor_rules(c: CLIPConfig) -> list[TensorRule]:
    """Every tensor of an HF `CLIPModel` checkpoint of `c`."""
    R = TensorRule
    rules = [R("logit_scale", ("logit_scale",), (), "copy")]
    rules += [r.under("text") for r in text_tower_rules(c.text, "text_model.")]
    rules.append(R("text_projection.weight", ("text_projection", "kernel"), (c.projection_dim, c.text.dim),
                   "linear"))
    rules += [r.under("vision") for r in vision_tower_rules(c.vision, "vision_model.")]
    rules.append(R("visual_projection.weight", ("visual_projection", "kernel"),
                   (c.projection_dim, c.vision.dim), "linear"))
    return rules


def params_from_hf(tensors: Mapping[str, np.ndarray], config: CLIPConfig) -> dict[str, Any]:
    """mmjax CLIP params (nested dict of float32 numpy arrays) from HF `CLIPModel` tensors.
    `position_ids` buffers written by old transformers versions are derived data and skipped."""
    return apply_rules_from_hf(tensors, tensor_rules(config), derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
    """HF `CLIPModel` tensors from plain mmjax CLIP params."""
    _check_exportable(config)
    return apply_rules_to_hf(params, tensor_rules(config))


# --- stand-alone towers: CLIPVisionModel, CLIPTextModel ----------------------------------------

def vision_model_config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    """`ViTConfig` (CLIP layout) of a `CLIPVisionModel` config.json."""
    check_model_type(hf, "clip_vision_model", "CLIPVisionModel")
    check_architecture(hf, VISION_ARCHITECTURES)
    return vision_config_from_hf(hf, where="clip_vision_model config.json")


def vision_model_config_to_hf(config: ViTConfig, model_type: str | None = None) -> dict[str, Any]:
    """`config.json` of a `CLIPVisionModel` for a ViT with CLIP's layout."""
    _check_vision_exportable(config, "CLIPVisionModel", prefix="")
    hf = _vision_dict(config, _DEFAULT_PROJECTION_DIM)
    hf.update(architectures=list(VISION_ARCHITECTURES), dtype="float32")
    return stamp_version(hf)


def vision_model_params_from_hf(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    return apply_rules_from_hf(strip_prefix(tensors, "vision_model."), vision_tower_rules(config),
                               derived=DERIVED_BUFFERS)


def vision_model_params_to_hf(params: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    _check_vision_exportable(config, "CLIPVisionModel", prefix="")
    return apply_rules_to_hf(params, vision_tower_rules(config))


def text_model_config_from_hf(hf: Mapping[str, Any]) -> CLIPTextConfig:
    """`CLIPTextConfig` of a `CLIPTextModel` config.json."""
    check_model_type(hf, "clip_text_model", "CLIPTextModel")
    check_architecture(hf, TEXT_ARCHITECTURES)
    return text_config_from_hf(hf, where="clip_text_model config.json")


def text_model_config_to_hf(config: CLIPTextConfig, model_type: str | None = None) -> dict[str, Any]:
    if model_type not in (None, "clip_text_model"):
        raise UnsupportedModelError(f"cannot export a CLIP text tower as model_type {model_type!r}; "
                                    "supported: clip_text_model")
    _check_text_exportable(config, "CLIPTextModel")
    hf = _text_dict(config, _DEFAULT_PROJECTION_DIM)
    hf.update(architectures=list(TEXT_ARCHITECTURES), dtype="float32")
    return stamp_version(hf)


def text_model_params_from_hf(tensors: Mapping[str, np.ndarray], config: CLIPTextConfig) -> dict[str, Any]:
    return apply_rules_from_hf(strip_prefix(tensors, "text_model."), text_tower_rules(config),
                               derived=DERIVED_BUFFERS)


def text_model_params_to_hf(params: Mapping[str, Any], config: CLIPTextConfig) -> dict[str, np.ndarray]:
    _check_text_exportable(config, "CLIPTextModel")
    return apply_rules_to_hf(params, text_tower_rules(config))


# --- mmjax compare --------------------------------------------------------------------------

def text_inputs(rng, batch: int, seq_len: int, text_config) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [batch, seq_len] with the end-of-text token at a different place per row and
    right padding after it, and the matching attention mask. When `eos_token_id` lies outside
    the vocabulary (transformers' small test configs keep CLIP's 49407 beside a tiny vocab) no
    row can hold it and both sides pool at position 0, as transformers does."""
    c = text_config
    vocab = c.vocab_size
    pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < vocab else 0
    if c.eos_pooling == "argmax":
        end_id = vocab - 1  # pooled at the largest id
        tokens = rng.integers(0, vocab - 1, size=(batch, seq_len))
    else:
        end_id = c.eos_token_id if 0 <= c.eos_token_id < vocab else None
        tokens = rng.integers(0, vocab, size=(batch, seq_len))
        if end_id is not None:
            tokens[tokens == end_id] = (end_id + 1) % vocab
    mask = np.ones((batch, seq_len), bool)
    for i in range(batch):
        end = seq_len - 1 - (i * max(1, seq_len // 4)) % seq_len
        if end_id is not None:
            tokens[i, end] = end_id
        tokens[i, end + 1:] = pad
        mask[i, end + 1:] = False
    return tokens.astype(np.int64), mask


def compare_clip(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """CLIPModel: normalised image and text embeddings, logits_per_image, both towers' hidden
    states (text ones on real tokens), with right-padded text of different lengths."""
    import jax.numpy as jnp

    seq_len = min(seq_len, config.text.max_len)
    rng = np.random.default_rng(seed)
    images = reference.random_images(rng, batch, config.vision)
    tokens, mask = text_inputs(rng, batch, seq_len, config.text)
    hf_model = reference.load_reference(transformers, torch, "CLIPModel", hf_dir)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
    out, inter = reference.run_mmjax(module, np_params, jnp.asarray(reference.nhwc(images)),
                                     jnp.asarray(tokens, jnp.int32), input_mask=jnp.asarray(mask))
    vref, tref = ref.vision_model_output, ref.text_model_output
    vision_diffs = reference.layer_diffs(inter["vision"]["hidden_states"], vref.hidden_states)
    text_diffs = reference.layer_diffs(inter["text"]["hidden_states"], tref.hidden_states, mask)
    diffs = {
        "image_embeds": reference.max_abs(out["image_embeds"], ref.image_embeds),
        "text_embeds": reference.max_abs(out["text_embeds"], ref.text_embeds),
        "logits_per_image": reference.max_abs(out["logits_per_image"], ref.logits_per_image),
        "vision_hidden_states": max(vision_diffs),
        "text_hidden_states": max(text_diffs),
        "text_last_hidden_state": reference.max_abs(inter["text"]["final_hidden"], tref.last_hidden_state,
                                                    mask),
    }
    extra = {"vision_hidden_state_diffs": vision_diffs, "text_hidden_state_diffs": text_diffs,
             "inputs": {"batch": batch, "seq_len": seq_len, "image_size": list(config.vision.image_hw),
                        "seed": seed, "text_lengths": mask.sum(1).tolist()},
             "reference_logits_max_abs": float(np.abs(ref.logits_per_image.numpy()).max())}
    return diffs, extra


def compare_text_encoder(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """CLIPTextModel: pooler output (at the end-of-text token), last hidden state and every
    hidden state on real tokens, with right-padded rows of different lengths."""
    import jax.numpy as jnp

    seq_len = min(seq_len, config.max_len)
    tokens, mask = text_inputs(np.random.default_rng(seed), batch, seq_len, config)
    hf_model = reference.load_reference(transformers, torch, "CLIPTextModel", hf_dir)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
    pooled, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32),
                                        input_mask=jnp.asarray(mask))
    layer_diffs = reference.layer_diffs(inter["hidden_states"], ref.hidden_states, mask)
    diffs = {"pooler_output": reference.max_abs(pooled, ref.pooler_output),
             "last_hidden_state": reference.max_abs(inter["final_hidden"], ref.last_hidden_state, mask),
             "hidden_states": max(layer_diffs)}
    extra = {"hidden_state_diffs": layer_diffs,
             "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed,
                        "text_lengths": mask.sum(1).tolist()}}
    return diffs, extra


CONVERTER = Converter(
    family="clip", model_types=("clip",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf, compare=compare_clip,
)
# a ViT of CLIP's layout: the "vit" family exports it as CLIPVisionModel (export_when)
VISION_CONVERTER = Converter(
    family="vit", model_types=("clip_vision_model",), architectures=VISION_ARCHITECTURES,
    config_from_hf=vision_model_config_from_hf, config_to_hf=vision_model_config_to_hf,
    params_from_hf=vision_model_params_from_hf, params_to_hf=vision_model_params_to_hf,
    # CLIPVisionModel's last_hidden_state is the encoder output before post_layernorm
    compare=functools.partial(compare_image_encoder, last_hidden_is_encoder_output=True),
    export_when=has_vision_layout,
)
TEXT_CONVERTER = Converter(
    family="clip_text", model_types=("clip_text_model",), architectures=TEXT_ARCHITECTURES,
    config_from_hf=text_model_config_from_hf, config_to_hf=text_model_config_to_hf,
    params_from_hf=text_model_params_from_hf, params_to_hf=text_model_params_to_hf,
    compare=compare_text_encoder,
)
CONVERTERS = (CONVERTER, VISION_CONVERTER, TEXT_CONVERTER)
