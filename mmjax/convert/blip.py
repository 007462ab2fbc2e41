"""Hugging Face `BlipForConditionalGeneration` / `BlipForImageTextRetrieval` /
`BlipForQuestionAnswering` (model_type "blip") <-> mmjax `Blip` (task "caption" / "retrieval" /
"vqa": the architecture decides; vqa needs text hidden_size == vision hidden_size, as
transformers' answer decoder does).

Config: the top level, `vision_config` (model_type "blip_vision_model") and `text_config`
("blip_text_model") are checked key by key; anything unknown raises `UnsupportedModelError`
naming it. The image encoder is a `ViTConfig` with `BLIP_VISION_LAYOUT`, the text side a
`BertConfig` (no token types, no pooler, cross-attention from `vision_config.hidden_size`;
causal for captioning, bidirectional for retrieval).

Keys accepted without a field, and why they do not change the function computed:
  * `projection_dim` (top, text and vision), `logit_scale_init_value`: read by `BlipModel`
    only (its CLIP-style projections), neither of these classes has them.
  * `label_smoothing` (top and text), dropout rates (`hidden_dropout_prob`,
    `attention_probs_dropout_prob`, `attention_dropout`), `initializer_range`,
    `initializer_factor`: training only.
  * `text_config.eos_token_id`: captions stop at `sep_token_id` (transformers' `generate` passes
    it as the EOS id); `encoder_hidden_size`: transformers overwrites it with the vision width.
  * `tie_word_embeddings` (top and text) and `text_config.is_decoder` must be true: the LM head
    is the word embedding (no separate tensor is saved), and `is_decoder` is what creates the
    cross-attention layers both classes run.

Weights: `vision_model.*` -- `embeddings.class_embedding [1, 1, d]`, `patch_embedding` (a biased
Conv2d), `position_embedding [1, N, d]`, per layer `layer_norm1`, the fused
`self_attn.qkv [3d, d]` (split into q/k/v, rows in that order), `self_attn.projection`,
`layer_norm2`, `mlp.fc{1,2}`, then `post_layernorm`. Text: `text_decoder.bert.*` (caption) or
`text_encoder.*` (retrieval) with BERT's names (`mmjax.convert.bert.tensor_rules` without token
types and pooler); caption: `text_decoder.cls.predictions.{transform.dense, transform.LayerNorm,
bias}` (the decoder weight / bias are tied to the word embedding / that bias and not saved);
retrieval: `vision_proj`, `text_proj`, `itm_head`; vqa: `text_encoder.*` and the caption
decoder's `text_decoder.*`.

`mmjax compare` (`compare_blip`): random images, token ids starting with the config's
`bos_token_id` and right-padded rows (row 0 full); caption: the logits (on real tokens), the
image embeddings and every vision hidden state; retrieval: the ITM logits, the ITC
similarities (`use_itm_head=False`), the image embeddings and vision hidden states; vqa
(transformers' forward returns no logits: its submodules are run as its forward runs them):
right-padded questions and answers, the answer decoder's logits (real answer tokens), the question
encoder's states (real question tokens), the image embeddings and vision hidden states.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import bert as bert_convert
from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_bool, check_config_keys, check_dropout, check_model_type, int_or_none,
                                join_rows, size_to_hf, split_rows, stamp_version, sub_config, tuple_sizes)
from mmjax.convert.vit import encoder_layer_rules
from mmjax.errors import UnsupportedModelError
from mmjax.models.bert import BertConfig
from mmjax.models.blip import BLIP_VISION_LAYOUT, BlipConfig
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering")
_TASK = {"BlipForConditionalGeneration": "caption", "BlipForImageTextRetrieval": "retrieval",
         "BlipForQuestionAnswering": "vqa"}
_TOP_KEYS = {"vision_config", "text_config", "projection_dim", "logit_scale_init_value", "image_text_hidden_size",
             "label_smoothing", "tie_word_embeddings", "initializer_factor", "initializer_range"}
_VISION_KEYS = {"hidden_size": "dim", "intermediate_size": "mlp_dim", "num_hidden_layers": "num_layers",
                "num_attention_heads": "num_heads", "image_size": "image_size", "patch_size": "patch_size",
                "layer_norm_eps": "norm_eps", "initializer_range": "initializer_range"}
_VISION_OTHER = {"hidden_act", "attention_dropout", "projection_dim"}
_VISION_DEFAULTS = dict(dim=768, mlp_dim=3072, num_layers=12, num_heads=12, image_size=384, patch_size=16,
                        norm_eps=1e-5, initializer_range=1e-10)
_TEXT_KEYS = {"vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "mlp_dim",
              "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
              "max_position_embeddings": "max_len", "layer_norm_eps": "norm_eps",
              "initializer_range": "initializer_range"}
_TEXT_OTHER = {"hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "bos_token_id", "eos_token_id",
               "pad_token_id", "sep_token_id", "is_decoder", "tie_word_embeddings", "label_smoothing",
               "encoder_hidden_size", "projection_dim"}
_TEXT_DEFAULTS = dict(vocab_size=30524, dim=768, mlp_dim=3072, num_layers=12, num_heads=8, max_len=512,
                      norm_eps=1e-12, initializer_range=0.02)
_TOKEN_DEFAULTS = dict(bos_token_id=30522, sep_token_id=102, pad_token_id=0)
DERIVED_BUFFERS = ("embeddings.position_ids",)
VISION = "vision_model."
_TEXT_PREFIX = {"caption": "text_decoder.bert.", "retrieval": "text_encoder."}
_TEXT_PATH = {"caption": "text_decoder", "retrieval": "text_encoder"}
_HEAD = "text_decoder.cls.predictions."


# --- config ---------------------------------------------------------------------------------

def vision_config_from_hf(hf: Mapping[str, Any], where: str = "blip vision_config") -> ViTConfig:
    check_config_keys(hf, set(_VISION_KEYS) | _VISION_OTHER, where)
    kw: dict[str, Any] = {**BLIP_VISION_LAYOUT, **_VISION_DEFAULTS}
    kw.update({field: hf[k] for k, field in _VISION_KEYS.items() if k in hf})
    tuple_sizes(kw, "image_size", "patch_size")
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu"), f"{where}.hidden_act")
    check_dropout(hf, "attention_dropout")
    return build_config(ViTConfig, kw, where)


def config_from_hf(hf: Mapping[str, Any]) -> BlipConfig:
    """`BlipConfig` for a parsed BLIP `config.json` (strict, see the module docstring)."""
    what = "blip config.json"
    check_model_type(hf, "blip", "BLIP")
    check_config_keys(hf, _TOP_KEYS, what)
    task = _TASK[check_architecture(hf, ARCHITECTURES)]
    vision = vision_config_from_hf(sub_config(hf, "vision_config", "blip_vision_model", what))
    t = sub_config(hf, "text_config", "blip_text_model", what)
    where = "blip text_config"
    check_config_keys(t, set(_TEXT_KEYS) | _TEXT_OTHER, where)
    for d, key in ((hf, "tie_word_embeddings"), (t, "tie_word_embeddings"), (t, "is_decoder")):
        if not check_bool(d, key, True):
            raise UnsupportedModelError(f"{what}: {key}=false is not supported (BLIP's LM head is the tied "
                                        "word embedding; is_decoder creates the cross-attention both BLIP "
                                        "classes run)")
    check_dropout(t, "hidden_dropout_prob", "attention_probs_dropout_prob")
    for d in (hf, t):
        if not 0.0 <= float(d.get("label_smoothing", 0.0)) <= 1.0:
            raise UnsupportedModelError(f"{what}: label_smoothing must be in [0, 1]")
    kw: dict[str, Any] = dict(_TEXT_DEFAULTS)
    kw.update({field: t[k] for k, field in _TEXT_KEYS.items() if k in t})
    act = activation_from_hf(t.get("hidden_act", "gelu"), f"{where}.hidden_act")
    tokens = {k: int_or_none(t.get(k, v), f"{where}.{k}") for k, v in _TOKEN_DEFAULTS.items()}
    if tokens["pad_token_id"] is None:
        tokens["pad_token_id"] = 0  # only the generation loop's filler after [SEP]
    int_or_none(t.get("eos_token_id"), f"{where}.eos_token_id")
    text = build_config(BertConfig, dict(kw, activation=act, type_vocab_size=0, pooler=False,
                                         causal=task != "retrieval", cross_attention=True, encoder_width=vision.dim,
                                         pad_token_id=tokens["pad_token_id"]), where)
    return build_config(BlipConfig, dict(vision=vision, text=text, task=task, head_activation=act,
                                         embed_dim=hf.get("image_text_hidden_size", 256), **tokens), what)


def config_to_hf(config: BlipConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json dict of the BLIP class of `config.task` (every key written)."""
    if model_type not in (None, "blip"):
        raise UnsupportedModelError(f"cannot export a BLIP as model_type {model_type!r}; supported: blip")
    v, t = config.vision, config.text
    if t.activation != config.head_activation:
        raise UnsupportedModelError(f"cannot export this BLIP: head_activation={config.head_activation!r} differs "
                                    f"from text.activation={t.activation!r} (HF uses hidden_act for both)")
    if v.channels != 3 or t.type_vocab_size:
        raise UnsupportedModelError(f"cannot export this BLIP: vision.channels={v.channels} (HF: 3), "
                                    f"text.type_vocab_size={t.type_vocab_size} (HF: no token types)")
    arch = {task: a for a, task in _TASK.items()}[config.task]
    vision = {"model_type": "blip_vision_model", "hidden_size": v.dim, "intermediate_size": v.mlp_dim,
              "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
              "image_size": size_to_hf(v.image_size), "patch_size": size_to_hf(v.patch_size),
              "hidden_act": activation_to_hf(v.activation), "layer_norm_eps": v.norm_eps,
              "initializer_range": v.initializer_range, "attention_dropout": 0.0}
    text = {"model_type": "blip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.dim,
            "encoder_hidden_size": v.dim, "intermediate_size": t.mlp_dim, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_len,
            "hidden_act": activation_to_hf(t.activation), "layer_norm_eps": t.norm_eps,
            "initializer_range": t.initializer_range, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "bos_token_id": config.bos_token_id,
            "sep_token_id": config.sep_token_id, "pad_token_id": config.pad_token_id, "is_decoder": True,
            "tie_word_embeddings": True}
    hf = {"architectures": [arch], "model_type": "blip", "dtype": "float32",
          "image_text_hidden_size": config.embed_dim, "tie_word_embeddings": True,
          "text_config": text, "vision_config": vision}
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

