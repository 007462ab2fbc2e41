"""Hugging Face `Blip2ForConditionalGeneration` / `Blip2Model` / `Blip2ForImageTextRetrieval`
(model_type "blip-2") <-> mmjax `Blip2`.

Config: the top level, `vision_config` ("blip_2_vision_model") and `qformer_config`
("blip_2_qformer") are checked key by key (unknown keys raise `UnsupportedModelError` naming
them); `text_config` goes to the converter of its own model_type (llama / mistral / opt ...,
whatever `mmjax.convert` supports as a decoder-only LM of a family in
`mmjax.models.blip2.TEXT_FAMILIES`), so a new LLM family needs no edit here. The image encoder
is a `ViTConfig` with `BLIP_VISION_LAYOUT`; the Q-Former a `QFormerConfig`.

Classes:
  * Blip2ForConditionalGeneration, Blip2Model: vision + query tokens + Q-Former (queries only)
    + `language_projection` + `language_model.*` (the LLM's own tensor names under that
    prefix). `image_token_index` is required (unset: the prompt has nowhere for the image; an
    error naming it). With `use_qformer_text_input=true` these classes hold a text FFN per layer
    that they never run: it is accepted and dropped (`text_input=False`; the function computed
    is the same), and export writes `use_qformer_text_input=false`.
  * Blip2ForImageTextRetrieval: vision + query tokens + `embeddings.{word,position}_embeddings`
    + Q-Former with the text FFN (`use_qformer_text_input` must be true: ITM/ITC run text
    through it) + `vision_projection`, `text_projection`, `itm_head`; no LLM.
    `image_token_index` there only tells transformers to drop the first num_query_tokens input
    ids; mmjax keeps no such field (its retrieval calls take the text alone).

Keys accepted without a field, and why: dropout rates, `initializer_range`,
`initializer_factor` (training only); `qformer_config.encoder_hidden_size` (transformers
overwrites it with the vision width); `use_decoder_only_language_model` (derived by
transformers from text_config); `vision_config.qkv_bias` must be true (the fused q/k/v bias;
false is refused). `pad_token_id` of the Q-Former is kept.

Weights: `vision_model.*` as BLIP's (fused `qkv` split into q/k/v; the key third of its bias
is a parameter that transformers starts at zero), `query_tokens [1, Q, d]`,
`qformer.layernorm`, per layer `qformer.encoder.layer.{i}.attention.{attention.{query,key,
value}, output.{dense, LayerNorm}}`, every `cross_attention_frequency`-th layer
`crossattention.*` (keys / values from the vision width), `intermediate_query` /
`output_query` (query FFN), `intermediate` / `output` (text FFN). LAVIS's learned ITC
temperature is not in transformers' checkpoints: a converted retrieval model gets its init,
0.07, and export drops it.

`mmjax compare`: random images; conditional generation: prompts [one text token, Q image
tokens, text] (the last row left-padded), comparing the logits, the query outputs, the
projected image features, the image embeddings and every vision hidden state; retrieval: right-
padded text, the ITM logits, the ITC similarities [images, texts] and the normalised features.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from mmjax.convert import blip as blip_convert
from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf, apply_rules_from_hf,
                                apply_rules_to_hf, build_config, check_architecture, check_bool, check_config_keys,
                                check_dropout, check_model_type, int_or_none, join_rows, size_to_hf, split_rows,
                                stamp_version, sub_config, tuple_sizes)
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.blip import BLIP_VISION_LAYOUT
from mmjax.models.blip2 import ITC_TEMPERATURE_INIT, TEXT_FAMILIES, Blip2Config, QFormerConfig, check_query_tokens, text_embed_width
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval")
INSTRUCT_ARCHITECTURES = ("InstructBlipForConditionalGeneration",)
RETRIEVAL = "Blip2ForImageTextRetrieval"
_TOP_KEYS = {"vision_config", "qformer_config", "text_config", "num_query_tokens", "image_text_hidden_size",
             "image_token_index", "initializer_factor", "initializer_range", "use_decoder_only_language_model",
             "tie_word_embeddings"}
_VISION_KEYS = {"hidden_size": "dim", "intermediate_size": "mlp_dim", "num_hidden_layers": "num_layers",
                "num_attention_heads": "num_heads", "image_size": "image_size", "patch_size": "patch_size",
                "layer_norm_eps": "norm_eps", "initializer_range": "initializer_range"}
_VISION_DEFAULTS = dict(dim=1408, mlp_dim=6144, num_layers=39, num_heads=16, image_size=224, patch_size=14,
                        norm_eps=1e-6, initializer_range=1e-10)
_Q_KEYS = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "num_layers",
           "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim",
           "max_position_embeddings": "max_len", "layer_norm_eps": "norm_eps",
           "cross_attention_frequency": "cross_attention_frequency", "initializer_range": "initializer_range"}
_Q_DEFAULTS = dict(vocab_size=30522, dim=768, num_layers=12, num_heads=12, mlp_dim=3072, max_len=512,
                   norm_eps=1e-12, cross_attention_frequency=2, initializer_range=0.02)
_Q_OTHER = {"hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "pad_token_id",
            "encoder_hidden_size", "use_qformer_text_input"}
DERIVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")  # qformer.embeddings.position_ids too
Q, LM = "qformer.", "language_model."


# --- config ---------------------------------------------------------------------------------

def _vision_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    where = "blip-2 vision_config"
    check_config_keys(hf, set(_VISION_KEYS) | {"hidden_act", "attention_dropout", "qkv_bias"}, where)
    if not check_bool(hf, "qkv_bias", True):
        raise UnsupportedModelError(f"{where}: qkv_bias=false is not supported (every BLIP-2 checkpoint has "
                                    "the q/v biases)")
    kw: dict[str, Any] = {**BLIP_VISION_LAYOUT, **_VISION_DEFAULTS}
    kw.update({field: hf[k] for k, field in _VISION_KEYS.items() if k in hf})
    tuple_sizes(kw, "image_size", "patch_size")
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu"), f"{where}.hidden_act")
    check_dropout(hf, "attention_dropout")
    return build_config(ViTConfig, kw, where)


def _text_converter(text_hf: Mapping[str, Any]):
    from mmjax.convert import registry

    conv = registry.for_model_type(text_hf.get("model_type"))
    if conv.family not in TEXT_FAMILIES:
        raise UnsupportedModelError(f"blip-2 text_config: model_type {text_hf.get('model_type')!r} (mmjax family "
                                    f"{conv.family!r}) is not a decoder-only LM BLIP-2 can feed; supported "
                                    f"families: {', '.join(TEXT_FAMILIES)}")
    return conv


def _config_from_hf(hf: Mapping[str, Any], instruct: bool) -> Blip2Config:
    name = "instructblip" if instruct else "blip-2"
    prefix = "instructblip" if instruct else "blip_2"
    what = f"{name} config.json"
    check_model_type(hf, name, "InstructBLIP" if instruct else "BLIP-2")
    check_config_keys(hf, _TOP_KEYS - ({"image_text_hidden_size"} if instruct else set()), what)
    arch = check_architecture(hf, INSTRUCT_ARCHITECTURES if instruct else ARCHITECTURES)
    vision = _vision_from_hf(sub_config(hf, "vision_config", f"{prefix}_vision_model", what))
    q = sub_config(hf, "qformer_config", f"{prefix}_qformer", what)
    where = f"{name} qformer_config"
    check_config_keys(q, set(_Q_KEYS) | _Q_OTHER - ({"use_qformer_text_input"} if instruct else set()), where)
    check_dropout(q, "hidden_dropout_prob", "attention_probs_dropout_prob")
    text_input = instruct or check_bool(q, "use_qformer_text_input", False)
    if arch == RETRIEVAL and not text_input:
        raise UnsupportedModelError(f"{where}: {RETRIEVAL} needs use_qformer_text_input=true (ITM / ITC run text "
                                    "through the Q-Former's text FFN)")
    kw: dict[str, Any] = dict(_Q_DEFAULTS)
    kw.update({field: q[k] for k, field in _Q_KEYS.items() if k in q})
    pad = int_or_none(q.get("pad_token_id", 0), f"{where}.pad_token_id")
    qformer = build_config(QFormerConfig, dict(
        kw, activation=activation_from_hf(q.get("hidden_act", "gelu"), f"{where}.hidden_act"),
        encoder_width=vision.dim, text_input=instruct or arch == RETRIEVAL, pad_token_id=pad,
        bos_token_id=min(30522, kw["vocab_size"] - 1)), where)
    top = dict(vision=vision, qformer=qformer, num_query_tokens=hf.get("num_query_tokens", 32),
               embed_dim=hf.get("image_text_hidden_size", 256), retrieval_heads=arch == RETRIEVAL,
               instruct=instruct)
    if arch != RETRIEVAL:
        text_hf = hf.get("text_config")
        if not isinstance(text_hf, Mapping):
            raise UnsupportedModelError(f"{what}: {arch} needs a text_config (the LLM)")
        conv = _text_converter(text_hf)
        idx = hf.get("image_token_index")
        if idx is None:
            raise UnsupportedModelError(f"{what}: image_token_index is unset; mmjax places the query outputs at "
                                        "the prompt's image tokens (set it to the LLM's image token id)")
        top.update(text=conv.config_from_hf(text_hf), text_family=conv.family,
                   image_token_index=int_or_none(idx, "image_token_index"))
    return build_config(Blip2Config, top, what)


def config_from_hf(hf: Mapping[str, Any]) -> Blip2Config:
    """`Blip2Config` for a parsed BLIP-2 `config.json` (strict, see the module docstring)."""
    return _config_from_hf(hf, instruct=False)


def instruct_config_from_hf(hf: Mapping[str, Any]) -> Blip2Config:
    """`Blip2Config(instruct=True)` for a parsed InstructBLIP `config.json`."""
    return _config_from_hf(hf, instruct=True)


def config_to_hf(config: Blip2Config, model_type: str | None = None) -> dict[str, Any]:
    """The config.json of the transformers class of `config` (retrieval heads and no LLM:
    Blip2ForImageTextRetrieval; an LLM and no heads: Blip2ForConditionalGeneration)."""
    if model_type not in (None, "blip-2", "instructblip"):
        raise UnsupportedModelError(f"cannot export a BLIP-2 as model_type {model_type!r}; supported: blip-2, "
                                    "instructblip")
    instruct = config.instruct
    if (model_type == "instructblip") != instruct and model_type is not None:
        raise UnsupportedModelError(f"cannot export {'an InstructBLIP' if instruct else 'a BLIP-2'} config as "
                                    f"model_type {model_type!r}")
    v, q = config.vision, config.qformer
    if config.retrieval_heads == (config.text is not None):
        raise UnsupportedModelError(
            "cannot export this BLIP-2: transformers has retrieval heads without an LLM "
            "(Blip2ForImageTextRetrieval) or an LLM without them (Blip2ForConditionalGeneration); this config "
            f"has retrieval_heads={config.retrieval_heads} and {'an' if config.text is not None else 'no'} LLM")
    if q.lm_head:
        raise UnsupportedModelError("cannot export this BLIP-2: the Q-Former LM head (ITG, qformer.lm_head=True) "
                                    "has no transformers counterpart")
    if q.text_input and config.text is not None and not instruct:
        raise UnsupportedModelError("cannot export this BLIP-2: Blip2ForConditionalGeneration has no Q-Former "
                                    "text embeddings; set qformer.text_input=False (drop them) first")
    if v.channels != 3 or not v.patch_bias or not v.qkv_bias:
        raise UnsupportedModelError("cannot export this BLIP-2: the image encoder must have 3 channels, a "
                                    "biased patch conv and q/k/v biases")
    prefix = "instructblip" if instruct else "blip_2"
    vision = {"model_type": f"{prefix}_vision_model", "hidden_size": v.dim, "intermediate_size": v.mlp_dim,
              "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
              "image_size": size_to_hf(v.image_size), "patch_size": size_to_hf(v.patch_size),
              "hidden_act": activation_to_hf(v.activation), "layer_norm_eps": v.norm_eps,
              "initializer_range": v.initializer_range, "attention_dropout": 0.0, "qkv_bias": True}
    qformer = {"model_type": f"{prefix}_qformer", "vocab_size": q.vocab_size, "hidden_size": q.dim,
               "num_hidden_layers": q.num_layers, "num_attention_heads": q.num_heads,
               "intermediate_size": q.mlp_dim, "hidden_act": activation_to_hf(q.activation),
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
               "max_position_embeddings": q.max_len, "initializer_range": q.initializer_range,
               "layer_norm_eps": q.norm_eps, "pad_token_id": q.pad_token_id,
               "cross_attention_frequency": q.cross_attention_frequency, "encoder_hidden_size": v.dim,
               "use_qformer_text_input": q.text_input}
    hf: dict[str, Any] = {"model_type": "blip-2", "dtype": "float32", "num_query_tokens": config.num_query_tokens,
                          "image_text_hidden_size": config.embed_dim, "vision_config": vision,
                          "qformer_config": qformer}
    if instruct:
        del qformer["use_qformer_text_input"], hf["image_text_hidden_size"]
        hf["model_type"] = "instructblip"
    if config.text is None:
        hf["architectures"] = [RETRIEVAL]
    else:
        from mmjax.convert import registry

        conv = registry.for_export(config.text_family, config.text)
        text = {k: val for k, val in conv.config_to_hf(config.text, None).items()
                if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
        arch = "InstructBlipForConditionalGeneration" if instruct else "Blip2ForConditionalGeneration"
        hf.update(architectures=[arch], text_config=text,
                  image_token_index=config.image_token_index)
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def _qformer_attention(hf: str, mj: str, attn: str, norm: str, d: int, kv: int, heads: int) -> list[TensorRule]:
    R = TensorRule
    rules = []
    for name, width in (("query", d), ("key", kv), ("value", kv)):
        rules += [R(f"{hf}attention.{name}.weight", (mj, attn, name, "kernel"), (d, width), "in_proj", heads),
                  R(f"{hf}attention.{name}.bias", (mj, attn, name, "bias"), (d,), "in_bias", heads)]
    return rules + [
        R(f"{hf}output.dense.weight", (mj, attn, "out", "kernel"), (d, d), "out_proj", heads),
        R(f"{hf}output.dense.bias", (mj, attn, "out", "bias"), (d,), "copy"),
        R(f"{hf}output.LayerNorm.weight", (mj, norm, "scale"), (d,), "copy"),
        R(f"{hf}output.LayerNorm.bias", (mj, norm, "bias"), (d,), "copy"),
    ]


def _ffn(hf_in: str, hf_out: str, mj: str, mlp: str, norm: str, d: int, m: int) -> list[TensorRule]:
    R = TensorRule
    return [R(f"{hf_in}.dense.weight", (mj, mlp, "fc1", "kernel"), (m, d), "linear"),
            R(f"{hf_in}.dense.bias", (mj, mlp, "fc1", "bias"), (m,), "copy"),
            R(f"{hf_out}.dense.weight", (mj, mlp, "fc2", "kernel"), (d, m), "linear"),
            R(f"{hf_out}.dense.bias", (mj, mlp, "fc2", "bias"), (d,), "copy"),
            R(f"{hf_out}.LayerNorm.weight", (mj, norm, "scale"), (d,), "copy"),
            R(f"{hf_out}.LayerNorm.bias", (mj, norm, "bias"), (d,), "copy")]


def qformer_rules(q: QFormerConfig, embeddings: str | None = None, norm: str = f"{Q}layernorm."
                  ) -> list[TensorRule]:
    """The Q-Former's tensors under `qformer.` (HF names) / `qformer/` (mmjax); the text
    embeddings under `embeddings` (HF prefix; None = the config has none), the input LayerNorm
    at `norm` (BLIP-2: qformer.layernorm, InstructBLIP: qformer.embeddings.layernorm)."""
    R = TensorRule
    d, m = q.dim, q.mlp_dim
    rules = [R(f"{norm}weight", ("qformer", "norm", "scale"), (d,), "copy"),
             R(f"{norm}bias", ("qformer", "norm", "bias"), (d,), "copy")]
    if embeddings is not None:
        rules += [R(f"{embeddings}word_embeddings.weight", ("qformer", "word", "embedding"), (q.vocab_size, d), "copy"),
                  R(f"{embeddings}position_embeddings.weight", ("qformer", "position", "embedding"), (q.max_len, d),
                    "copy")]
    for i in range(q.num_layers):
        hf, mj = f"{Q}encoder.layer.{i}.", ("qformer", f"layers_{i}")
        layer = _qformer_attention(f"{hf}attention.", "L", "attn", "attn_norm", d, d, q.num_heads)
        if q.has_cross_attention(i):
            layer += _qformer_attention(f"{hf}crossattention.", "L", "cross_attn", "cross_norm", d, q.encoder_width,
                                        q.num_heads)
        layer += _ffn(f"{hf}intermediate_query", f"{hf}output_query", "L", "query_mlp", "query_mlp_norm", d, m)
        if q.text_input:
            layer += _ffn(f"{hf}intermediate", f"{hf}output", "L", "mlp", "mlp_norm", d, m)
        rules += [dataclasses.replace(r, path=mj + r.path[1:]) for r in layer]
    return rules


def tensor_rules(c: Blip2Config) -> list[TensorRule]:
    """Every tensor of the HF checkpoint of `c` except the LLM's (fused vision qkv split)."""
    R = TensorRule
    q = c.qformer
    rules = blip_convert.vision_rules(c.vision)
    rules.append(R("query_tokens", ("query_tokens",), (1, c.num_query_tokens, q.dim), "squeeze"))
    if c.instruct:
        rules += qformer_rules(q, f"{Q}embeddings.", f"{Q}embeddings.layernorm.")
    else:
        rules += qformer_rules(q, "embeddings." if q.text_input else None)
    if c.retrieval_heads:
        for name, shape in (("vision_projection", (c.embed_dim, q.dim)), ("text_projection", (c.embed_dim, q.dim)),
                            ("itm_head", (2, q.dim))):
            rules += [R(f"{name}.weight", (name, "kernel"), shape, "linear"),
                      R(f"{name}.bias", (name, "bias"), shape[:1], "copy")]
    if c.text is not None:
        w = text_embed_width(c.text)
        rules += [R("language_projection.weight", ("language_projection", "kernel"), (w, q.dim), "linear"),
                  R("language_projection.bias", ("language_projection", "bias"), (w,), "copy")]
    return rules


