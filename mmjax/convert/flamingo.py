"""Hugging Face `IdeficsForVisionText2Text` (Idefics v1, the open Flamingo) <-> mmjax `Flamingo`
with `layout="idefics"`.

Config: the top level is checked key by key (transformers 5.23's `IdeficsConfig`); the text
model is the top level itself (LLaMA keys: hidden_size, intermediate_size, rms_norm_eps,
rope_parameters, ...), `vision_config` (model_type "idefics_vision") is CLIP's image tower with
`embed_dim` for `hidden_size` and GELU by default, and `perceiver_config` holds the resampler's
shape. Only the TOP-LEVEL `use_resampler` decides whether a resampler exists (transformers
reads that one; `perceiver_config.use_resampler` is ignored by the model).

Decisions on keys accepted without a field:
  * `freeze_text_layers`, `freeze_text_module_exceptions`, `freeze_lm_head`,
    `freeze_vision_module_exceptions`: training choices (which params get gradients); mmjax
    decides that in its training config (`optimizer.freeze`, `TRAINABLE`).
    `freeze_vision_layers` becomes `freeze_vision` (the tower's output is stop-gradient'ed).
  * `perceiver_config.use_resampler`: see above.
  * `vision_config.initializer_factor`, `initializer_range`: initialisation only.
  * `image_token_index` does not exist in Idefics configs (the processor knows `<image>`'s
    id); the converted config sets it to the last additional id, vocab_size +
    additional_vocab_size - 1 (idefics-9b: 32001 = `<image>`), which is what `compare`
    places. Set it yourself when your tokenizer differs.
Refused: `alpha_initializer="normal"` with `alpha_type="float"` is accepted (transformers itself
crashes building it, mmjax does not); `tie_word_embeddings` with additional rows
(transformers would tie the additional head to the additional embedding, which mmjax keeps
apart); a `num_hidden_layers` that `cross_layer_interval` does not divide (transformers
indexes past its list of gated blocks).

Weights (transformers 5.23 names): `model.embed_tokens.weight`, `model.layers.*`,
`model.norm.weight`, `lm_head.weight` are LLaMA's names (`mmjax.convert.llama.tensor_rules`
under `language_model/`); `model.embed_tokens.additional_embedding.weight` and
`lm_head.additional_fc.weight` the additional rows; `model.vision_model.*` CLIP's image tower
(its `post_layernorm` is kept, though the features are read before it);
`model.perceiver_resampler.{latents, blocks.{i}.0.*, blocks.{i}.1.*, layer_norm}`;
`model.gated_cross_attn_layers.{j}.*`.

`mmjax compare` (`compare_idefics`): batch rows of `--seq-len` text tokens with 3 image slots;
row 0 shows two images (the third slot is a zero padding image no token points to), the other
rows three; every row starts with text before its first image; each `<image>` is wrapped in
the first additional token (Idefics' `<fake_token_around_image>`) when there is one. The
`image_attention_mask` transformers gets is built here the way Idefics' processor builds it
(each token: its most recent image, one-hot); the mmjax model derives its own mask from the
tokens, so the rule itself is compared too. Compared: logits on real tokens, the resampled
media, and the image tower's last hidden state.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import clip as clip_convert
from mmjax.convert import llama as llama_convert
from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_bool, check_config_keys, check_model_type,
                                stamp_version, sub_config)
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.flamingo import FlamingoConfig
from mmjax.models.llama import LlamaConfig

ARCHITECTURES = ("IdeficsForVisionText2Text",)
_TOP_KEYS = {
    "vocab_size", "additional_vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "dropout", "hidden_act", "initializer_range", "alpha_initializer",
    "alphas_initializer_range", "alpha_type", "rms_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "cross_layer_interval", "qk_layer_norms",
    "freeze_text_layers", "freeze_text_module_exceptions", "freeze_lm_head",
    "freeze_vision_layers", "freeze_vision_module_exceptions", "use_resampler", "vision_config",
    "max_position_embeddings", "perceiver_config", "rope_parameters", "rope_theta", "rope_scaling",
}
# transformers IdeficsConfig / IdeficsVisionConfig / IdeficsPerceiverConfig class defaults
_TOP_DEFAULTS = dict(vocab_size=32000, additional_vocab_size=0, hidden_size=4096,
                     intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     dropout=0.0, hidden_act="silu", initializer_range=0.02,
                     alpha_initializer="zeros", alphas_initializer_range=0.0, alpha_type="float",
                     rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     cross_layer_interval=1, qk_layer_norms=False, use_resampler=False,
                     max_position_embeddings=2048)
_VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14,
                        num_hidden_layers=32, num_attention_heads=16, num_channels=3,
                        hidden_act="gelu", layer_norm_eps=1e-5)
_PERCEIVER_KEYS = {"use_resampler", "resampler_n_latents", "resampler_depth", "resampler_n_heads",
                   "resampler_head_dim", "qk_layer_norms_perceiver"}
_PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                           resampler_head_dim=96, qk_layer_norms_perceiver=False)
_ALPHA_INITS = {"zeros": "zeros", "ones": "ones", "normal": "normal", "gaussian": "normal",
                "random": "normal"}
DERIVED_BUFFERS = clip_convert.DERIVED_BUFFERS + llama_convert.DERIVED_BUFFERS
VISION, PERCEIVER, GATED = "model.vision_model.", "model.perceiver_resampler.", "model.gated_cross_attn_layers."


# --- config ---------------------------------------------------------------------------------

def _vision_from_hf(hf: Mapping[str, Any]) -> Any:
    vision = {**_VISION_DEFAULTS, **{k: v for k, v in hf.items() if k != "model_type"}}
    vision["hidden_size"] = vision.pop("embed_dim")
    return clip_convert.vision_config_from_hf(vision, where="idefics vision_config")


def config_from_hf(hf: Mapping[str, Any]) -> FlamingoConfig:
    """`FlamingoConfig` (layout "idefics") for a parsed `IdeficsForVisionText2Text` config.json
    (strict: unknown keys raise)."""
    what = "idefics config.json"
    check_model_type(hf, "idefics", "Idefics")
    check_config_keys(hf, _TOP_KEYS, what)
    check_architecture(hf, ARCHITECTURES)
    kw = {**_TOP_DEFAULTS, **{k: hf[k] for k in _TOP_DEFAULTS if k in hf}}
    layers, interval = kw["num_hidden_layers"], kw["cross_layer_interval"]
    if not isinstance(interval, int) or interval < 1 or layers % interval:
        raise UnsupportedModelError(f"{what}: cross_layer_interval {interval!r} must be a positive "
                                    f"divisor of num_hidden_layers {layers} (transformers builds "
                                    "num_hidden_layers // interval gated blocks and indexes one "
                                    "before every interval-th layer)")
    additional = kw["additional_vocab_size"]
    tie = check_bool(hf, "tie_word_embeddings")
    if tie and additional:
        raise UnsupportedModelError(f"{what}: tie_word_embeddings with additional_vocab_size > 0 "
                                    "(a tied additional head) is not supported")
    rope_theta, rope_scaling = llama_convert.rope_from_hf(hf, kw["max_position_embeddings"])
    eos = kw["eos_token_id"]
    text = build_config(LlamaConfig, dict(
        vocab_size=kw["vocab_size"], dim=kw["hidden_size"], mlp_dim=kw["intermediate_size"],
        num_layers=layers, num_heads=kw["num_attention_heads"], norm_eps=kw["rms_norm_eps"],
        max_len=kw["max_position_embeddings"], activation=activation_from_hf(kw["hidden_act"]),
        initializer_range=kw["initializer_range"], tie_embeddings=tie,
        rope_theta=rope_theta, rope_scaling=rope_scaling, dropout=float(kw["dropout"]),
        bos_token_id=kw["bos_token_id"], pad_token_id=kw["pad_token_id"],
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos), f"{what} (text model)")
    vision = _vision_from_hf(sub_config(hf, "vision_config", "idefics_vision", what))
    perceiver = dict(sub_config(hf, "perceiver_config", "idefics_perciever", what))
    perceiver.pop("model_type", None)
    check_config_keys(perceiver, _PERCEIVER_KEYS, f"{what} perceiver_config")
    pk = {**_PERCEIVER_DEFAULTS, **{k: perceiver[k] for k in _PERCEIVER_DEFAULTS if k in perceiver}}
    alpha_init = kw["alpha_initializer"]
    if alpha_init not in _ALPHA_INITS:
        raise UnsupportedModelError(f"{what}: alpha_initializer {alpha_init!r} is not supported; "
                                    f"supported: {', '.join(_ALPHA_INITS)}")
    return build_config(FlamingoConfig, dict(
        vision=vision, text=text, layout="idefics", cross_interval=interval,
        use_resampler=check_bool(hf, "use_resampler"),
        resampler_latents=pk["resampler_n_latents"], resampler_depth=pk["resampler_depth"],
        resampler_heads=pk["resampler_n_heads"], resampler_head_dim=pk["resampler_head_dim"],
        resampler_qk_norm=bool(pk["qk_layer_norms_perceiver"]),
        qk_layer_norms=check_bool(hf, "qk_layer_norms"), alpha_type=kw["alpha_type"],
        alpha_init=_ALPHA_INITS[alpha_init], alpha_init_range=float(kw["alphas_initializer_range"]),
        additional_vocab_size=additional,
        image_token_index=kw["vocab_size"] + additional - 1,
        freeze_vision=check_bool(hf, "freeze_vision_layers", True),
        dropout=float(kw["dropout"])), what)


def _check_exportable(c: FlamingoConfig) -> None:
    t, differ = c.text, []
    if c.layout != "idefics":
        differ.append(f"layout={c.layout!r} (Idefics is 'idefics')")
    if c.cross_heads not in (None, t.num_heads) or c.cross_head_dim not in (None, t.dim // t.num_heads):
        differ.append("cross_heads / cross_head_dim (Idefics uses the LM's heads)")
    if c.perceiver_activation != "relu" or c.max_frames:
        differ.append("resampler_activation / max_frames (Idefics: ReLU, no frame embeddings)")
    if t.num_experts or t.kv_heads != t.num_heads or t.head_dim not in (None, t.dim // t.num_heads):
        differ.append("text: MoE / GQA / head_dim (Idefics' decoder is plain MHA)")
    if t.attention_bias or t.mlp_bias or t.sliding_window is not None:
        differ.append("text: biases / sliding_window")
    if not c.only_attend_immediate_media:
        differ.append("only_attend_immediate_media=False")
    if c.additional_vocab_size and t.tie_embeddings:
        differ.append("tied embeddings with additional rows")
    if t.num_layers % c.cross_interval:
        differ.append(f"cross_interval {c.cross_interval} not dividing {t.num_layers} layers")
    if differ:
        raise UnsupportedModelError("cannot export this Flamingo as IdeficsForVisionText2Text: "
                                    + "; ".join(differ))
    clip_convert.vision_model_config_to_hf(c.vision)  # raises unless CLIP's tower layout


def config_to_hf(config: FlamingoConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json dict of `IdeficsForVisionText2Text` (transformers 5.23 layout)."""
    if model_type not in (None, "idefics"):
        raise UnsupportedModelError(f"cannot export a Flamingo as model_type {model_type!r}; "
                                    "supported: idefics")
    _check_exportable(config)
    c, t, v = config, config.text, config.vision
    text = llama_convert.config_to_hf(t, "llama")
    h, w = v.image_hw
    ph, pw = v.patch_hw
    if h != w or ph != pw:
        raise UnsupportedModelError("Idefics' vision config takes square image_size and patch_size")
    eos = t.eos_token_id
    hf: dict[str, Any] = {
        "architectures": list(ARCHITECTURES), "model_type": "idefics", "dtype": "float32",
        "vocab_size": t.vocab_size, "additional_vocab_size": c.additional_vocab_size,
        "hidden_size": t.dim, "intermediate_size": t.mlp_dim, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "dropout": c.dropout,
        "hidden_act": activation_to_hf(t.activation), "initializer_range": t.initializer_range,
        "alpha_initializer": c.alpha_init, "alphas_initializer_range": c.alpha_init_range,
        "alpha_type": c.alpha_type, "rms_norm_eps": t.norm_eps, "pad_token_id": t.pad_token_id,
        "bos_token_id": t.bos_token_id, "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "tie_word_embeddings": t.tie_embeddings, "cross_layer_interval": c.cross_interval,
        "qk_layer_norms": c.qk_layer_norms, "use_resampler": c.use_resampler,
        "freeze_vision_layers": c.freeze_vision,
        "max_position_embeddings": t.max_len, "rope_parameters": text["rope_parameters"],
        "vision_config": {
            "model_type": "idefics_vision", "embed_dim": v.dim, "image_size": h,
            "intermediate_size": v.mlp_dim, "patch_size": ph, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "num_channels": v.channels,
            "hidden_act": activation_to_hf(v.activation), "layer_norm_eps": v.norm_eps,
            "initializer_range": v.initializer_range},
        "perceiver_config": {
            "model_type": "idefics_perciever", "use_resampler": c.use_resampler,
            "resampler_n_latents": c.resampler_latents, "resampler_depth": c.resampler_depth,
            "resampler_n_heads": c.resampler_heads, "resampler_head_dim": c.resampler_head_dim,
            "qk_layer_norms_perceiver": c.resampler_qk_norm},
    }
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def perceiver_rules(c: FlamingoConfig) -> list[TensorRule]:
    """`model.perceiver_resampler.*` (with use_resampler)."""
    R, d, h, hd = TensorRule, c.media_dim, c.resampler_heads, c.resampler_head_dim
    mlp = 4 * d
    rules = [R(PERCEIVER + "latents", ("resampler", "latents"), (c.resampler_latents, d), "copy")]
    for i in range(c.resampler_depth):
        hf, mj = f"{PERCEIVER}blocks.{i}.", ("resampler", f"blocks_{i}")
        norms = [("0.context_layer_norm", "context_norm", d), ("0.latents_layer_norm", "latents_norm", d),
                 ("1.ln", "mlp_norm", d)]
        if c.resampler_qk_norm:
            norms += [("0.q_layer_norm", ("attn", "query_norm"), hd), ("0.k_layer_norm", ("attn", "key_norm"), hd)]
        for name, path, n in norms:
            path = path if isinstance(path, tuple) else (path,)
            rules += [R(f"{hf}{name}.weight", mj + path + ("scale",), (n,), "copy"),
                      R(f"{hf}{name}.bias", mj + path + ("bias",), (n,), "copy")]
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules.append(R(f"{hf}0.{proj}.weight", mj + ("attn", name, "kernel"), (h * hd, d), "in_proj", h))
        rules += [R(f"{hf}0.output_proj.weight", mj + ("attn", "out", "kernel"), (d, h * hd), "out_proj", h),
                  R(f"{hf}1.fc.weight", mj + ("mlp", "fc1", "kernel"), (mlp, d), "linear"),
                  R(f"{hf}1.c_proj.weight", mj + ("mlp", "fc2", "kernel"), (d, mlp), "linear")]
    return rules + [R(PERCEIVER + "layer_norm.weight", ("resampler", "final_norm", "scale"), (d,), "copy"),
                    R(PERCEIVER + "layer_norm.bias", ("resampler", "final_norm", "bias"), (d,), "copy")]


