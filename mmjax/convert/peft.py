"""peft LoRA adapter directories <-> mmjax LoRA weights (`mmjax.nn.lora`).

A peft adapter directory (`PeftModel.save_pretrained`) holds `adapter_config.json` and
`adapter_model.safetensors` with, per adapted `nn.Linear` named M in the base model,

    base_model.model.M.lora_A.weight   [r, in]
    base_model.model.M.lora_B.weight   [out, r]

and the base layer computes W x + scale * B A x (scale = lora_alpha / r, or / sqrt(r) with
use_rslora). mmjax keeps the same low-rank pair beside the DenseGeneral kernel:
`lora_a` = in_shape + (r,), `lora_b` = (r,) + features.

The mapping is the base family's own tensor rules (`mmjax.convert.core.TensorRule`): the rule
of `M.weight` gives the mmjax module path and the layout of the kernel, and since
kernel = layout(B A), A goes through the input-side half of that layout and B through the
output-side half:

    rule kind   HF W [out, in] -> kernel        A [r, in] -> lora_a     B [out, r] -> lora_b
    linear      W.T        [in, out]            A.T [in, r]             B.T [r, out]
    in_proj     [dim, heads, hd] (q/k/v)        A.T [dim, r]            [r, heads, hd]
    out_proj    [heads, hd, dim] (o)            [heads, hd, r]          B.T [r, dim]

(each column is an existing layout kind applied to the [r, in] / [out, r] tensor, so the
engine's shape checks and the exact inverse for export come for free). RoPE needs nothing: the
converted q/k kernels use the HF layout already.

Strictness, as for checkpoints: every adapter_config.json key is either understood, or
bookkeeping, or must hold its neutral value; anything else (bias != "none", modules_to_save,
DoRA, rank_pattern / alpha_pattern, layers_to_transform, an init that rewrites the base such as
PiSSA / LoftQ, an unknown key, ...) raises `UnsupportedModelError` naming the key. A target the
family cannot map (an embedding, an MoE expert), an adapter whose base class is another
architecture, tensors naming modules the base lacks, and shape mismatches raise `InputError` /
`UnsupportedModelError` naming the module or tensor.

Families (`RULES`): LLaMA / Mistral (q/k/v/o, gate/up/down, lm_head) and OPT (q/k/v/out_proj,
fc1/fc2, project_in/out, lm_head).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from mmjax.convert.core import TensorRule, apply_rules_from_hf, apply_rules_to_hf
from mmjax.convert.trees import short_list
from mmjax.errors import InputError, MmjaxError, UnsupportedModelError
from mmjax.nn.lora import LORA_A, LORA_B, LoraConfig, lora_modules, lora_params, with_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MAPPABLE = ("linear", "in_proj", "out_proj")


def _llama_rules(config) -> list[TensorRule]:
    from mmjax.convert import llama

    return llama.tensor_rules(config)


def _opt_rules(config) -> list[TensorRule]:
    from mmjax.convert import opt

    return opt.tensor_rules(config)


# HF model_type -> the family's tensor rules of a config (the rule list its converter applies)
RULES: dict[str, Callable[[Any], list[TensorRule]]] = {"llama": _llama_rules, "mistral": _llama_rules,
                                                       "opt": _opt_rules}

# adapter_config.json keys mmjax reads
_READ_KEYS = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
              "task_type", "auto_mapping", "init_lora_weights"}
# keys that do not change the function (bookkeeping, or options that only act with another one)
_BOOKKEEPING = {"base_model_name_or_path", "revision", "inference_mode", "peft_version",
                "megatron_core", "qalora_group_size", "ensure_weight_tying"}
# keys accepted only with their neutral value(s): any other value changes the function
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "bias": ("none",), "fan_in_fan_out": (False,), "modules_to_save": (None, []),
    "use_dora": (False,), "lora_bias": (False,), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
    "layers_to_transform": (None,), "layers_pattern": (None, []), "layer_replication": (None,),
    "exclude_modules": (None, []), "target_parameters": (None, []),
    "trainable_token_indices": (None,), "use_qalora": (False,), "use_bdlora": (None, False),
    "alora_invocation_tokens": (None,), "megatron_config": (None,), "loftq_config": ({}, None),
    "eva_config": (None,), "corda_config": (None,), "arrow_config": (None,), "kasa_config": (None,),
    "monteclora_config": (None,), "velora_config": (None,), "lora_ga_config": (None,),
}
# init_lora_weights values whose saved A/B apply to the unmodified base (PiSSA, OLoRA, LoftQ,
# CorDA, ... rewrite the base weights at init)
_PLAIN_INITS = (True, False, "gaussian")
_TASK_TYPES = (None, "CAUSAL_LM")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A peft LoRA adapter mapped onto an mmjax model.

    config: the mmjax `LoraConfig` (targets = the adapted module paths, exactly).
    params: the LoRA leaves only, nested like the model's params (float32 numpy).
    modules: HF module name -> mmjax module path, for every adapted module.
    peft_config: the parsed adapter_config.json.
    """

    config: LoraConfig
    params: dict[str, Any]
    modules: dict[str, str]
    peft_config: dict[str, Any]