_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def _unused_text_ffn(tensors: Mapping[str, np.ndarray], config: Blip2Config) -> list[str]:
    """Text-FFN tensors of a Blip2ForConditionalGeneration saved with use_qformer_text_input
    (never run by that class)."""
    if config.text is None or config.qformer.text_input:
        return []
    return [k for k in tensors if _TEXT_FFN.match(k)]


def params_from_hf(tensors: Mapping[str, np.ndarray], config: Blip2Config) -> dict[str, Any]:
    """mmjax Blip2 params (nested dict of float32 numpy arrays) from HF tensors."""
    tensors = dict(tensors)
    for k in _unused_text_ffn(tensors, config):
        del tensors[k]
    lm = {k[len(LM):]: v for k, v in tensors.items() if k.startswith(LM)}
    rest = {k: v for k, v in tensors.items() if not k.startswith(LM)}
    params = apply_rules_from_hf(split_rows(rest, blip_convert._fused(config.vision)), tensor_rules(config),
                                 derived=DERIVED_BUFFERS)
    if config.retrieval_heads:  # LAVIS's learned temperature, not in transformers: its init
        params["itc_temp"] = np.asarray(ITC_TEMPERATURE_INIT, np.float32)
    if config.text is not None:
        from mmjax.convert import registry

        conv = registry.for_export(config.text_family, config.text)
        params["language_model"] = conv.params_from_hf(lm, config.text)
    elif lm:
        raise InputError(f"checkpoint has {len(lm)} language_model.* tensor(s) but the config has no LLM")
    return params


