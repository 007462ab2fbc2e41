"""Hugging Face `BertModel` (model_type "bert") <-> mmjax `Bert`.

Config: every key of `config.json` is mapped to a `BertConfig` field (`_DIRECT_KEYS`,
`hidden_act` through the core's strict activation table, `is_decoder` -> `causal`,
`add_cross_attention` -> `cross_attention`) or is on the explicit list below; anything else
raises `UnsupportedModelError` naming the key.

Keys accepted without a field, and why they do not change the function computed:
  * `hidden_dropout_prob`, `attention_probs_dropout_prob`, `classifier_dropout` (>= 0 or null):
    dropout acts only in training; the converted model computes the HF model in `eval()` mode.
  * `gradient_checkpointing` (old configs): recomputation in training, same numbers.
  * `chunk_size_feed_forward` (int >= 0): the MLP applied in sequence chunks, same numbers.
  * `bos_token_id`, `eos_token_id`, `tie_word_embeddings`: generation / LM-head settings; a
    `BertModel` has no head and generates nothing.
  * `id2label`, `label2id`, `problem_type`, `tokenizer_class`: label names, the training loss
    of task heads, the tokenizer's class name.
  * `position_embedding_type`: must be "absolute" (learned absolute positions, the only kind
    transformers 5 implements); "relative_key" / "relative_key_query" are refused.
  * `is_encoder_decoder`: must be false.
`pad_token_id` is kept (`BertConfig.pad_token_id`): in PyTorch it only freezes that
embedding row's gradient, the forward pass does not depend on it.

HF BERT refuses cross-attention without `is_decoder` (`BertLayer` raises), and its
cross-attention keys/values read `hidden_size`-wide encoder states: configs with
`cross_attention` but not `causal`, with `encoder_width != dim`, or without token types
(`type_vocab_size=0`) do not export (named in the error).

Weights: `embeddings.{word,position,token_type}_embeddings.weight` -> `embeddings/{word,
position,token_type}/embedding`; `embeddings.LayerNorm` -> `embeddings/norm`; per layer
`attention.self.{query,key,value}` (heads split out), `attention.output.dense`,
`attention.output.LayerNorm` -> `attn_norm` (post-norm: the norm after the attention residual),
`crossattention.*` -> `cross_attn` / `cross_norm`, `intermediate.dense` -> `mlp/fc1`,
`output.dense` -> `mlp/fc2`, `output.LayerNorm` -> `mlp_norm`; `pooler.dense` -> `pooler`.
Checkpoints whose every tensor carries the `bert.` prefix (saved from a wrapper) are read too;
TF-era names `LayerNorm.gamma` / `.beta` are read as `.weight` / `.bias`. The pooler is
optional: a checkpoint without `pooler.dense.*` (saved with `add_pooling_layer=False`) gives
params without `pooler`, and the model then returns no `pooler_output`; export writes the pooler
exactly when the params have one. `embeddings.position_ids` / `token_type_ids` buffers are
derived data and skipped.

`mmjax compare` (`compare_bert`): random token ids with token types spread over
[0, type_vocab_size), a right-padded batch of different lengths with its attention mask, and
for a decoder with cross-attention random encoder states with their own padding mask; compares
the last hidden state, every hidden state (all positions) and the pooler output.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_architecture,
                                check_bool, check_config_keys, check_dropout, check_model_type,
                                int_or_none, stamp_version, strip_prefix)
from mmjax.convert.trees import flatten
from mmjax.errors import UnsupportedModelError
from mmjax.models.bert import BertConfig

ARCHITECTURES = ("BertModel",)

# config.json key -> BertConfig field
_DIRECT_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_dim",
    "max_position_embeddings": "max_len",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "norm_eps",
    "initializer_range": "initializer_range",
}
_SPECIAL_KEYS = {"hidden_act", "is_decoder", "add_cross_attention", "pad_token_id",
                 "position_embedding_type", "is_encoder_decoder"}
_ACCEPTED_KEYS = {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                  "gradient_checkpointing", "chunk_size_feed_forward", "bos_token_id", "eos_token_id",
                  "tie_word_embeddings", "id2label", "label2id", "problem_type", "tokenizer_class"}
# transformers.BertConfig class defaults, used when a key is absent
_HF_DEFAULTS = dict(vocab_size=30522, dim=768, num_layers=12, num_heads=12, mlp_dim=3072, max_len=512,
                    type_vocab_size=2, norm_eps=1e-12, initializer_range=0.02)
DERIVED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_POOLER = ("pooler.dense.weight", "pooler.dense.bias")


# --- config ---------------------------------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any]) -> BertConfig:
    """`BertConfig` for a parsed BERT `config.json` (strict, see the module docstring)."""
    what = "bert config.json"
    check_model_type(hf, "bert", "BERT")
    check_config_keys(hf, set(_DIRECT_KEYS) | _SPECIAL_KEYS | _ACCEPTED_KEYS, what)
    check_architecture(hf, ARCHITECTURES)
    kw: dict[str, Any] = dict(_HF_DEFAULTS)
    for hf_key, field in _DIRECT_KEYS.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu"))
    check_dropout(hf, "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UnsupportedModelError(f"{what}: position_embedding_type {position_type!r} is not supported; "
                                    "supported: absolute (learned absolute positions)")
    if check_bool(hf, "is_encoder_decoder"):
        raise UnsupportedModelError(f"{what}: is_encoder_decoder=true is not supported (a BertModel is one stack)")
    chunk = hf.get("chunk_size_feed_forward", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise UnsupportedModelError(f"{what}: chunk_size_feed_forward must be an int >= 0, got {chunk!r}")
    for key in ("bos_token_id", "eos_token_id"):
        value = hf.get(key)
        if not (value is None or isinstance(value, list) or isinstance(value, int)):
            raise UnsupportedModelError(f"{what}: {key} must be an int, a list or null, got {value!r}")
    check_bool(hf, "tie_word_embeddings", True)
    check_bool(hf, "gradient_checkpointing")
    kw["causal"] = check_bool(hf, "is_decoder")
    kw["cross_attention"] = check_bool(hf, "add_cross_attention")
    if kw["cross_attention"] and not kw["causal"]:
        raise UnsupportedModelError(f"{what}: add_cross_attention=true needs is_decoder=true "
                                    "(transformers' BertLayer refuses it otherwise)")
    kw["pad_token_id"] = int_or_none(hf.get("pad_token_id", 0), "pad_token_id")
    if kw["pad_token_id"] is not None and not 0 <= kw["pad_token_id"] < kw["vocab_size"]:
        kw["pad_token_id"] = None  # an out-of-vocabulary padding id never occurs in the ids
    return build_config(BertConfig, kw, what)


def _check_exportable(config: BertConfig) -> None:
    problems = []
    if config.cross_attention and not config.causal:
        problems.append("cross_attention=True with causal=False (HF needs is_decoder for cross-attention)")
    if config.encoder_width not in (None, config.dim):
        problems.append(f"encoder_width={config.encoder_width} != dim={config.dim} (HF BERT's "
                        "cross-attention reads hidden_size-wide encoder states)")
    if config.type_vocab_size == 0:
        problems.append("type_vocab_size=0 (HF BERT always adds a token-type embedding)")
    if problems:
        raise UnsupportedModelError("cannot export this BERT to Hugging Face BertModel: " + "; ".join(problems))


def config_to_hf(config: BertConfig, model_type: str | None = None) -> dict[str, Any]:
    """HF `BertModel` `config.json` dict (every key written)."""
    if model_type not in (None, "bert"):
        raise UnsupportedModelError(f"cannot export a BERT as model_type {model_type!r}; supported: bert")
    _check_exportable(config)
    hf: dict[str, Any] = {
        "architectures": list(ARCHITECTURES),
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": activation_to_hf(config.activation),
        "max_position_embeddings": config.max_len,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "is_decoder": config.causal,
        "add_cross_attention": config.cross_attention,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "dtype": "float32",
    }
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def _attention_rules(hf: str, mj: str, attn: str, norm: str, dim: int, kv_dim: int,
                     heads: int) -> list[TensorRule]:
    """One BertAttention (self or cross): q/k/v, output dense, the post-residual LayerNorm."""
    R = TensorRule
    rules = []
    for name, width in (("query", dim), ("key", kv_dim), ("value", kv_dim)):
        rules += [R(f"{hf}self.{name}.weight", (mj, attn, name, "kernel"), (dim, width), "in_proj", heads),
                  R(f"{hf}self.{name}.bias", (mj, attn, name, "bias"), (dim,), "in_bias", heads)]
    return rules + [
        R(f"{hf}output.dense.weight", (mj, attn, "out", "kernel"), (dim, dim), "out_proj", heads),
        R(f"{hf}output.dense.bias", (mj, attn, "out", "bias"), (dim,), "copy"),
        R(f"{hf}output.LayerNorm.weight", (mj, norm, "scale"), (dim,), "copy"),
        R(f"{hf}output.LayerNorm.bias", (mj, norm, "bias"), (dim,), "copy"),
    ]


def tensor_rules(c: BertConfig, pooler: bool = True) -> list[TensorRule]:
    """Every tensor of an HF `BertModel` checkpoint of `c` (with the pooler when `pooler`)."""
    R = TensorRule
    d, m = c.dim, c.mlp_dim
    rules = [
        R("embeddings.word_embeddings.weight", ("embeddings", "word", "embedding"), (c.vocab_size, d), "copy"),
        R("embeddings.position_embeddings.weight", ("embeddings", "position", "embedding"), (c.max_len, d),
          "copy"),
    ]
    if c.type_vocab_size:
        rules.append(R("embeddings.token_type_embeddings.weight", ("embeddings", "token_type", "embedding"),
                       (c.type_vocab_size, d), "copy"))
    rules += [R("embeddings.LayerNorm.weight", ("embeddings", "norm", "scale"), (d,), "copy"),
              R("embeddings.LayerNorm.bias", ("embeddings", "norm", "bias"), (d,), "copy")]
    for i in range(c.num_layers):
        hf, mj = f"encoder.layer.{i}.", f"layers_{i}"
        rules += _attention_rules(f"{hf}attention.", mj, "attn", "attn_norm", d, d, c.num_heads)
        if c.cross_attention:
            rules += _attention_rules(f"{hf}crossattention.", mj, "cross_attn", "cross_norm", d, c.cross_width,
                                      c.num_heads)
        rules += [
            R(f"{hf}intermediate.dense.weight", (mj, "mlp", "fc1", "kernel"), (m, d), "linear"),
            R(f"{hf}intermediate.dense.bias", (mj, "mlp", "fc1", "bias"), (m,), "copy"),
            R(f"{hf}output.dense.weight", (mj, "mlp", "fc2", "kernel"), (d, m), "linear"),
            R(f"{hf}output.dense.bias", (mj, "mlp", "fc2", "bias"), (d,), "copy"),
            R(f"{hf}output.LayerNorm.weight", (mj, "mlp_norm", "scale"), (d,), "copy"),
            R(f"{hf}output.LayerNorm.bias", (mj, "mlp_norm", "bias"), (d,), "copy"),
        ]
    if pooler:
        rules += [R("pooler.dense.weight", ("pooler", "kernel"), (d, d), "linear"),
                  R("pooler.dense.bias", ("pooler", "bias"), (d,), "copy")]
    return rules


def _canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names without a `bert.` prefix (when every tensor has it) and with TF-era
    `LayerNorm.gamma` / `.beta` as `.weight` / `.bias`."""
    out = {}
    for name, w in strip_prefix(tensors, "bert.").items():
        if ".LayerNorm." in name:
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[name] = w
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
    """mmjax BERT params (nested dict of float32 numpy arrays) from HF `BertModel` tensors; the
    pooler when the checkpoint has it (and the config asks for one)."""
    tensors = _canonical_names(tensors)
    pooler = config.pooler and any(name in tensors for name in _POOLER)
    return apply_rules_from_hf(tensors, tensor_rules(config, pooler=pooler), derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: BertConfig) -> dict[str, np.ndarray]:
    """HF `BertModel` tensors from plain mmjax BERT params (the pooler when they have one)."""
    _check_exportable(config)
    pooler = any(path[0] == "pooler" for path, _ in flatten(params))
    return apply_rules_to_hf(params, tensor_rules(config, pooler=pooler))


