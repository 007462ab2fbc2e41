"""Hugging Face `LlavaForConditionalGeneration` <-> mmjax `Llava` (a CLIP image tower, the
LLaVA-1.5 two-Linear projector, a LLaMA / Mistral decoder).

Config: the top level is checked key by key; `vision_config` goes through
`mmjax.convert.clip.vision_config_from_hf` (model_type "clip_vision_model") and `text_config`
through `mmjax.convert.llama.config_from_hf` (model_type "llama" or "mistral"); another tower
type (SigLIP, Qwen2, ...) raises `UnsupportedModelError` naming it.

Decisions on keys accepted without a field:
  * `image_seq_length`: read by the processor only (how many image tokens it writes per
    image); the model's count follows from the tower and the strategy (`LlavaConfig.
    image_seq_length`), which export writes.
  * `ignore_index` (older configs): the label value the loss skips; training only.
  * `vocab_size` at the top level (older configs): must equal `text_config.vocab_size`.
  * `pad_token_id` at the top level (older configs): the text model's pad id when
    `text_config` has none (tokenizer bookkeeping).
  * `vision_config.vocab_size` (older configs, unused by `CLIPVisionModel`).
  * `tie_word_embeddings`: the head is tied when it or `text_config.tie_word_embeddings` is
    true (transformers copies the text value up); export writes both.

Weights: transformers 5.23's `save_pretrained` writes `vision_tower.*` (no `vision_model.`),
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*` and `language_model.lm_head.weight`
(the Hub layout of llava-hf checkpoints, which nest the tower as `vision_tower.vision_model.*`).
Both tower layouts are read, and the layout of transformers 4.5x's `save_pretrained`
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.weight`) too; export writes what transformers 5.23 writes. The rules are CLIP's
`vision_tower_rules` and LLaMA's `tensor_rules` under their prefixes, plus the projector's.

`mmjax compare` (`compare_llava`): one random image per row, its `image_seq_length` image
tokens placed after the first text token of each row, `--seq-len` text tokens per row, the last
row left-padded when batch > 1; logits, image features, input embeddings, every decoder hidden
state (on real tokens) and every image-tower hidden state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from mmjax.convert import clip as clip_convert
from mmjax.convert import llama as llama_convert
from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_bool, check_config_keys, check_model_type, stamp_version, sub_config)
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.llava import STRATEGIES, LlavaConfig, check_image_tokens

ARCHITECTURES = ("LlavaForConditionalGeneration",)
TEXT_MODEL_TYPES = ("llama", "mistral")
_TOP_KEYS = {"vision_config", "text_config", "image_token_index", "image_seq_length",
             "projector_hidden_act", "vision_feature_select_strategy", "vision_feature_layer",
             "multimodal_projector_bias", "tie_word_embeddings", "ignore_index", "vocab_size",
             "pad_token_id"}
# transformers LlavaConfig class defaults
_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu",
                 vision_feature_select_strategy="default", vision_feature_layer=-2,
                 multimodal_projector_bias=True)
DERIVED_BUFFERS = clip_convert.DERIVED_BUFFERS + llama_convert.DERIVED_BUFFERS
VISION, PROJECTOR, LM = "vision_tower.", "multi_modal_projector.", "language_model."
# older layouts -> the one the rules name (first match wins)
_LAYOUT_PREFIXES = (
    ("vision_tower.vision_model.", VISION),  # Hub checkpoints
    ("model.vision_tower.vision_model.", VISION),  # transformers 4.5x save_pretrained
    ("model.vision_tower.", VISION),
    ("model.multi_modal_projector.", PROJECTOR),
    ("model.language_model.", LM + "model."),
)
_OLD_HEAD = "lm_head.weight"  # transformers 4.5x


# --- config ---------------------------------------------------------------------------------

def _layer(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, list):
        value = tuple(value)
    items = value if isinstance(value, tuple) else (value,)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise UnsupportedModelError(f"llava config.json: vision_feature_layer must be an int or a list "
                                    f"of ints, got {value!r}")
    return value


def config_from_hf(hf: Mapping[str, Any]) -> LlavaConfig:
    """`LlavaConfig` for a parsed `LlavaForConditionalGeneration` config.json (strict)."""
    what = "llava config.json"
    check_model_type(hf, "llava", "LLaVA")
    check_config_keys(hf, _TOP_KEYS, what)
    check_architecture(hf, ARCHITECTURES)
    text_hf = dict(hf.get("text_config") or {})
    text_type = text_hf.setdefault("model_type", "llama")
    if text_type not in TEXT_MODEL_TYPES:
        raise UnsupportedModelError(f"{what}: text_config.model_type {text_type!r} is not supported; "
                                    f"supported: {', '.join(TEXT_MODEL_TYPES)}")
    if hf.get("pad_token_id") is not None and text_hf.get("pad_token_id") is None:
        text_hf["pad_token_id"] = hf["pad_token_id"]
    tie = check_bool(hf, "tie_word_embeddings") or check_bool(text_hf, "tie_word_embeddings")
    text_hf["tie_word_embeddings"] = tie
    text_hf.pop("architectures", None)  # the text model's own class, bookkeeping here
    text = llama_convert.config_from_hf(text_hf)
    if hf.get("vocab_size") is not None and hf["vocab_size"] != text.vocab_size:
        raise UnsupportedModelError(f"{what}: vocab_size {hf['vocab_size']!r} differs from "
                                    f"text_config.vocab_size {text.vocab_size}")
    vision_hf = dict(sub_config(hf, "vision_config", "clip_vision_model", what))
    vision_hf.pop("vocab_size", None)  # written by older LlavaConfig defaults, unused by the tower
    vision = clip_convert.vision_config_from_hf(vision_hf, where="llava vision_config")
    kw = {**_DEFAULTS, **{k: hf[k] for k in _DEFAULTS if k in hf}}
    strategy = kw["vision_feature_select_strategy"]
    if strategy not in STRATEGIES:
        raise UnsupportedModelError(f"{what}: vision_feature_select_strategy {strategy!r} is not "
                                    f"supported; supported: {', '.join(STRATEGIES)}")
    return build_config(LlavaConfig, dict(
        vision=vision, text=text, image_token_index=kw["image_token_index"],
        vision_feature_layer=_layer(kw["vision_feature_layer"]),
        vision_feature_select_strategy=strategy, connector="mlp",
        projector_hidden_act=activation_from_hf(kw["projector_hidden_act"], "projector_hidden_act"),
        projector_bias=check_bool(hf, "multimodal_projector_bias", True)), what)


def _check_exportable(config: LlavaConfig) -> None:
    if config.connector != "mlp":
        raise UnsupportedModelError(
            f"cannot export a LLaVA with connector={config.connector!r} to Hugging Face "
            "LlavaForConditionalGeneration, whose projector is Linear-act-Linear (connector='mlp'); "
            "it has no counterpart for a single Linear or a resampler")
    if config.text.num_experts:
        raise UnsupportedModelError("cannot export a LLaVA with an MoE language model to Hugging Face "
                                    "LlavaForConditionalGeneration (text_config must be llama or mistral)")


def config_to_hf(config: LlavaConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json dict of `LlavaForConditionalGeneration` (transformers 5.23 layout)."""
    if model_type not in (None, "llava"):
        raise UnsupportedModelError(f"cannot export a LLaVA as model_type {model_type!r}; supported: llava")
    _check_exportable(config)
    bookkeeping = ("architectures", "dtype", "transformers_version")
    text = {k: v for k, v in llama_convert.config_to_hf(config.text).items() if k not in bookkeeping}
    vision = {k: v for k, v in clip_convert.vision_model_config_to_hf(config.vision).items()
              if k not in bookkeeping}
    layer = config.vision_feature_layer
    hf: dict[str, Any] = {
        "architectures": list(ARCHITECTURES), "model_type": "llava", "dtype": "float32",
        "image_seq_length": config.image_seq_length, "image_token_index": config.image_token_index,
        "multimodal_projector_bias": config.projector_bias,
        "projector_hidden_act": activation_to_hf(config.projector_hidden_act),
        "text_config": text, "vision_config": vision,
        "tie_word_embeddings": config.text.tie_embeddings,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def _hf_under(rules: list[TensorRule], prefix: str, path: str) -> list[TensorRule]:
    return [dataclasses.replace(r, hf_name=prefix + r.hf_name, path=(path,) + r.path) for r in rules]


def projector_rules(c: LlavaConfig) -> list[TensorRule]:
    """`multi_modal_projector.linear_{1,2}` (connector "mlp")."""
    rules = []
    for name, shape in (("linear_1", (c.text.dim, c.features_dim)), ("linear_2", (c.text.dim, c.text.dim))):
        hf, mj = f"{PROJECTOR}{name}.", ("projector", name)
        rules.append(TensorRule(hf + "weight", mj + ("kernel",), shape, "linear"))
        if c.projector_bias:
            rules.append(TensorRule(hf + "bias", mj + ("bias",), shape[:1], "copy"))
    return rules


def tensor_rules(c: LlavaConfig) -> list[TensorRule]:
    """Every tensor of a `LlavaForConditionalGeneration` checkpoint of `c` (5.23 names)."""
    return (_hf_under(clip_convert.vision_tower_rules(c.vision), VISION, "vision") + projector_rules(c)
            + _hf_under(llama_convert.tensor_rules(c.text), LM, "language_model"))


def canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` renamed from the Hub / transformers 4.5x layouts to the one the rules name."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        new = LM + _OLD_HEAD if name == _OLD_HEAD else name
        for old, prefix in _LAYOUT_PREFIXES:
            if name.startswith(old):
                new = prefix + name[len(old):]
                break
        if new in out:
            raise InputError(f"checkpoint holds tensor {new!r} twice (under two layouts)")
        out[new] = value
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlavaConfig) -> dict[str, Any]:
    """mmjax Llava params (nested dict of float32 numpy arrays) from HF tensors."""
    tensors = canonical_names(tensors)
    head, embed = LM + "lm_head.weight", LM + "model.embed_tokens.weight"
    if config.text.tie_embeddings and head in tensors:  # a tied head stored anyway: must be the embedding
        if embed in tensors and np.array_equal(tensors[head], tensors[embed]):
            tensors = {k: v for k, v in tensors.items() if k != head}
        else:
            raise InputError(f"tie_word_embeddings is true but {head} differs from {embed}")
    return apply_rules_from_hf(tensors, tensor_rules(config), derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: LlavaConfig) -> dict[str, np.ndarray]:
    """HF tensors (transformers 5.23 names) from plain mmjax Llava params."""
    _check_exportable(config)
    return apply_rules_to_hf(params, tensor_rules(config))


# --- mmjax compare --------------------------------------------------------------------------

def llava_inputs(rng: np.random.Generator, batch: int, seq_len: int, config: LlavaConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(token ids [batch, seq_len + P], input mask, NCHW images [batch, C, H, W], left padding of
    the last row): one image per row, its P = image_seq_length image tokens after the row's first
    real text token; the last row left-padded when batch > 1."""
    p, idx = config.image_seq_length, config.image_token_index
    text = config.text
    pad_id = text.pad_token_id if text.pad_token_id is not None and text.pad_token_id != idx else 0
    width = seq_len + p
    tokens = np.full((batch, width), pad_id, np.int64)
    mask = np.zeros((batch, width), bool)
    num_pad = min(max(1, seq_len // 4), seq_len - 1) if batch > 1 else 0
    for i in range(batch):
        pad = num_pad if i == batch - 1 else 0
        words = rng.integers(0, text.vocab_size - 1, size=seq_len - pad)
        words[words >= idx] += 1  # never the image token
        row = np.concatenate([words[:1], np.full(p, idx), words[1:]])
        tokens[i, pad:] = row
        mask[i, pad:] = True
    images = reference.random_images(rng, batch, config.vision)
    return tokens, mask, images, num_pad


def compare_llava(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """LlavaForConditionalGeneration: logits, image features, input embeddings, decoder and
    image-tower hidden states, one image per row with a left-padded last row."""
    import jax.numpy as jnp

    width = seq_len + config.image_seq_length
    if width > config.max_len:
        raise InputError(f"--seq-len {seq_len} + {config.image_seq_length} image tokens exceeds the "
                         f"language model's max_position_embeddings {config.max_len}")
    tokens, mask, images, num_pad = llava_inputs(np.random.default_rng(seed), batch, seq_len, config)
    check_image_tokens(tokens, batch, config, mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    hf_model = reference.load_reference(transformers, torch, "LlavaForConditionalGeneration", hf_dir)
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=pixels,
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions), output_hidden_states=True)
        ref_vision = hf_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    logits, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32),
                                        jnp.asarray(reference.nhwc(images)), input_mask=jnp.asarray(mask))
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]  # HF's last is after the norm
    layer_diffs = reference.layer_diffs(ours, ref.hidden_states, mask)
    vision_diffs = reference.layer_diffs(inter["vision_hidden_states"], ref_vision)
    ref_logits = ref.logits.numpy()
    diffs = {
        "logits": reference.max_abs(logits, ref_logits, mask),
        "image_features": reference.max_abs(  # HF: [n * P, dim]
            np.asarray(inter["image_features"]).reshape(-1, config.dim), ref.image_hidden_states),
        "inputs_embeds": layer_diffs[0],
        "hidden_states": max(layer_diffs),
        "vision_hidden_states": max(vision_diffs),
    }
    extra = {
        "hidden_state_diffs": layer_diffs, "vision_hidden_state_diffs": vision_diffs,
        "inputs": {"batch": batch, "seq_len": seq_len, "image_seq_length": config.image_seq_length,
                   "image_size": list(config.vision.image_hw), "seed": seed,
                   "left_padding_last_row": num_pad},
        "reference_logits_max_abs": float(np.abs(ref_logits[mask]).max()),
    }
    return diffs, extra


CONVERTER = Converter(
    family="llava", model_types=("llava",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
    params_to_hf=params_to_hf, compare=compare_llava,
)