def params_to_hf(params: Mapping[str, Any], config: Blip2Config) -> dict[str, np.ndarray]:
    """HF tensors (transformers 5.23 names, fused vision qkv) from plain mmjax Blip2 params."""
    config_to_hf(config)  # refuses what HF cannot hold
    params = dict(params)
    lm_params = params.pop("language_model", None)
    params.pop("itc_temp", None)  # transformers has no ITC temperature
    out = join_rows(apply_rules_to_hf(params, tensor_rules(config)), blip_convert._fused(config.vision))
    if config.text is not None:
        from mmjax.convert import registry

        conv = registry.for_export(config.text_family, config.text)
        out.update({LM + k: v for k, v in conv.params_to_hf(lm_params, config.text).items()})
    return out


# --- mmjax compare --------------------------------------------------------------------------

def prompt_inputs(rng: np.random.Generator, batch: int, seq_len: int, config: Blip2Config):
    """(token ids [batch, seq_len + Q], mask, NCHW images, left padding of the last row): one
    image per row, its Q image tokens after the row's first real token."""
    p, idx = config.num_query_tokens, config.image_token_index
    pad_id = config.pad_token_id if config.pad_token_id not in (None, idx) else 0
    width = seq_len + p
    tokens = np.full((batch, width), pad_id, np.int64)
    mask = np.zeros((batch, width), bool)
    num_pad = min(max(1, seq_len // 4), seq_len - 1) if batch > 1 else 0
    for i in range(batch):
        pad = num_pad if i == batch - 1 else 0
        words = rng.integers(0, config.vocab_size - 1, size=seq_len - pad)
        words[words >= idx] += 1
        tokens[i, pad:] = np.concatenate([words[:1], np.full(p, idx), words[1:]])
        mask[i, pad:] = True
    return tokens, mask, reference.random_images(rng, batch, config.vision), num_pad


def text_inputs(rng: np.random.Generator, batch: int, seq_len: int, config: Blip2Config):
    """Q-Former text (ids [batch, seq_len], right-padded rows after the first, mask)."""
    q = config.qformer
    tokens = rng.integers(1, q.vocab_size, size=(batch, seq_len))
    mask = np.ones((batch, seq_len), bool)
    for i in range(1, batch):
        length = max(1, seq_len - (i * max(1, seq_len // 3)) % seq_len)
        tokens[i, length:] = q.pad_token_id or 0
        mask[i, length:] = False
    return tokens.astype(np.int64), mask


def compare_blip2(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """See the module docstring."""
    import json
    import os

    import jax
    import jax.numpy as jnp

    from mmjax.models.blip2 import Blip2

    with open(os.path.join(hf_dir, "config.json")) as f:
        arch = (json.load(f).get("architectures") or ["Blip2ForConditionalGeneration"])[0]
    rng = np.random.default_rng(seed)
    hf_model = reference.load_reference(transformers, torch, arch, hf_dir)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    extra: dict[str, Any] = {"inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "class": arch,
                                        "num_query_tokens": config.num_query_tokens,
                                        "image_size": list(config.vision.image_hw)}}
    if arch == RETRIEVAL:
        seq_len = min(seq_len, config.qformer.max_len)
        tokens, mask = text_inputs(rng, batch, seq_len, config)
        images = reference.random_images(rng, batch, config.vision)
        hf_tokens, hf_mask = tokens, mask
        idx = getattr(hf_model.config, "image_token_index", None)
        if idx is not None:  # transformers then drops the first num_query_tokens ids
            q = config.num_query_tokens
            hf_tokens = np.concatenate([np.full((batch, q), idx), tokens], 1)
            hf_mask = np.concatenate([np.ones((batch, q), bool), mask], 1)
        feed = dict(pixel_values=torch.from_numpy(images), input_ids=torch.from_numpy(hf_tokens),
                    attention_mask=torch.from_numpy(hf_mask.astype(np.int64)))
        with torch.no_grad():
            ref_itm = hf_model(**feed, use_image_text_matching_head=True)
            ref_itc = hf_model(**feed, use_image_text_matching_head=False)
            vis = hf_model.vision_model(pixel_values=feed["pixel_values"], output_hidden_states=True)
        imgs, toks, tm = jnp.asarray(reference.nhwc(images)), jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)
        with jax.default_matmul_precision("highest"):
            itm = module.apply({"params": params}, imgs, toks, tm, method=Blip2.itm_logits)
            itc = module.apply({"params": params}, imgs, toks, tm, method=Blip2.itc)
            embeds, vin = module.apply({"params": params}, imgs, True, method=Blip2.encode_images)
        vision_diffs = reference.layer_diffs(vin["hidden_states"], vis.hidden_states)
        diffs = {"itm_logits": reference.max_abs(itm, ref_itm.logits_per_image),
                 "itc_sim": reference.max_abs(itc["sim"], ref_itc.logits_per_image),
                 "image_feats": reference.max_abs(itc["image_feats"], ref_itc.image_embeds),
                 "text_feat": reference.max_abs(itc["text_feat"], ref_itc.text_embeds),
                 "image_embeds": reference.max_abs(embeds, vis.last_hidden_state),
                 "vision_hidden_states": max(vision_diffs)}
        extra.update(vision_hidden_state_diffs=vision_diffs, lengths=mask.sum(1).tolist(),
                     reference_output_max_abs=float(np.abs(ref_itm.logits_per_image.numpy()).max()))
        return diffs, extra
    if seq_len + config.num_query_tokens > config.max_len:
        raise InputError(f"--seq-len {seq_len} + {config.num_query_tokens} image tokens exceeds the LLM's "
                         f"max_position_embeddings {config.max_len}")
    tokens, mask, images, num_pad = prompt_inputs(rng, batch, seq_len, config)
    check_query_tokens(tokens, batch, config, mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    hf_extra, ours_extra = {}, {}
    if config.instruct:  # the instruction, right-padded, in the Q-Former's vocabulary
        q_tokens, q_mask = text_inputs(rng, batch, min(seq_len, config.qformer.max_len), config)
        hf_extra = dict(qformer_input_ids=torch.from_numpy(q_tokens),
                        qformer_attention_mask=torch.from_numpy(q_mask.astype(np.int64)))
        ours_extra = dict(qformer_tokens=jnp.asarray(q_tokens, jnp.int32), qformer_mask=jnp.asarray(q_mask))
        extra["inputs"]["instruction_lengths"] = q_mask.sum(1).tolist()
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=pixels,
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions), **hf_extra)
        vis = hf_model.vision_model(pixel_values=pixels, output_hidden_states=True)
    logits, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32),
                                        jnp.asarray(reference.nhwc(images)), input_mask=jnp.asarray(mask),
                                        **ours_extra)
    vision_diffs = reference.layer_diffs(inter["vision_hidden_states"], vis.hidden_states)
    ref_logits = ref.logits.numpy()
    ref_query = ref.qformer_outputs.last_hidden_state[:, :config.num_query_tokens]
    diffs = {"logits": reference.max_abs(logits, ref_logits, mask),
             "query_output": reference.max_abs(inter["query_output"], ref_query),
             "image_embeds": reference.max_abs(inter["image_embeds"], vis.last_hidden_state),
             "vision_hidden_states": max(vision_diffs)}
    extra.update(vision_hidden_state_diffs=vision_diffs, left_padding_last_row=num_pad,
                 reference_logits_max_abs=float(np.abs(ref_logits[mask]).max()))
    return diffs, extra


CONVERTERS = (
    Converter(family="blip2", model_types=("blip-2",), architectures=ARCHITECTURES, config_from_hf=config_from_hf,
              config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
              compare=compare_blip2),
    Converter(family="blip2", model_types=("instructblip",), architectures=INSTRUCT_ARCHITECTURES,
              config_from_hf=instruct_config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
              params_to_hf=params_to_hf, compare=compare_blip2, export_when=lambda c: c.instruct),
)