# --- reading --------------------------------------------------------------------------------

def read_adapter_dir(adapter_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(parsed adapter_config.json, {tensor name: float32 array}) of a peft adapter directory."""
    from mmjax.convert import hf_io

    if not os.path.isdir(adapter_dir):
        raise InputError(f"adapter directory {adapter_dir!r} does not exist"
                         if not os.path.exists(adapter_dir) else f"{adapter_dir!r} is not a directory")
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{adapter_dir!r} has no {CONFIG_FILE} (expected a peft save_pretrained directory)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    weights = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        other = " (adapter_model.bin is not read: re-save with safe_serialization=True)" if os.path.isfile(
            os.path.join(adapter_dir, "adapter_model.bin")) else ""
        raise InputError(f"{adapter_dir!r} has no {WEIGHTS_FILE}{other}")
    return cfg, hf_io.read_safetensors(weights)


def _check_peft_config(cfg: Mapping[str, Any], architectures: tuple[str, ...]) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedModelError(f"adapter_config.json: peft_type {peft_type!r} is not supported "
                                    "(only 'LORA')")
    known = _READ_KEYS | _BOOKKEEPING | set(_NEUTRAL)
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise UnsupportedModelError(f"adapter_config.json: unknown key(s) {', '.join(unknown)}: "
                                    "mmjax cannot tell whether they change the adapted model")
    for key, neutral in _NEUTRAL.items():
        if key in cfg and cfg[key] not in neutral:
            raise UnsupportedModelError(
                f"adapter_config.json: {key}={cfg[key]!r} is not supported (mmjax loads plain LoRA: "
                f"{key} must be {' or '.join(map(repr, neutral))})")
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise UnsupportedModelError(
            f"adapter_config.json: init_lora_weights={cfg['init_lora_weights']!r} rewrites the base "
            "weights at initialisation; only adapters of an unmodified base are supported")
    if cfg.get("task_type") not in _TASK_TYPES:
        raise UnsupportedModelError(f"adapter_config.json: task_type {cfg['task_type']!r} is not "
                                    f"supported ({', '.join(map(repr, _TASK_TYPES))})")
    base_class = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if base_class and architectures and base_class not in architectures:
        raise InputError(f"adapter_config.json: the adapter was made for a {base_class}, but the base "
                         f"model is a {', '.join(architectures)}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InputError(f"adapter_config.json: r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InputError(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    drop = cfg.get("lora_dropout", 0.0)
    if not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise InputError(f"adapter_config.json: lora_dropout must be in [0, 1), got {drop!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise InputError(f"adapter_config.json: use_rslora must be true or false, got {cfg['use_rslora']!r}")


def _module_rules(config: Any, model_type: str) -> tuple[dict[str, TensorRule], dict[str, str]]:
    """({HF module name: its weight rule} for the modules LoRA can adapt,
    {HF module name: why not} for the other weight-holding modules)."""
    if model_type not in RULES:
        raise UnsupportedModelError(f"peft adapters are supported for model_type "
                                    f"{', '.join(sorted(RULES))}; not {model_type!r}")
    mappable, other = {}, {}
    for rule in RULES[model_type](config):
        if not rule.hf_name.endswith(".weight"):
            continue
        name = rule.hf_name[: -len(".weight")]
        if rule.kind in _MAPPABLE and rule.expert < 0 and rule.path[-1] == "kernel":
            mappable[name] = rule
        else:
            other[name] = ("an MoE expert" if rule.expert >= 0 else
                           f"a {rule.kind!r} tensor ({'/'.join(rule.path)}), not a linear projection")
    if getattr(config, "tie_embeddings", False) and "lm_head" not in mappable:
        other["lm_head"] = ("tied to the input embedding (tie_word_embeddings): mmjax computes the "
                            "head from the embedding table")
    return mappable, other


def _selects(targets: Any, name: str) -> bool:
    """peft's target_modules semantics: a string is a full-match regex, a list matches a module
    name equal to an entry or ending with "." + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _lora_rules(name: str, rule: TensorRule, r: int) -> tuple[TensorRule, TensorRule]:
    """The rules of module `name`'s lora_A [r, in] and lora_B [out, r] (see the module docstring)."""
    out_dim, in_dim = rule.hf_shape
    a = TensorRule(f"{PREFIX}{name}.lora_A.weight", rule.path[:-1] + (LORA_A,), (r, in_dim),
                   rule.kind if rule.kind == "out_proj" else "linear", rule.heads)
    b = TensorRule(f"{PREFIX}{name}.lora_B.weight", rule.path[:-1] + (LORA_B,), (out_dim, r),
                   rule.kind if rule.kind == "in_proj" else "linear", rule.heads)
    return a, b


def adapter_from_peft(adapter_dir: str, config: Any, model_type: str,
                      architectures: tuple[str, ...] = ()) -> Adapter:
    """The peft LoRA adapter of `adapter_dir` for a base model of mmjax `config` converted from
    HF `model_type` (`architectures`: the base config's, checked against the adapter's base
    class)."""
    cfg, tensors = read_adapter_dir(adapter_dir)
    _check_peft_config(cfg, tuple(architectures))
    mappable, other = _module_rules(config, model_type)
    r = cfg["r"]

    # the modules the tensors adapt
    weighted: dict[str, set[str]] = {}
    for key in tensors:
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise UnsupportedModelError(f"{WEIGHTS_FILE}: tensor {key!r} is not a plain LoRA weight "
                                        f"({PREFIX}<module>.lora_A/lora_B.weight)")
        weighted.setdefault(m.group(1), set()).add(m.group(2))
    if not weighted:
        raise InputError(f"{WEIGHTS_FILE} holds no LoRA weights")
    for name, parts in sorted(weighted.items()):
        if name in other:
            raise UnsupportedModelError(f"adapter targets {name}, which is {other[name]}: mmjax cannot "
                                        "map LoRA there")
        if name not in mappable:
            raise InputError(f"adapter targets module {name!r}, which the base {model_type} model lacks "
                             f"(an adapter for another base architecture or size?); base modules look "
                             f"like {short_list(sorted(mappable), 3)}")
        if parts != {"lora_A", "lora_B"}:
            raise InputError(f"{WEIGHTS_FILE}: module {name} has only "
                             f"{', '.join(sorted(parts))}; LoRA needs lora_A and lora_B")

    # target_modules must select exactly those modules
    targets = cfg.get("target_modules")
    if targets is None or not isinstance(targets, (str, list)):
        raise InputError(f"adapter_config.json: target_modules must be a list or a regex string, "
                         f"got {targets!r}")
    if targets == "all-linear":
        selected = {n for n in mappable if n != "lm_head"}
    else:
        every = list(mappable) + list(other)
        if isinstance(targets, list):
            for t in targets:
                if not any(_selects([t], n) for n in every):
                    raise InputError(f"adapter_config.json: target_modules entry {t!r} names no "
                                     f"module of the base {model_type} model")
        selected = {n for n in every if _selects(targets, n)}
        bad = sorted(n for n in selected if n in other)
        if bad:
            raise UnsupportedModelError(f"adapter_config.json: target_modules selects {bad[0]}, which is "
                                        f"{other[bad[0]]}: mmjax cannot map LoRA there")
    missing = sorted(selected - set(weighted))
    extra = sorted(set(weighted) - selected)
    if missing:
        raise InputError(f"{WEIGHTS_FILE} lacks the LoRA weights of {len(missing)} targeted module(s): "
                         f"{short_list(missing)}")
    if extra:
        raise InputError(f"{WEIGHTS_FILE} has LoRA weights for {len(extra)} module(s) target_modules "
                         f"does not select: {short_list(extra)}")

    rules = [x for name in sorted(weighted) for x in _lora_rules(name, mappable[name], r)]
    params = apply_rules_from_hf(tensors, rules, what=WEIGHTS_FILE)
    paths = {name: "/".join(mappable[name].path[:-1]) for name in sorted(weighted)}
    lora_cfg = LoraConfig(targets=tuple(f"^{re.escape(p)}$" for p in paths.values()), r=r,
                          alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                          use_rslora=bool(cfg.get("use_rslora", False)),
                          init="gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming")
    return Adapter(config=lora_cfg, params=params, modules=paths, peft_config=dict(cfg))


def load_adapter(adapter_dir: str, params: Mapping[str, Any], config: Any, model_type: str,
                 architectures: tuple[str, ...] = ()) -> tuple[dict[str, Any], Adapter]:
    """(`params` with the adapter's LoRA leaves added, the `Adapter`); run the model under
    `mmjax.nn.lora.lora(adapter.config)`, or `merge` it."""
    adapter = adapter_from_peft(adapter_dir, config, model_type, architectures)
    return with_lora(params, adapter.params), adapter


# --- writing --------------------------------------------------------------------------------

def export_adapter(params: Mapping[str, Any], lora_cfg: LoraConfig, config: Any, out_dir: str, *,
                   model_type: str | None = None, architecture: str | None = None,
                   base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """Write the LoRA leaves of `params` (an mmjax model of `config`) as a peft adapter
    directory that `PeftModel.from_pretrained(base, out_dir)` loads. Returns the written
    adapter_config dict. Every module holding LoRA leaves must be one the family maps."""
    import jax
    from safetensors.numpy import save_file

    if model_type is None or architecture is None:  # what `to_hf` would write for this config
        from mmjax.convert import registry
        from mmjax.models import family_of

        hf = registry.for_export(family_of(config), config, model_type).config_to_hf(config, model_type)
        model_type = model_type or hf["model_type"]
        architecture = architecture or (hf.get("architectures") or [None])[0]
    mappable, other = _module_rules(config, model_type)
    by_path = {"/".join(rule.path[:-1]): name for name, rule in mappable.items()}
    plain = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32),
                                   lora_params(dict(params)))
    modules = lora_modules(plain)
    if not modules:
        raise InputError("params hold no LoRA weights (lora_a / lora_b) to export")
    rules = []
    for path in modules:
        name = by_path.get(path)
        if name is None:
            raise UnsupportedModelError(f"LoRA on {path}: no {model_type} HF module corresponds to it, "
                                        "so peft cannot hold it")
        rules.extend(_lora_rules(name, mappable[name], lora_cfg.r))
    tensors = apply_rules_to_hf(plain, rules)
    names = sorted(by_path[p] for p in modules)
    # short names ("q_proj") when they select exactly these modules, else the full names
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    every = list(mappable) + list(other)
    targets = short if sorted(n for n in every if _selects(short, n)) == names else names
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.use_rslora, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
        "init_lora_weights": "gaussian" if lora_cfg.init == "gaussian" else True,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }
    if architecture:
        cfg["auto_mapping"] = {"base_model_class": architecture}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    return cfg