def gated_rules(c: FlamingoConfig) -> list[TensorRule]:
    """`model.gated_cross_attn_layers.{j}.*`."""
    R, t = TensorRule, c.text
    d, h, hd, dv = t.dim, c.xattn_heads, c.xattn_head_dim, c.media_dim
    alpha_shape, alpha_kind = ((1,), "scalar") if c.alpha_type == "float" else ((1, 1, d), "squeeze")
    rules = []
    for j in range(c.num_cross_layers):
        hf, mj = f"{GATED}{j}.", f"gated_xattn_{j}"
        rules += [R(hf + "alpha_cross_attn", (mj, "alpha_attn"), alpha_shape, alpha_kind),
                  R(hf + "alpha_dense", (mj, "alpha_mlp"), alpha_shape, alpha_kind)]
        for proj, name, width in (("q_proj", "query", d), ("k_proj", "key", dv), ("v_proj", "value", dv)):
            rules.append(R(f"{hf}cross_attn.{proj}.weight", (mj, "cross_attn", name, "kernel"),
                           (h * hd, width), "in_proj", h))
        rules.append(R(hf + "cross_attn.o_proj.weight", (mj, "cross_attn", "out", "kernel"), (d, h * hd),
                       "out_proj", h))
        if c.qk_layer_norms:
            rules += [R(hf + "cross_attn.q_layer_norm.weight", (mj, "cross_attn", "query_norm", "scale"),
                        (hd,), "copy"),
                      R(hf + "cross_attn.k_layer_norm.weight", (mj, "cross_attn", "key_norm", "scale"),
                        (hd,), "copy")]
        for proj, name, shape in (("gate_proj", "gate", (t.mlp_dim, d)), ("up_proj", "up", (t.mlp_dim, d)),
                                  ("down_proj", "down", (d, t.mlp_dim))):
            rules.append(R(f"{hf}mlp.{proj}.weight", (mj, "mlp", name, "kernel"), shape, "linear"))
        rules += [R(hf + "input_layernorm.weight", (mj, "cross_norm", "scale"), (d,), "copy"),
                  R(hf + "post_attention_layernorm.weight", (mj, "mlp_norm", "scale"), (d,), "copy")]
    return rules


