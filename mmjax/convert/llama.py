"""Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` <-> mmjax `Llama`
(`MixtralForCausalLM`, the sparse-MoE member, is in `mmjax.convert.mixtral`, which composes this
module's config handling and rules with its MoE ones; this module never imports it).

Config: every key of `config.json` is either mapped to a `LlamaConfig` field or on an explicit
list of keys that do not change the function the model computes; anything else (an unknown
key, `quantization_config`, a RoPE type mmjax lacks, ...) raises `UnsupportedModelError`
naming the key, so a checkpoint is never converted into a silently different model.

Decisions on keys that are accepted although mmjax has no field for them:
  * `attention_dropout` (any value >= 0): dropout acts only in training; the converted model
    computes what the HF model computes in `eval()` mode. mmjax does not train with
    attention dropout; export writes 0.0.
  * `pretraining_tp` (any positive int): transformers >= 5 ignores it; older versions split
    the same matmuls into slices, which is the same function up to rounding.
  * `use_cache`, `output_*`, `return_dict`, `dtype`/`torch_dtype`, `transformers_version`,
    `architectures`, `model_type`, `_name_or_path`: bookkeeping.

Weights: HF stores linear layers as `[out, in]`; mmjax keeps heads as their own dimension, so
`q_proj.weight [heads*head_dim, dim]` becomes `query/kernel [dim, heads, head_dim]` by a
transpose and a reshape. Both use the "rotate half" RoPE layout, so q/k need no permutation.
`rotary_emb.inv_freq` buffers found in some older checkpoints are derived data and skipped.
The rules go through the strict engine of `mmjax.convert.core`.

`mmjax compare` (`compare_causal_lm`): logits and every hidden state on random tokens, one row
left-padded as batched generation does.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_bool,
                                check_config_keys, check_dropout, check_model_type, stamp_version)
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.llama import LlamaConfig
from mmjax.ops.rope import ROPE_TYPES, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# config.json keys mapped one to one: HF key -> LlamaConfig field
_DIRECT_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "mlp_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_len",
    "initializer_range": "initializer_range",
    "rms_norm_eps": "norm_eps",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "tie_word_embeddings": "tie_embeddings",
}
# keys with their own handling below
_SPECIAL_KEYS = {"hidden_act", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
                 "mlp_bias", "sliding_window", "attention_dropout", "pretraining_tp"}
# keys each model type's HF config class defines (others are unknown to that model; the
# bookkeeping keys of every config, `mmjax.convert.core.HARMLESS_KEYS`, are accepted too)
MODEL_TYPE_KEYS = {
    "llama": set(_DIRECT_KEYS) | _SPECIAL_KEYS - {"sliding_window"},
    "mistral": set(_DIRECT_KEYS) | _SPECIAL_KEYS - {"attention_bias", "mlp_bias", "pretraining_tp"},
}
# values HF uses when a key is absent (LlamaConfig / MistralConfig class defaults that differ
# from mmjax's LlamaConfig defaults)
_HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, dim=4096, mlp_dim=11008, num_layers=32, num_heads=32,
                  max_len=2048, norm_eps=1e-6, tie_embeddings=False, initializer_range=0.02,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "mistral": dict(vocab_size=32000, dim=4096, mlp_dim=14336, num_layers=32, num_heads=32,
                    num_kv_heads=8, max_len=4096 * 32, norm_eps=1e-6, tie_embeddings=False,
                    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                    sliding_window=4096),
}
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}


# --- config ---------------------------------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """`LlamaConfig` for a parsed LLaMA / Mistral `config.json` (strict, see module docstring)."""
    check_model_type(hf, tuple(MODEL_TYPE_KEYS), "LLaMA")
    model_type = hf["model_type"]
    kw = config_kwargs(hf, model_type, MODEL_TYPE_KEYS[model_type], _HF_DEFAULTS[model_type])
    return build_config(LlamaConfig, kw, f"{model_type} config.json")


def config_kwargs(hf: Mapping[str, Any], model_type: str, keys: set[str],
                  defaults: Mapping[str, Any], extra_keys: set[str] = frozenset()
                  ) -> dict[str, Any]:
    """`LlamaConfig` keyword arguments of the attention/MLP part of a config.json of
    `model_type`, whose class defines `keys` (+ `extra_keys`, handled by the caller) with
    `defaults` (as LlamaConfig fields) for absent ones; unknown keys raise."""
    check_config_keys(hf, keys | extra_keys, f"{model_type} config.json")

    kw: dict[str, Any] = dict(defaults)
    kw.pop("rope_theta", None)
    for hf_key, field in _DIRECT_KEYS.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])

    kw["activation"] = activation_from_hf(hf.get("hidden_act", "silu"))
    for key in ("attention_bias", "mlp_bias"):
        kw[key] = check_bool(hf, key)
    if "sliding_window" in keys:
        window = hf.get("sliding_window", defaults.get("sliding_window"))
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise UnsupportedModelError(f"sliding_window must be a positive int or null, got {window!r}")
        kw["sliding_window"] = window
    check_dropout(hf, "attention_dropout")
    tp = hf.get("pretraining_tp", 1)
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise UnsupportedModelError(f"pretraining_tp must be a positive int, got {tp!r}")
    kw["rope_theta"], kw["rope_scaling"] = rope_from_hf(hf, kw["max_len"],
                                                         defaults.get("rope_theta", 10000.0))
    return kw


def rope_from_hf(hf: Mapping[str, Any], max_len: int, default_theta: float = 10000.0
                  ) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None) from `rope_parameters` (transformers >= 5) or the older
    `rope_theta` + `rope_scaling` pair."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    source = "rope_scaling" if legacy else "rope_parameters"
    rope = legacy or params or {}  # transformers gives rope_scaling priority too
    if not isinstance(rope, Mapping):
        raise UnsupportedModelError(f"{source} must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}.rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    extra = [k for k in rope if k not in _ROPE_KEYS[rope_type]]
    if rope.get("partial_rotary_factor", 1.0) == 1.0 and "partial_rotary_factor" in extra:
        extra.remove("partial_rotary_factor")
    if extra:
        raise UnsupportedModelError(
            f"{source}: key(s) {', '.join(map(repr, extra))} not supported with rope_type {rope_type!r}"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", default_theta))
    if theta is None:
        theta = hf.get("rope_theta", default_theta)
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise UnsupportedModelError(f"rope_theta must be a positive number, got {theta!r}")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor")
               if k in _ROPE_KEYS[rope_type] and k not in rope]
    if missing:
        raise UnsupportedModelError(f"{source} ({rope_type}) lacks {', '.join(missing)}")
    fields: dict[str, Any] = {"rope_type": rope_type, "factor": float(rope["factor"])}
    if rope_type == "llama3":
        fields["low_freq_factor"] = float(rope["low_freq_factor"])
        fields["high_freq_factor"] = float(rope["high_freq_factor"])
        fields["original_max_position_embeddings"] = int(
            rope.get("original_max_position_embeddings") or max_len)
    try:
        return float(theta), RopeScaling(**fields)
    except ValueError as e:
        raise UnsupportedModelError(f"{source}: {e}") from None


def default_model_type(config: LlamaConfig) -> str:
    """"mixtral" for an MoE model, "mistral" for a sliding-window model without biases, else
    "llama"."""
    if config.num_experts:
        return "mixtral"
    if config.sliding_window is not None and not (config.attention_bias or config.mlp_bias):
        return "mistral"
    return "llama"


def config_to_hf(config: LlamaConfig, model_type: str | None = None) -> dict[str, Any]:
    """The `config.json` dict (transformers 5 layout) of `config` as an HF `model_type`."""
    model_type = model_type or default_model_type(config)
    if config.num_experts:
        raise UnsupportedModelError(
            f"an MoE model (num_experts={config.num_experts}) exports only as model_type 'mixtral'"
            + ("" if model_type == "mixtral" else f", not {model_type!r}")
            + " (by mmjax.convert.mixtral, which mmjax.convert.to_hf picks for it)")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"cannot export LLaMA-family config as model_type {model_type!r}; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    if model_type == "llama" and config.sliding_window is not None:
        raise UnsupportedModelError("sliding_window is set but HF LlamaForCausalLM has no sliding "
                                    "window; export as model_type 'mistral'")
    if model_type == "mistral" and (config.attention_bias or config.mlp_bias):
        raise UnsupportedModelError("attention_bias/mlp_bias are set but HF MistralForCausalLM has no biases")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type != "default":
        rope["rope_type"] = scaling.rope_type
        rope["factor"] = float(scaling.factor)
        if scaling.rope_type == "llama3":
            rope["low_freq_factor"] = float(scaling.low_freq_factor)
            rope["high_freq_factor"] = float(scaling.high_freq_factor)
            rope["original_max_position_embeddings"] = int(scaling.original_max_position_embeddings)
    eos = config.eos_token_id
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": activation_to_hf(config.activation),
        "max_position_embeddings": config.max_len,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.norm_eps,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "dtype": "float32",
    }
    if model_type == "llama":
        hf.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    else:
        hf["sliding_window"] = config.sliding_window
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

# mlp_rules(config, layer) -> the rules of decoder layer `layer`'s feed-forward block
MlpRules = Callable[[LlamaConfig, int], list[TensorRule]]


def dense_mlp_rules(c: LlamaConfig, layer: int) -> list[TensorRule]:
    """The SwiGLU feed-forward tensors of decoder layer `layer` (`mlp.{gate,up,down}_proj`)."""
    if c.num_experts:
        raise UnsupportedModelError(
            f"num_experts={c.num_experts}: an MoE model's layers convert with mmjax.convert.mixtral "
            "(model_type 'mixtral')")
    d, m = c.dim, c.mlp_dim
    hf, mj = f"model.layers.{layer}.mlp.", (f"layers_{layer}", "mlp")
    rules = []
    for proj, name, shape in (("gate_proj", "gate", (m, d)), ("up_proj", "up", (m, d)),
                              ("down_proj", "down", (d, m))):
        rules.append(TensorRule(f"{hf}{proj}.weight", mj + (name, "kernel"), shape, "linear"))
        if c.mlp_bias:
            rules.append(TensorRule(f"{hf}{proj}.bias", mj + (name, "bias"), shape[:1], "copy"))
    return rules


def tensor_rules(c: LlamaConfig, mlp_rules: MlpRules = dense_mlp_rules) -> list[TensorRule]:
    """Every tensor of an HF checkpoint of `c`, in checkpoint order; `mlp_rules` gives each
    layer's feed-forward part (Mixtral passes its MoE rules)."""
    d, hd, h, kv = c.dim, c.head_size, c.num_heads, c.kv_heads
    rules = [TensorRule("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, d), "copy")]
    for i in range(c.num_layers):
        hf, mj = f"model.layers.{i}.", f"layers_{i}"
        attn = (mj, "attn")
        rules.append(TensorRule(hf + "input_layernorm.weight", (mj, "attn_norm", "scale"), (d,), "copy"))
        for proj, name, n in (("q_proj", "query", h), ("k_proj", "key", kv), ("v_proj", "value", kv)):
            rules.append(TensorRule(f"{hf}self_attn.{proj}.weight", attn + (name, "kernel"), (n * hd, d),
                                    "in_proj", n))
            if c.attention_bias:
                rules.append(TensorRule(f"{hf}self_attn.{proj}.bias", attn + (name, "bias"), (n * hd,),
                                        "in_bias", n))
        rules.append(TensorRule(hf + "self_attn.o_proj.weight", attn + ("out", "kernel"), (d, h * hd),
                                "out_proj", h))
        if c.attention_bias:
            rules.append(TensorRule(hf + "self_attn.o_proj.bias", attn + ("out", "bias"), (d,), "copy"))
        rules.append(TensorRule(hf + "post_attention_layernorm.weight", (mj, "mlp_norm", "scale"), (d,),
                                "copy"))
        rules.extend(mlp_rules(c, i))
    rules.append(TensorRule("model.norm.weight", ("final_norm", "scale"), (d,), "copy"))
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, d), "linear"))
    return rules


