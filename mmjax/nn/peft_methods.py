"""Parameter-efficient fine-tuning beyond LoRA, with no model edits: prompt tuning, prefix
tuning, LLaMA-Adapter and (Houlsby) adapter tuning. LoRA is `mmjax.nn.lora`.

Every method is a small frozen config, an `init_*` function that returns the base params plus
the method's new leaves, and a context manager (a Flax method interceptor, as `lora(cfg)`)
under which every `init` / `apply` -- jitted training steps and `mmjax.generate.generate`
included -- runs the adapted model:

    cfg = PromptTuningConfig(num_virtual_tokens=20, init="text", init_token_ids=ids)
    params = init_prompt_tuning(model, base_params, cfg, jax.random.key(0))
    with peft_method(cfg):                     # or prompt_tuning(cfg)
        logits = model.apply({"params": params}, tokens)             # [B, T, vocab]: real tokens
        out = generate(model, params, prompts, GenerationConfig(max_new_tokens=16))
    optimizer mask: re.search(cfg.trainable, "a/b/c" param path) -> train, else freeze

| method                | new params (where)                                     | `trainable` |
|-----------------------|--------------------------------------------------------|-------------|
| PromptTuningConfig    | prompt_tuning/embedding [n, dim] (top level)           | ^prompt_tuning/ |
| PrefixTuningConfig    | prefix_tuning/kv [layers, 2, n, kv_heads, head_dim], or with `projection`: prefix_tuning/{embedding [n, token_dim], proj_in/{kernel, bias}, proj_out/{kernel [hidden, layers, 2, kv_heads, head_dim], bias}} | ^prefix_tuning/ |
| LlamaAdapterConfig    | layers_i/attn/{adaption_prompt [len, dim], adaption_gate [1]} | /adaption_(prompt\\|gate)$ |
| AdapterTuningConfig   | layers_i/{attn,mlp}/adapter_{down,up}_{kernel,bias}    | /adapter_(down\\|up)_(kernel\\|bias)$ |

Which module is "the language model" (prompt and prefix tuning): the outermost module with
`embed_tokens` and `init_cache` methods whose `__call__` takes the `Llama` convention
(`tokens | embeddings=, positions=, input_mask=, mask_ar=, cache=`): `Llama` and OPT (greedy
decoding checked against the full forward for both), and by the same convention the LLM
inside LLaVA (whose `init_cache` is the LLM's). The method's params live in that module's own scope (the root of a plain LM's
tree). LLaMA-Adapter and adapter tuning act on the blocks of `mmjax.nn.transformer` (loop
stacks `layers_{i}`; adapter tuning on every layer also runs under `scan_layers`).

**Prompt tuning** (Lester et al.; peft `PromptTuningConfig`). A soft prompt [n, dim] is put
before the input embeddings; the prompt attends causally (as peft's causal LM), every real
token attends it. Real tokens get positions n, n+1, ... (peft feeds `inputs_embeds` of length
n + T and transformers numbers them 0 .. n+T-1; padding is not counted, as mmjax's own
defaults do, so for unpadded rows this is peft's numbering exactly). Explicit `positions=` are
shifted by n (peft ignores them). The returned logits (and `hidden_states` intermediates) are
those of the real tokens only, so losses need no change. Init: "random" N(0, 1) (torch's
`nn.Embedding`, peft's RANDOM), "text" the embeddings of `init_token_ids` repeated / cut to n
(peft's TEXT; tokenize the text yourself, e.g. with BOS as peft's tokenizer call adds it),
"sampled_vocab" the embeddings of n ids drawn uniformly from the vocabulary.

**Prefix tuning** (Li & Liang; peft `PrefixTuningConfig`). Per layer a key and a value prefix
[n, kv_heads, head_dim] are put in front of the attention's keys/values, exactly the way peft
feeds them as `past_key_values`: the prefix is written into slots [0, n) of mmjax's
`KVCache` (keys NOT rotated), the cache's length starts at n, so real tokens get positions
n, n+1, ... as transformers gives them after a cache of length n. Without a cache in the call
(training, scoring) one of n + T slots is made for the call; caches made by `init_cache`
under the context get n extra slots and receive the prefix on their first call (decoding;
the `PendingCache` type marks a cache still waiting for it). Explicit `positions=` are used as
given (peft adds n to them): leave them None, or count from n.
Params as peft's: without `projection` the prefix itself (N(0, 1), peft's `nn.Embedding`);
with it (peft's `prefix_projection`) an embedding [n, token_dim] (token_dim = kv_heads x
head_dim by default, as peft sets it for GQA) through Linear(token_dim, hidden) - tanh -
Linear(hidden, layers x 2 x kv_heads x head_dim), torch's default Linear init.

**LLaMA-Adapter** (Zhang et al.; peft `AdaptionPromptConfig` for llama). In the top
`adapter_layers` blocks a learnable prompt [adapter_len, dim] (N(0, 1)) goes through that
layer's (frozen) key/value projections, un-rotated; the block's RoPE'd queries attend it with a
separate float32 softmax over the adapter keys only (no mask), times a gate [1] initialised to
0, through the output projection's kernel, added to the attention output. At init the model is
the base model bit for bit. Differences from peft: the output projection's bias (models with
`attention_bias`) is not added a second time (peft passes the adapter output through the whole
o_proj); LoRA on the same key/value/query projections is not seen by the adapter path (peft
calls the wrapped modules).

**Adapter tuning** (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): a
bottleneck y + up(act(down(y))) on the output y of the attention and/or MLP sublayer of the
chosen layers, before the residual add (and before residual dropout). down: N(0, init_std^2)
kernel, zero bias; up: zeros (kernel and bias), so the model equals the base model exactly at
init and the first gradient reaches `up` only. There is no pip reference for this method
here (peft has no Houlsby adapter), so there is no parity test, only the identity-at-init,
changes-once-trained, gradient and decoding tests.

Gradients: every method's params are ordinary leaves, so `jax.grad` w.r.t. them (base frozen,
`split_params` / `merge_params`) trains the method only.

Under jit the context must be active while a function is traced (as with `lora`): a jitted
function traced inside the context keeps the method, one traced outside never has it. The
method's extra leaves change the param tree, so `generate` and jitted steps retrace for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmjax.errors import ConfigError, InputError
from mmjax.nn.attention import Attention
from mmjax.nn.cache import KVCache
from mmjax.nn.mlp import MLP, GatedMLP, get_activation
from mmjax.ops.rope import apply_rope

PROMPT_TUNING, PREFIX_TUNING = "prompt_tuning", "prefix_tuning"
ADAPTION_PROMPT, ADAPTION_GATE = "adaption_prompt", "adaption_gate"
ADAPTER_LEAVES = ("adapter_down_kernel", "adapter_down_bias", "adapter_up_kernel", "adapter_up_bias")
PROMPT_INITS = ("random", "text", "sampled_vocab")
SUBLAYERS = ("attn", "mlp")


def _positive_int(who: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{who}.{name} must be a positive int, got {value!r}")


def _layer_tuple(who: str, layers: Any) -> tuple[int, ...] | None:
    if layers is None:
        return None
    layers = (layers,) if isinstance(layers, (int, np.integer)) else tuple(layers)
    if not layers or any(not isinstance(i, (int, np.integer)) or i < 0 for i in layers):
        raise ConfigError(f"{who}.layers must be None or non-negative layer indices, got {layers!r}")
    return tuple(sorted(set(int(i) for i in layers)))


# --- configs -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """num_virtual_tokens: the soft prompt's length n. init: "random" (N(0, init_std^2), peft's
    N(0, 1) by default), "text" (embeddings of `init_token_ids`, repeated / cut to n, as peft),
    "sampled_vocab" (embeddings of n uniformly drawn vocabulary ids). dtype: the prompt's."""

    num_virtual_tokens: int
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()
    init_std: float = 1.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        _positive_int("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"PromptTuningConfig.init {self.init!r}: one of {', '.join(PROMPT_INITS)}")
        ids = tuple(int(i) for i in np.asarray(self.init_token_ids, np.int64).reshape(-1))
        object.__setattr__(self, "init_token_ids", ids)
        if self.init == "text" and not ids:
            raise ConfigError("PromptTuningConfig(init='text') needs init_token_ids (the text's "
                              "token ids, e.g. tokenizer.encode(text))")
        if self.init != "text" and ids:
            raise ConfigError(f"PromptTuningConfig.init_token_ids are used by init='text' only "
                              f"(init={self.init!r})")
        if any(i < 0 for i in ids):
            raise ConfigError("PromptTuningConfig.init_token_ids must be non-negative token ids")
        if not self.init_std > 0:
            raise ConfigError(f"PromptTuningConfig.init_std must be positive, got {self.init_std!r}")

    @property
    def trainable(self) -> str:
        return rf"(^|/){PROMPT_TUNING}/"


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    """num_virtual_tokens: the prefix length n (per layer, keys and values). projection: peft's
    `prefix_projection` (embedding [n, token_dim] -> Linear-Tanh-Linear); token_dim / hidden:
    its widths (None: kv_heads x head_dim, and token_dim, as peft's defaults). dtype: the params'."""

    num_virtual_tokens: int
    projection: bool = False
    token_dim: int | None = None
    hidden: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        _positive_int("PrefixTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "hidden"):
            value = getattr(self, name)
            if value is not None:
                _positive_int("PrefixTuningConfig", name, value)
                if not self.projection:
                    raise ConfigError(f"PrefixTuningConfig.{name} is a width of the projection: "
                                      "set projection=True or leave it None")

    @property
    def trainable(self) -> str:
        return rf"(^|/){PREFIX_TUNING}/"


@dataclasses.dataclass(frozen=True)
class LlamaAdapterConfig:
    """adapter_len: prompt tokens per adapted layer; adapter_layers: how many of the top layers
    (peft's `adapter_layers`), or `layers`: explicit layer indices instead. dtype: the params'."""

    adapter_len: int = 10
    adapter_layers: int = 8
    layers: tuple[int, ...] | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        _positive_int("LlamaAdapterConfig", "adapter_len", self.adapter_len)
        _positive_int("LlamaAdapterConfig", "adapter_layers", self.adapter_layers)
        object.__setattr__(self, "layers", _layer_tuple("LlamaAdapterConfig", self.layers))

    @property
    def trainable(self) -> str:
        return rf"/({ADAPTION_PROMPT}|{ADAPTION_GATE})$"

    def selected(self, layer: int, num_layers: int) -> bool:
        if self.layers is not None:
            return layer in self.layers
        return layer >= num_layers - self.adapter_layers


@dataclasses.dataclass(frozen=True)
class AdapterTuningConfig:
    """bottleneck: the adapter's inner width; sublayers: after which sublayers of a block
    ("attn" self-attention, "mlp" the MLP / gated MLP); layers: indices (None = every layer);
    activation: any `mmjax.nn.mlp` activation; init_std: the down projection's N(0, std^2)."""

    bottleneck: int = 16
    sublayers: tuple[str, ...] = SUBLAYERS
    layers: tuple[int, ...] | None = None
    activation: str = "relu"
    init_std: float = 1e-2
    dtype: Any = jnp.float32

    def __post_init__(self):
        _positive_int("AdapterTuningConfig", "bottleneck", self.bottleneck)
        subs = (self.sublayers,) if isinstance(self.sublayers, str) else tuple(self.sublayers)
        object.__setattr__(self, "sublayers", subs)
        bad = [s for s in subs if s not in SUBLAYERS]
        if not subs or bad:
            raise ConfigError(f"AdapterTuningConfig.sublayers {subs!r}: a non-empty subset of "
                              f"{', '.join(SUBLAYERS)}")
        object.__setattr__(self, "layers", _layer_tuple("AdapterTuningConfig", self.layers))
        try:
            get_activation(self.activation)
        except ValueError as e:
            raise ConfigError(f"AdapterTuningConfig.activation: {e}") from None
        if not self.init_std > 0:
            raise ConfigError(f"AdapterTuningConfig.init_std must be positive, got {self.init_std!r}")

    @property
    def trainable(self) -> str:
        return r"/adapter_(down|up)_(kernel|bias)$"


METHODS = (PromptTuningConfig, PrefixTuningConfig, LlamaAdapterConfig, AdapterTuningConfig)


# --- param-tree helpers -----------------------------------------------------------------------

def _paths(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _paths(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


def _set(tree: dict, path: str, value: Any) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def merge_params(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with the leaves of `extra` (same nesting) added or replaced (a new tree)."""
    out = {k: (merge_params(v, {}) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_params(out[k], v)
        else:
            out[k] = merge_params(v, {}) if isinstance(v, Mapping) else v
    return out


def split_params(params: Mapping[str, Any], cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """(frozen base leaves, the method's leaves), both in the tree's nesting, split by
    `re.search(cfg.trainable, path)`: train the second, `merge_params` them back for a forward."""
    pattern = re.compile(cfg.trainable)
    base: dict[str, Any] = {}
    method: dict[str, Any] = {}
    for path, leaf in _paths(params):
        _set(method if pattern.search(path) else base, path, leaf)
    return base, method


def method_params(params: Mapping[str, Any], cfg) -> dict[str, Any]:
    """Only the method's leaves of `params` (what an adapter file holds)."""
    return split_params(params, cfg)[1]


# --- finding the model's parts -------------------------------------------------------------------

def _is_lm(module: nn.Module) -> bool:
    return callable(getattr(type(module), "embed_tokens", None)) and callable(
        getattr(type(module), "init_cache", None))


def _layer_index(module: nn.Module) -> int | None:
    """i of the enclosing block `layers_{i}` (None under a scanned stack or outside one)."""
    parent = module.parent
    name = getattr(parent, "name", None) or ""
    m = re.fullmatch(r".*_(\d+)", name)
    return int(m.group(1)) if m else None


def _num_layers(module: nn.Module) -> int | None:
    m = module.parent
    while m is not None:
        n = getattr(getattr(m, "config", None), "num_layers", None)
        if isinstance(n, int):
            return n
        m = getattr(m, "parent", None)
    return None


def _kernel(node: Mapping[str, Any], dtype) -> jax.Array:
    """A DenseGeneral's kernel in `dtype` (dequantized when it is int8 + kernel_scale)."""
    kernel = jnp.asarray(node["kernel"]).astype(dtype)
    if "kernel_scale" in node:
        scale = jnp.asarray(node["kernel_scale"]).astype(dtype)
        kernel = kernel * scale.reshape((1,) * (kernel.ndim - scale.ndim) + scale.shape)
    return kernel


def _lm_dims(module: nn.Module, params: Mapping[str, Any]) -> dict[str, Any]:
    """num_layers, kv_heads, head_dim (from an abstract `init_cache`), dim (from an abstract
    `embed_tokens`) of a Llama-convention LM."""
    cache = jax.eval_shape(lambda: module.init_cache(1, 1))
    k = cache.k if cache.stacked else cache.k[0]
    num_layers = k.shape[0] if cache.stacked else len(cache.k)
    emb = jax.eval_shape(lambda p: module.apply({"params": p}, jnp.zeros((1, 1), jnp.int32),
                                                method="embed_tokens"), params)
    return dict(num_layers=num_layers, kv_heads=k.shape[-2], head_dim=k.shape[-1],
                dim=emb.shape[-1], dtype=emb.dtype)


def _unwrap(params):
    """The "params" collection itself, without logical-partitioning boxes."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return nn.meta.unbox(params)


# --- the cache a prompt / prefix method prepares ------------------------------------------------

@struct.dataclass
class PendingCache(KVCache):
    """A `KVCache` made by `init_cache` under `prompt_tuning` / `prefix_tuning`: n slots longer,
    still waiting for the method's virtual tokens, which its first call puts in front (the type
    is the flag, so it is static under jit). That call returns a plain `KVCache`."""


def _pending(cache: KVCache) -> PendingCache:
    return PendingCache(**{f.name: getattr(cache, f.name) for f in dataclasses.fields(KVCache)})


def _plain(cache: KVCache) -> KVCache:
    return KVCache(**{f.name: getattr(cache, f.name) for f in dataclasses.fields(KVCache)})


def _init_cache_call(n: int, next_fun, args, kwargs, module):
    """`init_cache(batch, max_len=None, dtype=None)` with n more slots, as a PendingCache."""
    args = list(args)
    max_len = args[1] if len(args) > 1 else kwargs.pop("max_len", None)
    if max_len is None:
        max_len = module.config.max_len
    if len(args) > 1:
        args[1] = max_len + n
    else:
        kwargs["max_len"] = max_len + n
    return _pending(next_fun(*args, **kwargs))


def _split_call(args, kwargs):
    kwargs = dict(kwargs)
    tokens = args[0] if args else kwargs.pop("tokens", None)
    if len(args) > 1:
        raise InputError("prompt / prefix tuning: pass the LM's inputs other than tokens by keyword")
    return tokens, kwargs


def _method_leaf(module: nn.Module, name: str, init_fn: str):
    value = module.get_variable("params", name) if module.scope is not None else None
    if value is None:
        where = "/".join(module.path) or "the root"
        raise InputError(f"{name}: no params at {where}; create them with {init_fn}(model, "
                         "params, cfg, rng)")
    return value


class _Nesting:
    """Only the outermost LM call is adapted (an LM called from inside another one is not)."""

    def __init__(self):
        self.depth = 0


# --- prompt tuning -----------------------------------------------------------------------------

def init_prompt_tuning(module: nn.Module, params: Mapping[str, Any], cfg: PromptTuningConfig,
                       rng: jax.Array) -> dict[str, Any]:
    """`params` plus `prompt_tuning/embedding` [n, dim] initialised as `cfg.init` says."""
    params = _unwrap(params)
    n = cfg.num_virtual_tokens
    dims = _lm_dims(module, params)
    if cfg.init == "random":
        prompt = cfg.init_std * jax.random.normal(rng, (n, dims["dim"]), jnp.float32)
    else:
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        if cfg.init == "text":
            ids = list(cfg.init_token_ids)
            ids = (ids * math.ceil(n / len(ids)))[:n]  # repeated, then cut to n (peft's rule)
            ids = np.asarray(ids, np.int32)
        else:
            if vocab is None:
                raise ConfigError("PromptTuningConfig(init='sampled_vocab') needs the model's "
                                  "config.vocab_size")
            ids = jax.random.randint(rng, (n,), 0, vocab)  # traceable (inside a jitted init)
        if cfg.init == "text" and vocab is not None and ids.max() >= vocab:
            raise ConfigError(f"PromptTuningConfig.init_token_ids: id {int(ids.max())} is outside "
                              f"the vocabulary [0, {vocab})")
        prompt = module.apply({"params": params}, jnp.asarray(ids)[None], method="embed_tokens")[0]
    return merge_params(params, {PROMPT_TUNING: {"embedding": jnp.asarray(prompt, cfg.dtype)}})


def _shift_outputs(out, n: int, return_intermediates: bool):
    """Drop the first n positions of the logits and of the per-position intermediates."""
    if not isinstance(out, tuple):
        return out[:, n:]
    out = list(out)
    out[0] = out[0][:, n:]
    if return_intermediates:
        inter = dict(out[-1])
        if "hidden_states" in inter:
            inter["hidden_states"] = tuple(h[:, n:] for h in inter["hidden_states"])
        if "final_hidden" in inter:
            inter["final_hidden"] = inter["final_hidden"][:, n:]
        out[-1] = inter
    return tuple(out)


_ADAPT = object()  # _lm_gate's answer for the one call a prompt / prefix method adapts


def _lm_gate(n: int, leaf: str, nesting: _Nesting, next_fun, args, kwargs, context):
    """What prompt and prefix tuning do with an intercepted call: a call that is not the outer
    LM's `__call__` runs unchanged, `init_cache` gets n extra slots, a decoding step (a cache
    that already holds the prompt / prefix) and the base model's own init run unchanged;
    `_ADAPT` for the call to adapt."""
    module = context.module
    if not _is_lm(module) or nesting.depth:
        return next_fun(*args, **kwargs)
    if context.method_name == "init_cache":
        return _init_cache_call(n, next_fun, args, dict(kwargs), module)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    cache = _split_call(args, kwargs)[1].get("cache")
    if cache is not None and not isinstance(cache, PendingCache):
        return next_fun(*args, **kwargs)
    if module.is_initializing() and not module.has_variable("params", leaf):
        return next_fun(*args, **kwargs)
    return _ADAPT


def _prompt_interceptor(cfg: PromptTuningConfig, nesting: _Nesting):
    n = cfg.num_virtual_tokens

    def intercept(next_fun, args, kwargs, context):
        out = _lm_gate(n, PROMPT_TUNING, nesting, next_fun, args, kwargs, context)
        if out is not _ADAPT:
            return out
        module = context.module
        tokens, kw = _split_call(args, kwargs)
        cache = kw.get("cache")
        prompt = _method_leaf(module, PROMPT_TUNING, "init_prompt_tuning")["embedding"]
        for name in ("segment_ids", "attention_mask"):
            if kw.get(name) is not None:
                raise InputError(f"prompt tuning: {name} is not supported (the soft prompt would "
                                 "need its own rows/columns in it)")
        nesting.depth += 1
        try:
            x = module.embed_tokens(tokens) if tokens is not None else kw.pop("embeddings")
            kw.pop("embeddings", None)
            b, t = x.shape[:2]
            x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype)[None], (b, n, x.shape[2])),
                                 x], axis=1)
            ones = jnp.ones((b, n), bool)
            mask = kw.get("input_mask")
            kw["input_mask"] = jnp.concatenate(
                [ones, jnp.ones((b, t), bool) if mask is None else mask.astype(bool)], axis=1)
            if kw.get("positions") is not None:
                kw["positions"] = jnp.concatenate(
                    [jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
                     kw["positions"].astype(jnp.int32) + n], axis=1)
            if kw.get("mask_ar") is not None:
                kw["mask_ar"] = jnp.concatenate(
                    [jnp.ones((b, n), jnp.int32), kw["mask_ar"].astype(jnp.int32)], axis=1)
            if cache is not None:
                kw["cache"] = _plain(cache)
            out = next_fun(embeddings=x, **kw)
        finally:
            nesting.depth -= 1
        return _shift_outputs(out, n, bool(kw.get("return_intermediates")))

    return intercept


@contextlib.contextmanager
def prompt_tuning(cfg: PromptTuningConfig) -> Iterator[None]:
    """The soft prompt of `cfg` active for every init/apply inside (see the module docstring)."""
    with nn.intercept_methods(_prompt_interceptor(cfg, _Nesting())):
        yield


# --- prefix tuning -----------------------------------------------------------------------------

def _torch_linear(rng, fan_in: int, kernel_shape, bias_shape, dtype):
    """torch.nn.Linear's default init: kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    k1, k2 = jax.random.split(rng)
    return {"kernel": jax.random.uniform(k1, kernel_shape, jnp.float32, -bound, bound).astype(dtype),
            "bias": jax.random.uniform(k2, bias_shape, jnp.float32, -bound, bound).astype(dtype)}


def init_prefix_tuning(module: nn.Module, params: Mapping[str, Any], cfg: PrefixTuningConfig,
                       rng: jax.Array) -> dict[str, Any]:
    """`params` plus `prefix_tuning/...` (see the module docstring's table), shaped for the LM's
    layers and K/V heads (read from an abstract `init_cache`)."""
    params = _unwrap(params)
    d = _lm_dims(module, params)
    n = cfg.num_virtual_tokens
    kv_shape = (d["num_layers"], 2, d["kv_heads"], d["head_dim"])
    k0, k1, k2 = jax.random.split(rng, 3)
    if not cfg.projection:
        kv = jax.random.normal(k0, (n,) + kv_shape, jnp.float32)  # nn.Embedding: N(0, 1)
        new = {"kv": jnp.moveaxis(kv, 0, 2).astype(cfg.dtype)}  # [L, 2, n, kv_heads, head_dim]
    else:
        token_dim = cfg.token_dim or d["kv_heads"] * d["head_dim"]
        hidden = cfg.hidden or token_dim
        new = {"embedding": jax.random.normal(k0, (n, token_dim), jnp.float32).astype(cfg.dtype),
               "proj_in": _torch_linear(k1, token_dim, (token_dim, hidden), (hidden,), cfg.dtype),
               "proj_out": _torch_linear(k2, hidden, (hidden,) + kv_shape, kv_shape, cfg.dtype)}
    return merge_params(params, {PREFIX_TUNING: new})


def prefix_key_values(prefix: Mapping[str, Any], dtype: Any = jnp.float32) -> jax.Array:
    """The per-layer prefixes [layers, 2 (key, value), n, kv_heads, head_dim] from the
    `prefix_tuning` params (through the projection when they have one)."""
    if "kv" in prefix:
        return jnp.asarray(prefix["kv"]).astype(dtype)
    e = jnp.asarray(prefix["embedding"], jnp.float32)
    pin, pout = prefix["proj_in"], prefix["proj_out"]
    h = jnp.tanh(e @ jnp.asarray(pin["kernel"], jnp.float32) + jnp.asarray(pin["bias"], jnp.float32))
    out = jnp.tensordot(h, jnp.asarray(pout["kernel"], jnp.float32), axes=1) + jnp.asarray(
        pout["bias"], jnp.float32)  # [n, L, 2, kv_heads, head_dim]
    return jnp.moveaxis(out, 0, 2).astype(dtype)


def _write_prefix(cache: KVCache, kv: jax.Array) -> KVCache:
    """A fresh cache with the prefixes in slots [0, n): valid, counted in the lengths."""
    num_layers, _, n = kv.shape[:3]
    b = cache.batch
    if cache.stacked:
        shape = (num_layers, b, n) + kv.shape[3:]
        k = cache.k.at[:, :, :n].set(jnp.broadcast_to(kv[:, 0, None], shape).astype(cache.k.dtype))
        v = cache.v.at[:, :, :n].set(jnp.broadcast_to(kv[:, 1, None], shape).astype(cache.v.dtype))
    else:
        if len(cache.k) != num_layers:
            raise InputError(f"prefix tuning: params for {num_layers} layers, the model has "
                             f"{len(cache.k)}")
        shape = (b, n) + kv.shape[3:]
        k = tuple(c.at[:, :n].set(jnp.broadcast_to(kv[i, 0], shape).astype(c.dtype))
                  for i, c in enumerate(cache.k))
        v = tuple(c.at[:, :n].set(jnp.broadcast_to(kv[i, 1], shape).astype(c.dtype))
                  for i, c in enumerate(cache.v))
    return KVCache(k=k, v=v, index=cache.index + n, valid=cache.valid.at[:, :n].set(True),
                   positions=cache.positions.at[:, :n].set(jnp.arange(n, dtype=jnp.int32)),
                   lengths=cache.lengths + n)


def _prefix_interceptor(cfg: PrefixTuningConfig, nesting: _Nesting):
    n = cfg.num_virtual_tokens

    def intercept(next_fun, args, kwargs, context):
        out = _lm_gate(n, PREFIX_TUNING, nesting, next_fun, args, kwargs, context)
        if out is not _ADAPT:
            return out
        module = context.module
        tokens, kw = _split_call(args, kwargs)
        cache = kw.get("cache")
        prefix = _method_leaf(module, PREFIX_TUNING, "init_prefix_tuning")
        x = tokens if tokens is not None else kw["embeddings"]
        b, t = x.shape[:2]
        own = cache is None
        if own:  # a full forward: a cache of n + T slots for this call only (init_cache comes
            cache = module.init_cache(b, t)  # through this interceptor: n slots added)
        k_dtype = (cache.k if cache.stacked else cache.k[0]).dtype
        kw["cache"] = _write_prefix(cache, prefix_key_values(prefix, k_dtype))
        nesting.depth += 1
        try:
            out = next_fun(tokens, **kw)
        finally:
            nesting.depth -= 1
        if own:  # drop the call's own cache
            out = (out[0],) + tuple(out[2:])
            return out[0] if len(out) == 1 else out
        return out

    return intercept


@contextlib.contextmanager
def prefix_tuning(cfg: PrefixTuningConfig) -> Iterator[None]:
    """The key/value prefixes of `cfg` active for every init/apply inside."""
    with nn.intercept_methods(_prefix_interceptor(cfg, _Nesting())):
        yield


# --- module-scope methods: shared init ---------------------------------------------------------

class _Trace:
    def __init__(self):
        self.seen: list[str] = []  # candidate module paths
        self.adapted: list[str] = []


def _init_in_modules(module: nn.Module, params: Mapping[str, Any], ctx, rng: jax.Array,
                     inits: Mapping[str, Any], args, kwargs, trace: _Trace) -> dict[str, Any]:
    """Base params plus the leaves the interceptor `ctx` creates (one abstract pass to find
    their paths and shapes), drawn with `inits[leaf name](key, shape, dtype)`, one key per
    leaf in sorted path order."""
    params = _unwrap(params)

    def run(p, key):
        return module.apply({"params": p}, *args, mutable=["params"], rngs={"params": key},
                            **kwargs)[1]["params"]

    with ctx:
        shapes = jax.eval_shape(run, params, rng)
    shapes = nn.meta.unbox(shapes)
    have = {p for p, _ in _paths(params)}
    new = sorted((p, s) for p, s in _paths(shapes) if p not in have and p.rsplit("/", 1)[-1] in inits)
    if not new:
        raise InputError(f"no module to adapt: saw {len(set(trace.seen))} candidate modules "
                         f"({', '.join(sorted(set(trace.seen))[:4]) or 'none'})")
    keys = jax.random.split(rng, len(new))
    extra: dict[str, Any] = {}
    for key, (path, s) in zip(keys, new):
        _set(extra, path, inits[path.rsplit("/", 1)[-1]](key, s.shape, s.dtype))
    return merge_params(params, extra)


# --- LLaMA-Adapter -----------------------------------------------------------------------------

def _adapter_attention(module: Attention, x, kwargs, prompt, gate):
    """gate * softmax_fp32(q_rot . K_p / sqrt(d)) . V_p through the out kernel: [B, T, embed]."""
    p = nn.meta.unbox(module.variables["params"])
    dtype = module.dtype
    if module.qk_norm is not None:
        raise ConfigError("LLaMA-Adapter: attention with qk_norm is not supported")
    xq = x.astype(dtype)
    q = jnp.einsum("bte,ehd->bthd", xq, _kernel(p["query"], dtype))
    if "bias" in p["query"]:
        q = q + p["query"]["bias"].astype(dtype)
    inv_freq, positions = kwargs.get("inv_freq"), kwargs.get("positions")
    if inv_freq is not None:
        q = apply_rope(q, positions, inv_freq)
    pr = prompt.astype(dtype)
    k = jnp.einsum("ae,ekd->akd", pr, _kernel(p["key"], dtype))
    v = jnp.einsum("ae,ekd->akd", pr, _kernel(p["value"], dtype))
    if "bias" in p["key"]:
        k = k + p["key"]["bias"].astype(dtype)
    if "bias" in p["value"]:
        v = v + p["value"]["bias"].astype(dtype)
    groups = module.num_heads // module.num_kv_heads
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)  # [A, heads, head_dim]
    scale = module.scale if module.scale is not None else 1.0 / math.sqrt(module.head_dim)
    scores = jnp.einsum("bthd,ahd->bhta", q, k) * jnp.asarray(scale, dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    probs = gate.astype(dtype) * probs
    o = jnp.einsum("bhta,ahd->bthd", probs, v)
    return jnp.einsum("bthd,hde->bte", o, _kernel(p["out"], dtype))


def _llama_adapter_interceptor(cfg: LlamaAdapterConfig, trace: _Trace):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (not isinstance(module, Attention) or context.method_name != "__call__"
                or module.name != "attn"):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        trace.seen.append(path)
        out = next_fun(*args, **kwargs)
        layer = _layer_index(module)
        if layer is None:
            raise ConfigError(f"LLaMA-Adapter at {path}: needs an unscanned stack (layers_{{i}}); "
                              "set scan_layers=False")
        num_layers = _num_layers(module)
        if cfg.layers is None:
            if num_layers is None:
                raise ConfigError("LLaMA-Adapter: the model's number of layers is unknown; give "
                                  "LlamaAdapterConfig(layers=...) explicitly")
            if cfg.adapter_layers > num_layers:
                raise ConfigError(f"LlamaAdapterConfig.adapter_layers={cfg.adapter_layers} exceeds "
                                  f"the model's {num_layers} layers")
        elif num_layers is not None and max(cfg.layers) >= num_layers:
            raise ConfigError(f"LlamaAdapterConfig.layers {cfg.layers}: the model has {num_layers}")
        if not cfg.selected(layer, num_layers or 0):
            return out
        x = args[0] if args else kwargs["x"]
        if (args[1:2] or [kwargs.get("kv_input")])[0] is not None:
            return out  # cross-attention use of a block's "attn": not adapted
        trace.adapted.append(path)
        prompt = module.param(ADAPTION_PROMPT, nn.initializers.normal(1.0),
                              (cfg.adapter_len, x.shape[-1]), cfg.dtype)
        gate = module.param(ADAPTION_GATE, nn.initializers.zeros_init(), (1,), cfg.dtype)
        y, new_cache = (out if isinstance(out, tuple) else (out, None))
        y = y + _adapter_attention(module, x, kwargs, prompt, gate).astype(y.dtype)
        return (y, new_cache) if isinstance(out, tuple) else y

    return intercept


@contextlib.contextmanager
def llama_adapter(cfg: LlamaAdapterConfig, trace: _Trace | None = None) -> Iterator[_Trace]:
    """LLaMA-Adapter active on the selected layers for every init/apply inside."""
    trace = trace if trace is not None else _Trace()
    with nn.intercept_methods(_llama_adapter_interceptor(cfg, trace)):
        yield trace


def init_llama_adapter(module: nn.Module, params: Mapping[str, Any], cfg: LlamaAdapterConfig,
                       rng: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`params` plus `adaption_prompt` (N(0, 1)) and `adaption_gate` (0) in each selected
    layer's `attn`; `args` / `kwargs`: example inputs (shapes only; nothing runs)."""
    trace = _Trace()
    inits = {ADAPTION_PROMPT: lambda k, s, d: jax.random.normal(k, s, jnp.float32).astype(d),
             ADAPTION_GATE: lambda k, s, d: jnp.zeros(s, d)}
    return _init_in_modules(module, params, llama_adapter(cfg, trace), rng, inits, args, kwargs,
                            trace)


# --- adapter tuning (Houlsby) -------------------------------------------------------------------

def _adapter_interceptor(cfg: AdapterTuningConfig, trace: _Trace):
    act = get_activation(cfg.activation)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, Attention) and module.name == "attn":
            kind = "attn"
        elif isinstance(module, (GatedMLP, MLP)) and module.name == "mlp":
            kind = "mlp"
        else:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        path = "/".join(module.path)
        trace.seen.append(path)
        if kind not in cfg.sublayers:
            return out
        layer = _layer_index(module)
        if cfg.layers is not None:
            if layer is None:
                raise ConfigError(f"AdapterTuningConfig.layers needs an unscanned stack "
                                  f"(layers_{{i}}), found {path}; set layers=None or "
                                  "scan_layers=False")
            if layer not in cfg.layers:
                return out
        trace.adapted.append(path)
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        dim, r = y.shape[-1], cfg.bottleneck
        wd = module.param("adapter_down_kernel", nn.initializers.normal(cfg.init_std), (dim, r), cfg.dtype)
        bd = module.param("adapter_down_bias", nn.initializers.zeros_init(), (r,), cfg.dtype)
        wu = module.param("adapter_up_kernel", nn.initializers.zeros_init(), (r, dim), cfg.dtype)
        bu = module.param("adapter_up_bias", nn.initializers.zeros_init(), (dim,), cfg.dtype)
        dt = y.dtype
        h = act(y @ wd.astype(dt) + bd.astype(dt))
        y = y + (h @ wu.astype(dt) + bu.astype(dt))
        return (y,) + tuple(rest) if rest is not None else y

    return intercept


@contextlib.contextmanager
def adapter_tuning(cfg: AdapterTuningConfig, trace: _Trace | None = None) -> Iterator[_Trace]:
    """Bottleneck adapters active after the chosen sublayers for every init/apply inside."""
    trace = trace if trace is not None else _Trace()
    with nn.intercept_methods(_adapter_interceptor(cfg, trace)):
        yield trace


def init_adapter_tuning(module: nn.Module, params: Mapping[str, Any], cfg: AdapterTuningConfig,
                        rng: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`params` plus the four adapter leaves in each chosen sublayer's scope (down N(0, std^2),
    the rest zero); `args` / `kwargs`: example inputs (shapes only)."""
    trace = _Trace()
    std = cfg.init_std
    inits = {"adapter_down_kernel": lambda k, s, d: (std * jax.random.normal(k, s, jnp.float32)).astype(d),
             "adapter_down_bias": lambda k, s, d: jnp.zeros(s, d),
             "adapter_up_kernel": lambda k, s, d: jnp.zeros(s, d),
             "adapter_up_bias": lambda k, s, d: jnp.zeros(s, d)}
    return _init_in_modules(module, params, adapter_tuning(cfg, trace), rng, inits, args, kwargs,
                            trace)


# --- one entry point for all four ----------------------------------------------------------------

def init_peft_method(module: nn.Module, params: Mapping[str, Any], cfg, rng: jax.Array,
                     *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`init_prompt_tuning` / `init_prefix_tuning` (no example inputs needed) /
    `init_llama_adapter` / `init_adapter_tuning`, by the type of `cfg`."""
    if isinstance(cfg, PromptTuningConfig):
        return init_prompt_tuning(module, params, cfg, rng)
    if isinstance(cfg, PrefixTuningConfig):
        return init_prefix_tuning(module, params, cfg, rng)
    if isinstance(cfg, LlamaAdapterConfig):
        return init_llama_adapter(module, params, cfg, rng, *args, **kwargs)
    if isinstance(cfg, AdapterTuningConfig):
        return init_adapter_tuning(module, params, cfg, rng, *args, **kwargs)
    raise ConfigError(f"not a PEFT method config: {type(cfg).__name__}; one of "
                      f"{', '.join(c.__name__ for c in METHODS)}")


def peft_method(cfg):
    """The context manager of `cfg`'s method (`prompt_tuning(cfg)`, ...)."""
    for kind, ctx in ((PromptTuningConfig, prompt_tuning), (PrefixTuningConfig, prefix_tuning),
                      (LlamaAdapterConfig, llama_adapter), (AdapterTuningConfig, adapter_tuning)):
        if isinstance(cfg, kind):
            return ctx(cfg)
    raise ConfigError(f"not a PEFT method config: {type(cfg).__name__}; one of "
                      f"{', '.join(c.__name__ for c in METHODS)}")


def trainable_mask(params: Mapping[str, Any], cfg) -> Any:
    """A tree of bools like `params`: True on the method's leaves (train), False elsewhere."""
    pattern = re.compile(cfg.trainable)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(pattern.search("/".join(str(getattr(k, "key", k)) for k in path))),
        params)


__all__ = [
    "AdapterTuningConfig", "LlamaAdapterConfig", "PendingCache", "PrefixTuningConfig",
    "PromptTuningConfig", "adapter_tuning", "init_adapter_tuning", "init_llama_adapter",
    "init_peft_method", "init_prefix_tuning", "init_prompt_tuning", "llama_adapter",
    "merge_params", "method_params", "peft_method", "prefix_key_values", "prefix_tuning",
    "prompt_tuning", "split_params", "trainable_mask",
]