def tensor_rules(c: FlamingoConfig) -> list[TensorRule]:
    """Every tensor of an `IdeficsForVisionText2Text` checkpoint of `c` (5.23 names)."""
    R = TensorRule
    rules = [r.under("language_model") for r in llama_convert.tensor_rules(c.text)]
    if c.additional_vocab_size:
        a, d = c.additional_vocab_size, c.text.dim
        rules += [R("model.embed_tokens.additional_embedding.weight", ("additional_embed", "embedding"),
                    (a, d), "copy"),
                  R("lm_head.additional_fc.weight", ("additional_head", "kernel"), (a, d), "linear")]
    rules += [r.under("vision") for r in clip_convert.vision_tower_rules(c.vision, VISION)]
    if c.use_resampler:
        rules += perceiver_rules(c)
    return rules + gated_rules(c)


def params_from_hf(tensors: Mapping[str, np.ndarray], config: FlamingoConfig) -> dict[str, Any]:
    """mmjax Flamingo params (nested dict of float32 numpy arrays) from HF tensors."""
    if config.text.tie_embeddings:
        tensors = llama_convert._drop_tied_head(tensors, config.text)
    return apply_rules_from_hf(tensors, tensor_rules(config), derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: FlamingoConfig) -> dict[str, np.ndarray]:
    """HF tensors (transformers 5.23 names) from plain mmjax Flamingo params."""
    _check_exportable(config)
    return apply_rules_to_hf(params, tensor_rules(config))


