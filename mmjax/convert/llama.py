"""Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` <-> mmjax `Llama`
(`MixtralForCausalLM`, the sparse-MoE member, is in `mmjax.convert.mixtral` and reuses this).

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
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Mapping

import numpy as np

from mmjax.configs import closest_name
from mmjax.convert.trees import flatten, set_path, short_list
from mmjax.errors import ConfigError, InputError, UnsupportedModelError
from mmjax.models.llama import LlamaConfig
from mmjax.ops.rope import ROPE_TYPES, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# HF hidden_act -> mmjax activation name (mmjax.nn.mlp.ACTIVATIONS)
ACTIVATIONS_FROM_HF = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "relu": "relu", "quick_gelu": "quick_gelu",
}
ACTIVATIONS_TO_HF = {
    "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
    "quick_gelu": "quick_gelu",
}

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
# keys that do not change the function computed (see the module docstring)
HARMLESS_KEYS = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset",
}
# keys each model type's HF config class defines (others are unknown to that model)
_MODEL_TYPE_KEYS = {
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
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPE_KEYS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not handled by the LLaMA converter; "
            f"supported: {', '.join(_MODEL_TYPE_KEYS)}"
        )
    kw = config_kwargs(hf, model_type, _MODEL_TYPE_KEYS[model_type], _HF_DEFAULTS[model_type])
    try:
        return LlamaConfig(**kw)
    except (ConfigError, TypeError, ValueError) as e:
        raise UnsupportedModelError(f"{model_type} config.json: {e}") from None


def config_kwargs(hf: Mapping[str, Any], model_type: str, keys: set[str],
                  defaults: Mapping[str, Any], extra_keys: set[str] = frozenset()
                  ) -> dict[str, Any]:
    """`LlamaConfig` keyword arguments of the attention/MLP part of a config.json of
    `model_type`, whose class defines `keys` (+ `extra_keys`, handled by the caller) with
    `defaults` (as LlamaConfig fields) for absent ones; unknown keys raise."""
    known = keys | extra_keys | HARMLESS_KEYS
    unknown = [k for k in hf if k not in known]
    if unknown:
        hints = "; ".join(f"{k!r}{closest_name(k, known)}" for k in unknown)
        raise UnsupportedModelError(
            f"{model_type} config.json: unsupported key(s) {hints} (mmjax maps every key it "
            "accepts; an unknown one could change the model)"
        )

    kw: dict[str, Any] = dict(defaults)
    kw.pop("rope_theta", None)
    for hf_key, field in _DIRECT_KEYS.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])

    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS_FROM_HF:
        raise UnsupportedModelError(
            f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS_FROM_HF)}"
        )
    kw["activation"] = ACTIVATIONS_FROM_HF[act]
    for key in ("attention_bias", "mlp_bias"):
        value = hf.get(key, False)
        if not isinstance(value, bool):
            raise UnsupportedModelError(f"{key} must be true or false, got {value!r}")
        kw[key] = value
    if "sliding_window" in keys:
        window = hf.get("sliding_window", defaults.get("sliding_window"))
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise UnsupportedModelError(f"sliding_window must be a positive int or null, got {window!r}")
        kw["sliding_window"] = window
    dropout = hf.get("attention_dropout", 0.0)
    if dropout is not None and (not isinstance(dropout, (int, float)) or dropout < 0):
        raise UnsupportedModelError(f"attention_dropout must be a number >= 0, got {dropout!r}")
    tp = hf.get("pretraining_tp", 1)
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise UnsupportedModelError(f"pretraining_tp must be a positive int, got {tp!r}")
    kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(hf, kw["max_len"],
                                                         defaults.get("rope_theta", 10000.0))
    return kw


def _rope_from_hf(hf: Mapping[str, Any], max_len: int, default_theta: float = 10000.0
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
    if model_type == "mixtral" or config.num_experts:
        from mmjax.convert import mixtral

        return mixtral.config_to_hf(config, model_type)
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
    if config.activation not in ACTIVATIONS_TO_HF:
        raise UnsupportedModelError(f"activation {config.activation!r} has no HF hidden_act")
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
        "hidden_act": ACTIVATIONS_TO_HF[config.activation],
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
    try:
        hf["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return hf


# --- weights --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one mmjax param, with the layout change between them.

    kind: "copy" (same layout), "linear" (HF [out, in] -> [in, out]), "in_proj"
    ([heads*hd, dim] -> [dim, heads, hd]), "in_bias" ([heads*hd] -> [heads, hd]),
    "out_proj" ([dim, heads*hd] -> [heads, hd, dim]).
    expert: >= 0 when the HF tensor is one expert's slice `[expert]` of a stacked mmjax param
    (MoE); `mmjax_shape` is then the slice's shape.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    kind: str
    heads: int = 0
    expert: int = -1

    @property
    def mmjax_shape(self) -> tuple[int, ...]:
        s = self.hf_shape
        if self.kind == "copy":
            return s
        if self.kind == "linear":
            return s[::-1]
        if self.kind == "in_proj":
            return (s[1], self.heads, s[0] // self.heads)
        if self.kind == "in_bias":
            return (self.heads, s[0] // self.heads)
        if self.kind == "out_proj":
            return (self.heads, s[1] // self.heads, s[0])
        raise AssertionError(self.kind)

    def to_mmjax(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return w
        if self.kind == "linear":
            return w.T
        if self.kind == "in_proj":
            return w.T.reshape(self.mmjax_shape)
        if self.kind == "in_bias":
            return w.reshape(self.mmjax_shape)
        if self.kind == "out_proj":
            return w.T.reshape(self.mmjax_shape)
        raise AssertionError(self.kind)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return w
        if self.kind == "linear":
            return w.T
        if self.kind == "in_proj":
            return w.reshape(w.shape[0], -1).T
        if self.kind == "in_bias":
            return w.reshape(-1)
        if self.kind == "out_proj":
            return w.reshape(-1, w.shape[-1]).T
        raise AssertionError(self.kind)


def tensor_rules(c: LlamaConfig) -> list[TensorRule]:
    """Every tensor of an HF checkpoint of `c`, in checkpoint order."""
    d, hd, h, kv, m = c.dim, c.head_size, c.num_heads, c.kv_heads, c.mlp_dim
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
        if c.num_experts:
            from mmjax.convert.mixtral import moe_tensor_rules

            rules.extend(moe_tensor_rules(c, i))
            continue
        for proj, name, shape in (("gate_proj", "gate", (m, d)), ("up_proj", "up", (m, d)),
                                  ("down_proj", "down", (d, m))):
            rules.append(TensorRule(f"{hf}mlp.{proj}.weight", (mj, "mlp", name, "kernel"), shape, "linear"))
            if c.mlp_bias:
                rules.append(TensorRule(f"{hf}mlp.{proj}.bias", (mj, "mlp", name, "bias"), shape[:1], "copy"))
    rules.append(TensorRule("model.norm.weight", ("final_norm", "scale"), (d,), "copy"))
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, d), "linear"))
    return rules


def _is_derived_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    """mmjax params (nested dict of float32 numpy arrays) from HF tensors of `config`.

    InputError names missing tensors, unexpected tensors, and shape mismatches.
    """
    rules = tensor_rules(config)
    expected = {r.hf_name for r in rules}
    extra = sorted(k for k in tensors if k not in expected and not _is_derived_buffer(k))
    if config.tie_embeddings and "lm_head.weight" in extra:
        # tied checkpoints may still store the head; accept it only if it is the embedding
        head, embed = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
        if embed is not None and head.shape == embed.shape and np.array_equal(head, embed):
            extra.remove("lm_head.weight")
        else:
            raise InputError("tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
    missing = [r.hf_name for r in rules if r.hf_name not in tensors]
    if missing:
        raise InputError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {short_list(missing)}")
    if extra:
        raise InputError(f"checkpoint has {len(extra)} unexpected tensor(s): {short_list(extra)}")
    params: dict[str, Any] = {}
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for r in rules:
        w = tensors[r.hf_name]
        if tuple(w.shape) != r.hf_shape:
            raise InputError(f"tensor {r.hf_name}: shape {tuple(w.shape)} in the checkpoint, but the "
                             f"config needs {r.hf_shape}")
        value = np.ascontiguousarray(r.to_mmjax(np.asarray(w, np.float32)))
        if r.expert >= 0:
            stacks.setdefault(r.path, {})[r.expert] = value
        else:
            set_path(params, r.path, value)
    for path, slices in stacks.items():  # MoE: one [experts, ...] param from per-expert tensors
        set_path(params, path, np.stack([slices[j] for j in range(len(slices))]))
    return params


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """HF tensors {name: float32 array} from mmjax params of `config` (plain, not boxed)."""
    rules = tensor_rules(config)
    leaves = dict(flatten(params))
    expected = {r.path for r in rules}
    missing = ["/".join(r.path) for r in rules if r.path not in leaves]
    extra = sorted("/".join(p) for p in leaves if p not in expected)
    if missing:
        raise InputError(f"params lack {len(missing)} entr(ies) the config needs: {short_list(missing)}")
    if extra:
        raise InputError(f"params have {len(extra)} unexpected entr(ies): {short_list(extra)}")
    out = {}
    for r in rules:
        w = np.asarray(leaves[r.path], np.float32)
        want = r.mmjax_shape if r.expert < 0 else (config.num_experts,) + r.mmjax_shape
        if tuple(w.shape) != want:
            raise InputError(f"param {'/'.join(r.path)}: shape {tuple(w.shape)}, but the config needs "
                             f"{want}")
        out[r.hf_name] = np.ascontiguousarray(r.to_hf(w if r.expert < 0 else w[r.expert]))
    return out


def _make_converter():
    from mmjax.convert.registry import Converter

    return Converter(
        family="llama",
        model_types=("llama", "mistral"),
        architectures=tuple(ARCHITECTURES.values()),
        task="causal_lm",
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=params_from_hf,
        params_to_hf=params_to_hf,
    )


CONVERTER = _make_converter()