DERIVED_BUFFERS = ("rotary_emb.inv_freq",)


def _drop_tied_head(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> Mapping[str, np.ndarray]:
    """Tied checkpoints may still store the head: accepted (and dropped) only if it is the
    embedding."""
    if not (config.tie_embeddings and "lm_head.weight" in tensors):
        return tensors
    head, embed = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
    if embed is not None and head.shape == embed.shape and np.array_equal(head, embed):
        return {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    raise InputError("tie_word_embeddings is true but lm_head.weight differs from "
                     "model.embed_tokens.weight")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig,
                   mlp_rules: MlpRules = dense_mlp_rules) -> dict[str, Any]:
    """mmjax params (nested dict of float32 numpy arrays) from HF tensors of `config`.

    InputError names missing tensors, unexpected tensors, and shape mismatches.
    """
    return apply_rules_from_hf(_drop_tied_head(tensors, config), tensor_rules(config, mlp_rules),
                               derived=DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig,
                 mlp_rules: MlpRules = dense_mlp_rules) -> dict[str, np.ndarray]:
    """HF tensors {name: float32 array} from mmjax params of `config` (plain, not boxed)."""
    return apply_rules_to_hf(params, tensor_rules(config, mlp_rules))


# --- mmjax compare --------------------------------------------------------------------------

def compare_causal_lm(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """Logits and every hidden state of a causal LM, with one left-padded row."""
    import jax.numpy as jnp

    if seq_len > config.max_len:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {config.max_len}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones((batch, seq_len), bool)
    num_pad = min(max(1, seq_len // 4), seq_len - 1)
    if num_pad > 0:
        mask[-1, :num_pad] = False  # left padding on the last row, as batched generation does
        tokens[-1, :num_pad] = config.pad_token_id if config.pad_token_id is not None else 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # position ids count real tokens only

    hf_model = reference.load_reference(transformers, torch, transformers.AutoModelForCausalLM, hf_dir)
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions), output_hidden_states=True,
        )
    ref_logits = ref.logits.numpy()
    logits, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32),
                                        input_mask=jnp.asarray(mask))
    # HF's last hidden state is after the final norm; mmjax keeps that one as final_hidden
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]
    layer_diffs = reference.layer_diffs(ours, ref.hidden_states, mask)
    diffs = {
        "embeddings": layer_diffs[0],
        "hidden_states": max(layer_diffs),
        "logits": reference.max_abs(logits, ref_logits, mask),
    }
    extra = {
        "hidden_state_diffs": layer_diffs,
        "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "left_padding_last_row": num_pad},
        "reference_logits_max_abs": float(np.abs(ref_logits[mask]).max()),
    }
    return diffs, extra


CONVERTER = Converter(
    family="llama",
    model_types=("llama", "mistral"),
    architectures=tuple(ARCHITECTURES.values()),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    compare=compare_causal_lm,
)