# --- mmjax compare --------------------------------------------------------------------------

def random_inputs(rng: np.random.Generator, batch: int, seq_len: int, config: BertConfig):
    """(tokens int64 [batch, seq], token types int64, attention mask bool): random ids, types
    spread over [0, type_vocab_size), rows right-padded to different lengths with the padding
    id (row 0 full, the others shorter)."""
    c = config
    tokens = rng.integers(0, c.vocab_size, size=(batch, seq_len))
    types = rng.integers(0, max(c.type_vocab_size, 1), size=(batch, seq_len))
    mask = np.ones((batch, seq_len), bool)
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    for i in range(1, batch):
        length = max(1, seq_len - (i * max(1, seq_len // 3)) % seq_len)
        tokens[i, length:] = pad
        types[i, length:] = 0
        mask[i, length:] = False
    return tokens.astype(np.int64), types.astype(np.int64), mask


def encoder_inputs(rng: np.random.Generator, batch: int, ctx: int, width: int):
    """Random encoder states [batch, ctx, width] float32 and a padding mask (row 0 full)."""
    states = rng.normal(size=(batch, ctx, width)).astype(np.float32)
    mask = np.ones((batch, ctx), bool)
    for i in range(1, batch):
        mask[i, max(1, ctx - 2 * i):] = False
    return states, mask


def compare_bert(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """BertModel: last hidden state, every hidden state and the pooler output (when the
    checkpoint has a pooler), on a right-padded random batch with token types; a decoder with
    cross-attention also gets random encoder states with a padding mask."""
    import jax.numpy as jnp

    seq_len = min(seq_len, config.max_len)
    rng = np.random.default_rng(seed)
    tokens, types, mask = random_inputs(rng, batch, seq_len, config)
    hf_model = reference.load_reference(transformers, torch, "BertModel", hf_dir)
    feed = dict(input_ids=torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
    ours = [jnp.asarray(tokens, jnp.int32), jnp.asarray(types, jnp.int32), jnp.asarray(mask)]
    inputs: dict[str, Any] = {"batch": batch, "seq_len": seq_len, "seed": seed,
                              "lengths": mask.sum(1).tolist(),
                              "token_types": sorted(set(types[mask].tolist()))}
    if config.cross_attention:
        ctx = max(2, seq_len // 2 + 1)
        states, enc_mask = encoder_inputs(rng, batch, ctx, config.cross_width)
        feed.update(encoder_hidden_states=torch.from_numpy(states),
                    encoder_attention_mask=torch.from_numpy(enc_mask.astype(np.int64)))
        ours += [jnp.asarray(states), jnp.asarray(enc_mask)]
        inputs.update(encoder_ctx=ctx, encoder_lengths=enc_mask.sum(1).tolist())
    with torch.no_grad():
        ref = hf_model(**feed, output_hidden_states=True, use_cache=False)
    last, inter = reference.run_mmjax(module, np_params, *ours)
    layer_diffs = reference.layer_diffs(inter["hidden_states"], ref.hidden_states)
    diffs = {"embeddings": layer_diffs[0], "hidden_states": max(layer_diffs),
             "last_hidden_state": reference.max_abs(last, ref.last_hidden_state)}
    if "pooler_output" in inter:
        diffs["pooler_output"] = reference.max_abs(inter["pooler_output"], ref.pooler_output)
    extra = {"hidden_state_diffs": layer_diffs, "inputs": inputs,
             "reference_last_hidden_max_abs": float(np.abs(ref.last_hidden_state.numpy()).max())}
    return diffs, extra


CONVERTER = Converter(
    family="bert",
    model_types=("bert",),
    architectures=ARCHITECTURES,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    compare=compare_bert,
)
