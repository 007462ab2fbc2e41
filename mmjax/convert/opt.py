"""Hugging Face `OPTForCausalLM` (and `OPTModel`, read only) <-> mmjax `OPT`.

Config: every key of `config.json` maps to an `OPTConfig` field (`_DIRECT_KEYS`, plus
`do_layer_norm_before` -> `norm_position`, `activation_function` -> `activation`,
`word_embed_proj_dim` -> `embed_dim`), or is on the list of keys that do not change the
function computed at inference; anything else raises `UnsupportedModelError` naming the key.

Decisions on keys accepted without a field:
  * `attention_dropout`, `activation_dropout`, `layerdrop` (any number >= 0): they act only in
    training; the converted model computes the HF model in `eval()` mode. Export writes 0.0.
    (`dropout` is a field: OPT's residual dropout is exactly the shared block's.)
  * `prefix` (old fairseq-converted configs: "</s>"): a tokenizer hint, not read by the model.
  * `use_cache`, `dtype`/`torch_dtype`, `transformers_version`, `architectures`, ...: bookkeeping.

Architectures: `OPTForCausalLM` both ways. `OPTModel` (no LM head; tensors named `decoder.*`
instead of `model.decoder.*`) is read when its embeddings are tied (the default: the head *is*
the embedding table), and exports back as `OPTForCausalLM`; an untied `OPTModel` stores no head
and is refused.

Weights (`tensor_rules`): `embed_positions.weight [max_len + 2, dim]` is kept whole (OPT's two
offset rows included) so the round trip is exact; q/k/v/out projections reshape to heads
(`in_proj` / `in_bias` / `out_proj`); fc1/fc2, project_in/project_out and lm_head are `linear`;
the per-layer `self_attn_layer_norm` / `final_layer_norm` are the block's `attn_norm` /
`mlp_norm`, the decoder's `final_layer_norm` (pre-LN only) is `final_norm`.

`mmjax compare` (`compare_causal_lm`): logits and every hidden state on random tokens with one
left-padded row, positions left to each side's default (transformers derives them from the
attention mask, as mmjax does).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import reference
from mmjax.convert.core import (Converter, TensorRule, activation_from_hf, activation_to_hf,
                                apply_rules_from_hf, apply_rules_to_hf, build_config, check_bool,
                                check_config_keys, check_dropout, check_model_type,
                                check_architecture, int_or_none, stamp_version)
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.opt import POSITION_OFFSET, OPTConfig

ARCHITECTURES = ("OPTForCausalLM", "OPTModel")

# config.json keys mapped one to one: HF key -> OPTConfig field
_DIRECT_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "ffn_dim": "mlp_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_len",
    "init_std": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "dropout": "dropout",
}
_BOOL_KEYS = {  # HF key -> (OPTConfig field, HF default)
    "enable_bias": ("bias", True),
    "layer_norm_elementwise_affine": ("norm_affine", True),
    "tie_word_embeddings": ("tie_embeddings", True),
    "_remove_final_layer_norm": ("remove_final_norm", False),
}
_SPECIAL_KEYS = {"do_layer_norm_before", "word_embed_proj_dim", "activation_function",
                 "attention_dropout", "activation_dropout", "layerdrop", "prefix"}
_KNOWN_KEYS = set(_DIRECT_KEYS) | set(_BOOL_KEYS) | _SPECIAL_KEYS
# transformers' OPTConfig class defaults, for absent keys
_HF_DEFAULTS = dict(vocab_size=50272, dim=768, mlp_dim=3072, num_layers=12, num_heads=12,
                    max_len=2048, initializer_range=0.02, bos_token_id=2, eos_token_id=2,
                    pad_token_id=1, dropout=0.1)


# --- config ---------------------------------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any]) -> OPTConfig:
    """`OPTConfig` for a parsed OPT `config.json` (strict, see the module docstring)."""
    check_model_type(hf, "opt", "OPT")
    check_config_keys(hf, _KNOWN_KEYS, "opt config.json")
    arch = check_architecture(hf, ARCHITECTURES)
    kw: dict[str, Any] = dict(_HF_DEFAULTS)
    for hf_key, field in _DIRECT_KEYS.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    for key in ("bos_token_id", "pad_token_id"):
        kw[key] = int_or_none(kw[key], key)
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])
    for hf_key, (field, default) in _BOOL_KEYS.items():
        kw[field] = check_bool(hf, hf_key, default)
    kw["norm_position"] = "pre" if check_bool(hf, "do_layer_norm_before", True) else "post"
    embed = hf.get("word_embed_proj_dim")
    if embed is not None and (isinstance(embed, bool) or not isinstance(embed, int)):
        raise UnsupportedModelError(f"word_embed_proj_dim must be an int or null, got {embed!r}")
    kw["embed_dim"] = None if embed is None or embed == kw["dim"] else embed
    kw["activation"] = activation_from_hf(hf.get("activation_function", "relu"),
                                          "activation_function")
    check_dropout(hf, "dropout", "attention_dropout", "activation_dropout", "layerdrop")
    if kw["dropout"] is None:
        kw["dropout"] = 0.0
    if arch == "OPTModel" and not kw["tie_embeddings"]:
        raise UnsupportedModelError(
            "OPTModel with tie_word_embeddings=false stores no LM head, and mmjax's OPT always "
            "has one: convert the OPTForCausalLM checkpoint instead")
    return build_config(OPTConfig, kw, "opt config.json")


def config_to_hf(config: OPTConfig, model_type: str | None = None) -> dict[str, Any]:
    """The `OPTForCausalLM` `config.json` dict (transformers 5 layout) of `config`."""
    if model_type not in (None, "opt"):
        raise UnsupportedModelError(f"cannot export an OPT config as model_type {model_type!r}; "
                                    "supported: opt")
    if config.norm_eps != 1e-5:
        raise UnsupportedModelError(f"norm_eps={config.norm_eps}, but HF OPT's LayerNorms use "
                                    "torch's default 1e-5; set norm_eps=1e-5")
    eos = config.eos_token_id
    hf: dict[str, Any] = {
        "_remove_final_layer_norm": config.remove_final_norm,
        "activation_function": activation_to_hf(config.activation),
        "architectures": ["OPTForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "do_layer_norm_before": config.norm_position == "pre",
        "dropout": config.dropout,
        "dtype": "float32",
        "enable_bias": config.bias,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "ffn_dim": config.mlp_dim,
        "hidden_size": config.dim,
        "init_std": config.initializer_range,
        "layer_norm_elementwise_affine": config.norm_affine,
        "layerdrop": 0.0,
        "max_position_embeddings": config.max_len,
        "model_type": "opt",
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "vocab_size": config.vocab_size,
        "word_embed_proj_dim": config.embed_width,
    }
    return stamp_version(hf)


# --- weights --------------------------------------------------------------------------------

def tensor_rules(c: OPTConfig) -> list[TensorRule]:
    """Every tensor of an `OPTForCausalLM` checkpoint of `c`."""
    d, e, m, h = c.dim, c.embed_width, c.mlp_dim, c.num_heads
    p = "model.decoder."
    rules = [
        TensorRule(p + "embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, e), "copy"),
        TensorRule(p + "embed_positions.weight", ("embed_positions", "embedding"),
                   (c.max_len + POSITION_OFFSET, d), "copy"),
    ]
    if c.projects:
        rules.append(TensorRule(p + "project_in.weight", ("project_in", "kernel"), (d, e),
                                "linear"))
        rules.append(TensorRule(p + "project_out.weight", ("project_out", "kernel"), (e, d),
                                "linear"))

    def norm(hf_name, path):
        if not c.norm_affine:
            return []
        return [TensorRule(hf_name + ".weight", path + ("scale",), (d,), "copy"),
                TensorRule(hf_name + ".bias", path + ("bias",), (d,), "copy")]

    for i in range(c.num_layers):
        hf, mj = f"{p}layers.{i}.", f"layers_{i}"
        attn = (mj, "attn")
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules.append(TensorRule(f"{hf}self_attn.{proj}.weight", attn + (name, "kernel"), (d, d),
                                    "in_proj", h))
            if c.bias:
                rules.append(TensorRule(f"{hf}self_attn.{proj}.bias", attn + (name, "bias"), (d,),
                                        "in_bias", h))
        rules.append(TensorRule(hf + "self_attn.out_proj.weight", attn + ("out", "kernel"), (d, d),
                                "out_proj", h))
        if c.bias:
            rules.append(TensorRule(hf + "self_attn.out_proj.bias", attn + ("out", "bias"), (d,),
                                    "copy"))
        rules += norm(hf + "self_attn_layer_norm", (mj, "attn_norm"))
        for fc, shape in (("fc1", (m, d)), ("fc2", (d, m))):
            rules.append(TensorRule(f"{hf}{fc}.weight", (mj, "mlp", fc, "kernel"), shape, "linear"))
            if c.bias:
                rules.append(TensorRule(f"{hf}{fc}.bias", (mj, "mlp", fc, "bias"), shape[:1],
                                        "copy"))
        rules += norm(hf + "final_layer_norm", (mj, "mlp_norm"))
    if c.final_norm:
        rules += norm(p + "final_layer_norm", ("final_norm",))
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, e),
                                "linear"))
    return rules


def _causal_lm_names(tensors: Mapping[str, np.ndarray], config: OPTConfig) -> dict[str, np.ndarray]:
    """`tensors` named as `OPTForCausalLM` stores them: an `OPTModel` checkpoint's `decoder.*`
    gain the `model.` prefix; a tied checkpoint's stored head is dropped if it is the embedding."""
    out = dict(tensors)
    if out and not any(k.startswith("model.") for k in out) and all(
            k.startswith("decoder.") for k in out):
        out = {"model." + k: v for k, v in out.items()}
    if config.tie_embeddings and "lm_head.weight" in out:
        head, embed = out["lm_head.weight"], out.get("model.decoder.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            raise InputError("tie_word_embeddings is true but lm_head.weight differs from "
                             "model.decoder.embed_tokens.weight")
        del out["lm_head.weight"]
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], config: OPTConfig) -> dict[str, Any]:
    """mmjax params (nested dict of float32 numpy arrays) from HF OPT tensors of `config`."""
    return apply_rules_from_hf(_causal_lm_names(tensors, config), tensor_rules(config))