# --- mmjax compare --------------------------------------------------------------------------

NUM_IMAGE_SLOTS = 3


def processor_image_mask(tokens: np.ndarray, image_token_index: int, num_images: int,
                         input_mask: np.ndarray) -> np.ndarray:
    """[B, T, N] int64 `image_attention_mask` as Idefics' processor writes it: each real token
    one-hot on its most recent image (the `<image>` token itself included), zeros before the
    first image and on padding. A loop, deliberately unlike `mmjax.ops.masks`."""
    b, t = tokens.shape
    out = np.zeros((b, t, num_images), np.int64)
    for i in range(b):
        current = -1
        for j in range(t):
            if not input_mask[i, j]:
                continue
            if tokens[i, j] == image_token_index:
                current += 1
            if current >= 0:
                out[i, j, current] = 1
    return out


def idefics_inputs(rng: np.random.Generator, batch: int, seq_len: int, config: FlamingoConfig
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [B, T], input mask [B, T], NCHW pixel values [B, N, C, H, W], image_valid [B, N]):
    see the module docstring; the last row left-padded by 2 when batch > 1."""
    t = config.text
    img = config.image_token_index
    wrap = t.vocab_size if config.additional_vocab_size >= 2 else None  # <fake_token_around_image>
    per_image = 3 if wrap is not None else 1
    n_slots = NUM_IMAGE_SLOTS
    width = seq_len + n_slots * per_image
    pad_id = t.pad_token_id if t.pad_token_id is not None else 0
    tokens = np.full((batch, width), pad_id, np.int64)
    mask = np.zeros((batch, width), bool)
    valid = np.zeros((batch, n_slots), bool)
    for i in range(batch):
        n_img = 2 if i == 0 else n_slots
        pad = 2 if (batch > 1 and i == batch - 1) else 0
        n_text = width - pad - n_img * per_image
        if n_text < n_img + 1:
            raise InputError(f"--seq-len {seq_len} is too short for {n_img} images with text "
                             "before and between them; use --seq-len >= 8")
        words = rng.integers(3, t.vocab_size, size=n_text)
        words[words == img] = 3
        cuts = np.sort(rng.choice(np.arange(1, n_text), size=n_img, replace=False))  # text first
        row, prev = [], 0
        for cut in cuts:
            row += list(words[prev:cut])
            row += [wrap, img, wrap] if wrap is not None else [img]
            prev = cut
        row += list(words[prev:])
        tokens[i, pad:] = row
        mask[i, pad:] = True
        valid[i, :n_img] = True
    v = config.vision
    h, w = v.image_hw
    pixels = rng.normal(size=(batch, n_slots, v.channels, h, w)).astype(np.float32)
    pixels[~valid] = 0.0
    return tokens, mask, pixels, valid


def compare_idefics(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """IdeficsForVisionText2Text: logits, resampled media and image-tower features on
    interleaved rows (text before the first image, a padding image slot, left padding)."""
    import jax.numpy as jnp

    tokens, mask, pixels, valid = idefics_inputs(np.random.default_rng(seed), batch, seq_len, config)
    if tokens.shape[1] > config.max_len:
        raise InputError(f"--seq-len {seq_len} + image tokens exceeds max_position_embeddings "
                         f"{config.max_len}")
    image_mask = processor_image_mask(tokens, config.image_token_index, NUM_IMAGE_SLOTS, mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    hf_model = reference.load_reference(transformers, torch, "IdeficsForVisionText2Text", hf_dir)
    with torch.no_grad():
        px = torch.from_numpy(pixels)
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=px,
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions),
                       image_attention_mask=torch.from_numpy(image_mask))
        b, n = pixels.shape[:2]
        ref_vision = hf_model.model.vision_model(px.reshape((b * n,) + px.shape[2:])).last_hidden_state
    images = jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))
    logits, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32), images,
                                        image_valid=jnp.asarray(valid), input_mask=jnp.asarray(mask))
    ref_logits = ref.logits.numpy()
    feats = np.asarray(inter["vision_features"])  # [B, N, 1, S, D]
    diffs = {
        "logits": reference.max_abs(logits, ref_logits, mask),
        "media": reference.max_abs(np.asarray(inter["media"]), ref.image_hidden_states),
        "vision_features": reference.max_abs(feats.reshape(ref_vision.shape), ref_vision),
        # 1.0 when mmjax's own media mask (from the tokens) differs anywhere from the processor's
        "media_mask": reference.max_abs(np.asarray(inter["media_mask"]), image_mask),
    }
    extra = {
        "inputs": {"batch": batch, "seq_len": seq_len, "image_slots": NUM_IMAGE_SLOTS,
                   "images_per_row": valid.sum(1).tolist(), "tokens_per_image": config.tokens_per_image,
                   "image_size": list(config.vision.image_hw), "seed": seed,
                   "tokens_with_an_image": int(image_mask.any(-1).sum()),
                   "tokens_before_any_image": int((mask & ~image_mask.any(-1)).sum())},
        "reference_logits_max_abs": float(np.abs(ref_logits[mask]).max()),
    }
    return diffs, extra


CONVERTER = Converter(
    family="flamingo", model_types=("idefics",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf, compare=compare_idefics,
)
