"""Hugging Face `MixtralForCausalLM` <-> mmjax `Llama` with `num_experts > 0`.

Mixtral is Mistral's attention (GQA, RoPE, optional sliding window, no biases) with a sparse MoE
feed-forward in every layer: router `gate.weight [E, dim]`, softmax, top-k
(`num_experts_per_tok`), the top-k weights renormalised to sum to 1, SwiGLU experts. The attention
and embedding part reuses `mmjax.convert.llama` (same strict key handling, same rules, same
`mmjax compare` runner); this module adds the MoE keys and tensors: it passes its per-layer MoE
rules to `llama.tensor_rules` as the `mlp_rules` hook, so llama never imports this module.
`mmjax.convert.to_hf` exports an mmjax "llama" config here when it has experts
(`Converter.export_when`).

Config keys (beyond Mistral's):
  num_local_experts -> num_experts; num_experts_per_tok -> experts_per_token;
  router_aux_loss_coef -> aux_loss_weight; router_jitter_noise -> router_noise (training only:
  transformers multiplies the MoE block's input by the jitter, mmjax the router's input, Switch's
  form); mmjax also sets moe_dispatch="dropless" (Hugging Face drops no token),
  router_renormalize=True and router_z_loss_weight=0.0 (Mixtral has no z-loss).
  output_router_logits: accepted as bookkeeping (it only adds outputs; transformers then also
  adds the auxiliary loss to a labelled forward's loss, while mmjax always adds it in training);
  export writes false.
Any other key raises `UnsupportedModelError` naming it.

Tensors: `save_pretrained` (transformers 5) writes the original per-expert layout,
`model.layers.{i}.block_sparse_moe.gate.weight [E, dim]` and
`...block_sparse_moe.experts.{j}.w1/w3.weight [mlp, dim]` (gate / up), `.w2.weight [dim, mlp]`
(down); transformers 5 holds them fused in memory (`mlp.experts.gate_up_proj [E, 2*mlp, dim]`,
gate rows first, `mlp.experts.down_proj [E, dim, mlp]`, `mlp.gate.weight`), which is read too.
mmjax stacks the experts: `moe/router [dim, E]`, `moe/gate`, `moe/up [E, dim, mlp]`,
`moe/down [E, mlp, dim]`. Export writes the per-expert layout, so a round trip gives back the
same tensors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from mmjax.convert import llama
from mmjax.convert.core import Converter, TensorRule, build_config, check_model_type
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.llama import LlamaConfig

ARCHITECTURE = "MixtralForCausalLM"
# MixtralConfig keys beyond the Mistral ones it shares -> LlamaConfig field
_MOE_KEYS = {
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "experts_per_token",
    "router_aux_loss_coef": "aux_loss_weight",
    "router_jitter_noise": "router_noise",
}
_BOOKKEEPING = {"output_router_logits"}
_KEYS = llama.MODEL_TYPE_KEYS["mistral"]  # MistralConfig's keys (no biases, sliding window)
# MixtralConfig class defaults, as LlamaConfig fields
_DEFAULTS = dict(vocab_size=32000, dim=4096, mlp_dim=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, max_len=4096 * 32, norm_eps=1e-5, tie_embeddings=False,
                 initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                 sliding_window=None, rope_theta=1e6)
_MOE_DEFAULTS = dict(num_experts=8, experts_per_token=2, aux_loss_weight=0.001, router_noise=0.0)


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """`LlamaConfig` (with experts) for a parsed Mixtral `config.json`; strict about keys."""
    check_model_type(hf, "mixtral", "Mixtral")
    kw = llama.config_kwargs(hf, "mixtral", _KEYS, _DEFAULTS, set(_MOE_KEYS) | _BOOKKEEPING)
    for hf_key, field in _MOE_KEYS.items():
        value = hf.get(hf_key, _MOE_DEFAULTS[field])
        integer = field in ("num_experts", "experts_per_token")
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
        if not ok or isinstance(value, bool) or value < (1 if integer else 0):
            raise UnsupportedModelError(
                f"mixtral config.json: {hf_key} must be a {'positive int' if integer else 'number >= 0'}, "
                f"got {value!r}")
        kw[field] = value
    kw.update(moe_dispatch="dropless", router_renormalize=True, router_z_loss_weight=0.0)
    if not isinstance(hf.get("output_router_logits", False), bool):
        raise UnsupportedModelError(
            f"output_router_logits must be true or false, got {hf['output_router_logits']!r}")
    return build_config(LlamaConfig, kw, "mixtral config.json")


def config_to_hf(config: LlamaConfig, model_type: str | None = None) -> dict[str, Any]:
    """The Mixtral `config.json` dict of an MoE `config`."""
    if model_type not in (None, "mixtral"):
        raise UnsupportedModelError(
            f"an MoE model (num_experts={config.num_experts}) exports only as model_type "
            f"'mixtral', not {model_type!r}")
    if not config.num_experts:
        raise UnsupportedModelError("model_type 'mixtral' needs num_experts > 0")
    if config.moe_dispatch != "dropless":
        raise UnsupportedModelError(
            f"moe_dispatch={config.moe_dispatch!r} drops tokens; MixtralForCausalLM is dropless, "
            "so the exported model would compute something else (set moe_dispatch='dropless')")
    if not config.router_renormalize:
        raise UnsupportedModelError("router_renormalize=False has no Mixtral equivalent (it "
                                    "renormalises the top-k weights)")
    dense = dataclasses.replace(config, num_experts=0)
    hf = llama.config_to_hf(dense, "mistral")  # attention part: no biases, window allowed
    hf.update(
        architectures=[ARCHITECTURE], model_type="mixtral",
        num_local_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
        router_aux_loss_coef=config.aux_loss_weight, router_jitter_noise=config.router_noise,
        output_router_logits=False,
        head_dim=config.head_dim,  # MixtralConfig writes null for hidden_size // heads
    )
    return hf


def moe_tensor_rules(c: LlamaConfig, layer: int) -> list[TensorRule]:
    """The MoE tensors of decoder layer `layer` (per-expert HF layout)."""
    d, m, e = c.dim, c.mlp_dim, c.num_experts
    hf, mj = f"model.layers.{layer}.block_sparse_moe.", (f"layers_{layer}", "moe")
    rules = [TensorRule(hf + "gate.weight", mj + ("router",), (e, d), "linear")]
    for j in range(e):
        for w, name, shape in (("w1", "gate", (m, d)), ("w2", "down", (d, m)), ("w3", "up", (m, d))):
            rules.append(TensorRule(f"{hf}experts.{j}.{w}.weight", mj + (name,), shape, "linear",
                                    expert=j))
    return rules


_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|"
                    r"experts\.down_proj)$")


def unfuse(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Tensors in the per-expert layout: transformers 5's fused in-memory names
    (`mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) are split."""
    out: dict[str, np.ndarray] = {}
    m = config.mlp_dim
    for name, w in tensors.items():
        match = _FUSED.match(name)
        if match is None:
            out[name] = w
            continue
        prefix = f"model.layers.{match.group(1)}.block_sparse_moe."
        kind = match.group(2)
        if kind == "gate.weight":
            out[prefix + "gate.weight"] = w
        elif kind == "experts.gate_up_proj":
            if w.ndim != 3 or w.shape[1] != 2 * m:
                raise InputError(f"tensor {name}: shape {tuple(w.shape)}, expected "
                                       f"[experts, {2 * m}, dim]")
            for j in range(w.shape[0]):
                out[f"{prefix}experts.{j}.w1.weight"] = w[j, :m]
                out[f"{prefix}experts.{j}.w3.weight"] = w[j, m:]
        else:
            for j in range(w.shape[0]):
                out[f"{prefix}experts.{j}.w2.weight"] = w[j]
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    return llama.params_from_hf(unfuse(tensors, config), config, mlp_rules=moe_tensor_rules)


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    return llama.params_to_hf(params, config, mlp_rules=moe_tensor_rules)


CONVERTER = Converter(
    family="llama",
    model_types=("mixtral",),
    architectures=(ARCHITECTURE,),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    compare=llama.compare_causal_lm,
    export_when=lambda config: bool(config.num_experts),  # an MoE "llama" exports as Mixtral
)