_LAYER_NAMES = {"ln1": "layer_norm1", "q": "self_attn.q", "k": "self_attn.k", "v": "self_attn.v",
                "o": "self_attn.projection", "ln2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _fused(v: ViTConfig) -> dict[str, tuple[str, ...]]:
    """The fused qkv tensors of the vision layers -> their q/k/v parts (names the rules use)."""
    out = {}
    for i in range(v.num_layers):
        base = f"{VISION}encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            out[f"{base}qkv.{kind}"] = tuple(f"{base}{p}.{kind}" for p in "qkv")
    return out


def vision_rules(v: ViTConfig) -> list[TensorRule]:
    """The image encoder's tensors (q/k/v already split out of `qkv`), under `vision/`."""
    R = TensorRule
    ph, pw = v.patch_hw
    rules = [
        R(f"{VISION}embeddings.class_embedding", ("cls",), (1, 1, v.dim), "squeeze"),
        R(f"{VISION}embeddings.patch_embedding.weight", ("patch_embed", "kernel"), (v.dim, v.channels, ph, pw),
          "patch"),
        R(f"{VISION}embeddings.patch_embedding.bias", ("patch_embed", "bias"), (v.dim,), "copy"),
        R(f"{VISION}embeddings.position_embedding", ("pos_embedding", "embedding"), (1, v.num_tokens, v.dim),
          "squeeze"),
    ]
    for i in range(v.num_layers):
        rules += encoder_layer_rules(f"{VISION}encoder.layers.{i}.", f"layers_{i}", v.dim, v.num_heads, v.mlp_dim,
                                     True, _LAYER_NAMES)
    rules += [R(f"{VISION}post_layernorm.weight", ("final_norm", "scale"), (v.dim,), "copy"),
              R(f"{VISION}post_layernorm.bias", ("final_norm", "bias"), (v.dim,), "copy")]
    return [r.under("vision") for r in rules]


def tensor_rules(c: BlipConfig) -> list[TensorRule]:
    """Every tensor of the HF checkpoint of `c` (fused vision qkv split into q/k/v)."""
    R = TensorRule
    d, e = c.text.dim, c.embed_dim
    rules = vision_rules(c.vision)
    towers = ("caption", "retrieval") if c.task == "vqa" else (c.task,)  # vqa: encoder and decoder
    for tower in towers:
        prefix, path = _TEXT_PREFIX[tower], _TEXT_PATH[tower]
        for r in bert_convert.tensor_rules(c.text.replace(causal=tower != "retrieval"), pooler=False):
            rules.append(TensorRule(prefix + r.hf_name, (path,) + r.path, r.hf_shape, r.kind, r.heads))
    if c.task in ("caption", "vqa"):
        rules += [R(f"{_HEAD}transform.dense.weight", ("lm_transform", "kernel"), (d, d), "linear"),
                  R(f"{_HEAD}transform.dense.bias", ("lm_transform", "bias"), (d,), "copy"),
                  R(f"{_HEAD}transform.LayerNorm.weight", ("lm_norm", "scale"), (d,), "copy"),
                  R(f"{_HEAD}transform.LayerNorm.bias", ("lm_norm", "bias"), (d,), "copy"),
                  R(f"{_HEAD}bias", ("lm_bias",), (c.text.vocab_size,), "copy")]
    else:
        for name, shape in (("vision_proj", (e, c.vision.dim)), ("text_proj", (e, d)), ("itm_head", (2, d))):
            rules += [R(f"{name}.weight", (name, "kernel"), shape, "linear"),
                      R(f"{name}.bias", (name, "bias"), shape[:1], "copy")]
    return rules


def params_from_hf(tensors: Mapping[str, np.ndarray], config: BlipConfig) -> dict[str, Any]:
    """mmjax Blip params (nested dict of float32 numpy arrays) from HF tensors. A saved tied
    decoder weight / bias must equal the word embedding / the head bias."""
    tensors = dict(tensors)
    if config.task in ("caption", "vqa"):
        tied = {f"{_HEAD}decoder.weight": f"{_TEXT_PREFIX['caption']}embeddings.word_embeddings.weight",
                f"{_HEAD}decoder.bias": f"{_HEAD}bias"}
        for name, source in tied.items():
            if name in tensors:
                if source in tensors and not np.array_equal(tensors[name], tensors[source]):
                    raise UnsupportedModelError(f"{name} differs from {source}: an untied BLIP LM head "
                                                "is not supported")
                if source not in tensors:
                    tensors[source] = tensors[name]
                del tensors[name]
    tensors = split_rows(tensors, _fused(config.vision))
    return apply_rules_from_hf(tensors, tensor_rules(config), derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: BlipConfig) -> dict[str, np.ndarray]:
    """HF tensors (transformers 5.23 names, fused vision qkv) from plain mmjax Blip params."""
    config_to_hf(config)  # refuses what HF cannot hold
    return join_rows(apply_rules_to_hf(params, tensor_rules(config)), _fused(config.vision))


# --- mmjax compare --------------------------------------------------------------------------

def blip_inputs(rng: np.random.Generator, batch: int, seq_len: int, config: BlipConfig):
    """(token ids int64 [batch, seq_len] starting with bos_token_id, attention mask bool, NCHW
    images): rows after the first right-padded to shorter lengths with pad_token_id."""
    t = config.text
    tokens = rng.integers(0, t.vocab_size, size=(batch, seq_len))
    tokens[:, 0] = config.bos_token_id
    mask = np.ones((batch, seq_len), bool)
    for i in range(1, batch):
        length = max(1, seq_len - (i * max(1, seq_len // 3)) % seq_len)
        tokens[i, length:] = config.pad_token_id
        mask[i, length:] = False
    return tokens.astype(np.int64), mask, reference.random_images(rng, batch, config.vision)


def compare_blip(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """BlipForConditionalGeneration: logits (real tokens), image embeddings, vision hidden
    states; BlipForImageTextRetrieval: ITM logits, ITC similarities, the same vision outputs."""
    import jax.numpy as jnp

    seq_len = min(seq_len, config.max_len)
    tokens, mask, images = blip_inputs(np.random.default_rng(seed), batch, seq_len, config)
    arch = {task: a for a, task in _TASK.items()}[config.task]
    hf_model = reference.load_reference(transformers, torch, arch, hf_dir)
    feed = dict(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
    ours_tokens, ours_images = jnp.asarray(tokens, jnp.int32), jnp.asarray(reference.nhwc(images))
    if config.task == "vqa":
        return _compare_vqa(hf_model, module, np_params, feed, tokens, mask, ours_tokens, ours_images, seed,
                            batch, seq_len, config, torch)
    with torch.no_grad():
        vis = hf_model.vision_model(pixel_values=feed["pixel_values"], output_hidden_states=True)
        if config.task == "caption":
            ref = hf_model(**feed)
        else:
            ref_itm = hf_model(**feed, use_itm_head=True).itm_score
            ref_itc = hf_model(**feed, use_itm_head=False).itm_score
    out, inter = reference.run_mmjax(module, np_params, ours_tokens, ours_images, input_mask=jnp.asarray(mask))
    vision_diffs = reference.layer_diffs(inter["vision_hidden_states"], vis.hidden_states)
    diffs = {"image_embeds": reference.max_abs(inter["image_embeds"], vis.last_hidden_state),
             "vision_hidden_states": max(vision_diffs)}
    if config.task == "caption":
        diffs["logits"] = reference.max_abs(out, ref.logits, mask)
        scale = float(np.abs(ref.logits.numpy()[mask]).max())
    else:
        diffs["itm_logits"] = reference.max_abs(out, ref_itm)
        diffs["itc_sim"] = reference.max_abs(inter["sim"], ref_itc)
        scale = float(np.abs(ref_itm.numpy()).max())
    extra = {"vision_hidden_state_diffs": vision_diffs, "reference_output_max_abs": scale,
             "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "lengths": mask.sum(1).tolist(),
                        "image_size": list(config.vision.image_hw), "task": config.task}}
    return diffs, extra


def _compare_vqa(hf_model, module, np_params, feed, q_tokens, q_mask, ours_q, ours_images, seed, batch, seq_len,
                 config, torch):
    import jax.numpy as jnp

    answer, a_mask, _ = blip_inputs(np.random.default_rng(seed + 1), batch, seq_len, config)
    with torch.no_grad():  # BlipForQuestionAnswering.forward, step by step
        vis = hf_model.vision_model(pixel_values=feed["pixel_values"], output_hidden_states=True)
        image = vis.last_hidden_state
        ref_q = hf_model.text_encoder(input_ids=feed["input_ids"], attention_mask=feed["attention_mask"],
                                      encoder_hidden_states=image,
                                      encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long))[0]
        ref = hf_model.text_decoder(input_ids=torch.from_numpy(answer),
                                    attention_mask=torch.from_numpy(a_mask.astype(np.int64)),
                                    encoder_hidden_states=ref_q, encoder_attention_mask=feed["attention_mask"],
                                    reduction="none").logits
    out, inter = reference.run_mmjax(module, np_params, jnp.asarray(answer, jnp.int32), ours_images,
                                     input_mask=jnp.asarray(a_mask), question=ours_q,
                                     question_mask=jnp.asarray(q_mask))
    vision_diffs = reference.layer_diffs(inter["vision_hidden_states"], vis.hidden_states)
    diffs = {"image_embeds": reference.max_abs(inter["image_embeds"], image),
             "vision_hidden_states": max(vision_diffs),
             "question_states": reference.max_abs(inter["question_last_hidden_state"], ref_q, q_mask),
             "logits": reference.max_abs(out, ref, a_mask)}
    extra = {"vision_hidden_state_diffs": vision_diffs,
             "reference_output_max_abs": float(np.abs(ref.numpy()[a_mask]).max()),
             "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "lengths": q_mask.sum(1).tolist(),
                        "answer_lengths": a_mask.sum(1).tolist(), "image_size": list(config.vision.image_hw),
                        "task": config.task}}
    return diffs, extra


CONVERTER = Converter(
    family="blip", model_types=("blip",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf, compare=compare_blip,
)