def params_to_hf(params: Mapping[str, Any], config: OPTConfig) -> dict[str, np.ndarray]:
    """`OPTForCausalLM` tensors {name: float32 array} from plain mmjax params of `config`."""
    return apply_rules_to_hf(params, tensor_rules(config))


# --- mmjax compare --------------------------------------------------------------------------

def compare_causal_lm(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """Logits and every hidden state of an OPT LM on random tokens, one row left-padded."""
    import jax.numpy as jnp

    if seq_len > config.max_len:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_len}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones((batch, seq_len), bool)
    num_pad = min(max(1, seq_len // 4), seq_len - 1)
    if num_pad > 0:
        mask[-1, :num_pad] = False  # left padding on the last row, as batched generation does
        tokens[-1, :num_pad] = config.pad_token_id if config.pad_token_id is not None else 0

    hf_model = reference.load_reference(transformers, torch, transformers.OPTForCausalLM, hf_dir)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       output_hidden_states=True)
    ref_logits = ref.logits.numpy()
    logits, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32),
                                        input_mask=jnp.asarray(mask))
    # HF's last hidden state is after the final norm and project_out: mmjax's final_hidden
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]
    layer_diffs = reference.layer_diffs(ours, ref.hidden_states, mask)
    diffs = {
        "embeddings": layer_diffs[0],
        "hidden_states": max(layer_diffs),
        "logits": reference.max_abs(logits, ref_logits, mask),
    }
    extra = {
        "hidden_state_diffs": layer_diffs,
        "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed,
                   "left_padding_last_row": num_pad},
        "reference_logits_max_abs": float(np.abs(ref_logits[mask]).max()),
    }
    return diffs, extra


CONVERTER = Converter(
    family="opt",
    model_types=("opt",),
    architectures=ARCHITECTURES,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    compare=compare_causal_lm,
)