# --- mmjax compare --adapter ----------------------------------------------------------------

class LoraModule:
    """A Flax module whose `apply` runs under `lora(cfg)`; everything else is the module's own.
    Lets a family's `compare` runner run the adapted model without knowing about LoRA."""

    def __init__(self, module: Any, cfg: LoraConfig):
        self._module, self._cfg = module, cfg

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        from mmjax.nn.lora import lora

        with lora(self._cfg):
            return self._module.apply(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _AdaptedLoader:
    def __init__(self, cls: Any, adapter_dir: str, peft: Any):
        self._cls, self._dir, self._peft = cls, adapter_dir, peft

    def from_pretrained(self, path: str, *args: Any, **kwargs: Any) -> Any:
        base = self._cls.from_pretrained(path, *args, **kwargs)
        return self._peft.PeftModel.from_pretrained(base, self._dir).eval()


class PeftReference:
    """The `transformers` module as a family runner sees it, except that every model class's
    `from_pretrained(hf_dir)` returns `PeftModel.from_pretrained(base, adapter_dir)`."""

    def __init__(self, transformers: Any, adapter_dir: str, peft: Any):
        self._transformers, self._dir, self._peft = transformers, adapter_dir, peft

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._transformers, name)
        if (isinstance(value, type) and hasattr(value, "from_pretrained")
                and not any(s in name for s in ("Config", "Tokenizer", "Processor", "Extractor"))):
            return _AdaptedLoader(value, self._dir, self._peft)
        return value


def import_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise MmjaxError(f"mmjax compare --adapter needs peft ({e}); pip install peft") from None
    return peft


__all__ = [
    "RULES",
    "Adapter",
    "LoraModule",
    "PeftReference",
    "adapter_from_peft",
    "export_adapter",
    "load_adapter",
    "read_adapter_dir",
]
