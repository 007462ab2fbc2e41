"""The one transformer stack every model builds on: a block (pre- or post-norm; self-attention,
optional cross-attention, MLP / gated MLP / sparse MoE) and a stack of them (a Python loop or
`nn.scan` over layers, with a rematerialisation policy).

    spec = BlockSpec(num_heads=8, num_kv_heads=2, head_dim=64, mlp_dim=1376, norm="rms",
                     mlp="gated", rope_theta=1e4)
    layers = make_layers(spec, num_layers=24, scan=True, remat="dots")   # in setup or compact
    x, hidden, cache_kv = run_layers(layers, x, mask=mask, causal=True, positions=pos)

Block param names are the same for every model (`attn_norm`, `attn/{query,key,value,out}`,
`cross_norm`, `cross_attn/...`, `mlp_norm`, `mlp/{gate,up,down}` or `mlp/{fc1,fc2}` or
`moe/...`), so LLaMA, ViT, CLIP's text tower, BERT-style encoders and decoders with
cross-attention share the code and their checkpoints' layouts. A loop stack names its blocks
`layers_0 .. layers_{n-1}`; a scanned stack holds one block `layers` whose params carry a leading
`[num_layers]` axis (logical name "layers", never sharded). `stack_layer_params` and
`unstack_layer_params` turn one layout into the other, so checkpoints and Hugging Face conversion
work for both (`match_layer_layout` picks the direction from a module's abstract params).

Pre-norm:  x = x + Attn(N(x)); [x = x + XAttn(N(x), ctx)]; x = x + MLP(N(x))
Post-norm: x = N(x + Attn(x)); [x = N(x + XAttn(x, ctx))]; x = N(x + MLP(x))   (BERT)

Remat policies (`remat=`): "none", "full" (save nothing: recompute the whole block),
"dots" (save matmul outputs), "dots_no_batch" (save matmuls without batch dims: weights-only
products, jax's `dots_with_no_batch_dims_saveable`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.configs import closest_name
from mmjax.errors import ConfigError
from mmjax.nn.attention import Attention
from mmjax.nn.mlp import MLP, GatedMLP
from mmjax.nn.moe import DISPATCH_MODES, MoE
from mmjax.nn.norms import LayerNorm, RMSNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.ops.rope import RopeScaling, inverse_frequencies

NORMS = ("rms", "layer")
NORM_POSITIONS = ("pre", "post")
MLP_KINDS = ("gated", "plain", "moe")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LAYERS_AXIS = "layers"  # logical name of a scanned stack's leading param axis (replicated)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static hyperparameters of one block, shared by every layer of a stack (hashable).

    rope_theta: None = no rotary embedding (absolute positions are added before the stack).
    cross_attention: add a cross-attention sub-block reading `cross_input` [batch, ctx, dim_ctx].
    mlp: "gated" (SwiGLU family: gate/up/down), "plain" (fc1/fc2), "moe" (sparse experts).
    """

    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None  # None = num_heads
    head_dim: int | None = None  # None = dim // num_heads (taken from the input)
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_position: str = "pre"
    norm_affine: bool = True  # LayerNorm with learned scale/bias (False: neither; OPT's option)
    mlp: str = "gated"
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    cross_attention: bool = False
    dropout: float = 0.0  # residual dropout on each sub-block's output (training only)
    initializer_range: float = 0.02
    implementation: str | None = None  # mmjax.ops.attention implementation
    dtype: str = "float32"
    param_dtype: str = "float32"
    # MoE (mlp="moe")
    num_experts: int = 0
    experts_per_token: int = 2
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25
    router_noise: float = 0.0
    router_renormalize: bool = True
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001

    def __post_init__(self):
        for name, value, allowed in (("norm", self.norm, NORMS),
                                     ("norm_position", self.norm_position, NORM_POSITIONS),
                                     ("mlp", self.mlp, MLP_KINDS)):
            if value not in allowed:
                raise ConfigError(f"BlockSpec.{name}={value!r}; choose one of {', '.join(allowed)}")
        if not self.norm_affine and self.norm != "layer":
            raise ConfigError("BlockSpec.norm_affine=False needs norm='layer' (RMSNorm always "
                              "has a scale)")
        if self.mlp == "moe" and (self.num_experts < 1 or self.moe_dispatch not in DISPATCH_MODES):
            raise ConfigError("BlockSpec: mlp='moe' needs num_experts >= 1 and moe_dispatch in "
                              f"{', '.join(DISPATCH_MODES)}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


class Block(nn.Module):
    """One transformer block; see the module docstring. Called positionally (remat and scan
    need positional arguments):

        x, cache_kv = block(x, mask, segment_ids, positions, cross_input, cross_mask,
                            cache_kv, cache_index, causal, deterministic)

    x [batch, seq, dim]; mask bool broadcastable to [batch, heads, seq, kv_len] (or None);
    positions [batch, seq] (RoPE); cross_input [batch, ctx, dim_ctx] and cross_mask
    [batch, 1|heads, seq, ctx] for cross-attention; cache_kv (k, v) [batch, max_len, kv_heads,
    head_dim] and cache_index (next slot) for decoding; causal (bool) adds the causal mask;
    deterministic=False applies dropout (needs a "dropout" rng). Returns (x, new cache_kv or
    None).
    """

    spec: BlockSpec

    def _norm(self, name: str):
        s = self.spec
        dtype, pdtype = jnp.dtype(s.dtype), jnp.dtype(s.param_dtype)
        if s.norm == "rms":
            return RMSNorm(s.norm_eps, dtype, pdtype, name=name)
        return LayerNorm(s.norm_eps, use_bias=s.norm_affine, use_scale=s.norm_affine, dtype=dtype,
                         param_dtype=pdtype, name=name)

    @nn.compact
    def __call__(self, x, mask=None, segment_ids=None, positions=None, cross_input=None,
                 cross_mask=None, cache_kv=None, cache_index=None, causal=False,
                 deterministic=True):
        s = self.spec
        dtype, pdtype = jnp.dtype(s.dtype), jnp.dtype(s.param_dtype)
        init = nn.initializers.normal(s.initializer_range)
        head_dim = s.head_dim or x.shape[-1] // s.num_heads
        attn_kw = dict(num_heads=s.num_heads, head_dim=head_dim, qkv_bias=s.qkv_bias,
                       out_bias=s.out_bias, dtype=dtype, param_dtype=pdtype, kernel_init=init,
                       implementation=s.implementation)
        drop = nn.Dropout(s.dropout, deterministic=deterministic or s.dropout == 0.0)
        pre = s.norm_position == "pre"

        def residual(x, sublayer, norm_name):
            if pre:
                return constrain(x + drop(sublayer(self._norm(norm_name)(x))), BATCH_LEN_EMBED)
            return constrain(self._norm(norm_name)(x + drop(sublayer(x))), BATCH_LEN_EMBED)

        inv_freq = (None if s.rope_theta is None
                    else inverse_frequencies(head_dim, s.rope_theta, s.rope_scaling))
        new_cache = []

        def self_attention(h):
            out = Attention(num_kv_heads=s.kv_heads, name="attn", **attn_kw)(
                h, mask=mask, causal=causal, segment_ids=segment_ids, positions=positions,
                inv_freq=inv_freq, cache_kv=cache_kv, cache_index=cache_index)
            if cache_kv is not None:
                out, kv = out
                new_cache.append(kv)
            return out

        x = residual(x, self_attention, "attn_norm")
        if s.cross_attention:
            if cross_input is None:
                raise ConfigError(f"{self.name}: this block has cross-attention; pass cross_input")
            x = residual(x, lambda h: Attention(num_kv_heads=s.num_heads, name="cross_attn",
                                                **attn_kw)(h, cross_input, mask=cross_mask),
                         "cross_norm")

        def mlp(h):
            if s.mlp == "moe":
                return MoE(s.num_experts, s.experts_per_token, s.mlp_dim, s.activation,
                           s.moe_dispatch, s.capacity_factor, s.router_noise, s.router_renormalize,
                           s.aux_loss_weight, s.router_z_loss_weight, dtype, pdtype, init,
                           name="moe")(h, deterministic=deterministic)
            cls = GatedMLP if s.mlp == "gated" else MLP
            return cls(s.mlp_dim, s.activation, s.mlp_bias, dtype, pdtype, init, name="mlp")(h)

        x = residual(x, mlp, "mlp_norm")
        return x, (new_cache[0] if new_cache else None)


_POLICIES = {
    "full": None,  # save nothing
    "dots": "checkpoint_dots",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}


def remat_policy(name: str | bool):
    """(use remat, jax checkpoint policy or None) for a policy name (True = "full")."""
    if name is True:
        name = "full"
    if name in (False, None, "none"):
        return False, None
    if name not in _POLICIES:
        raise ConfigError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    attr = _POLICIES[name]
    return True, (None if attr is None else getattr(jax.checkpoint_policies, attr))


def check_remat_policy(who: str, policy: str) -> None:
    """ConfigError unless `policy` is a remat policy a `remat=True` config can name."""
    if policy not in REMAT_POLICIES[1:]:
        raise ConfigError(f"{who}.remat_policy {policy!r}"
                          f"{closest_name(str(policy), REMAT_POLICIES[1:])}; "
                          f"choose one of {', '.join(REMAT_POLICIES[1:])}")


class _ScanBody(nn.Module):
    """Block in the (carry, xs) -> (carry, ys) form nn.scan needs: the residual stream is the
    carry; each layer's K/V cache slice comes in as xs and goes out as ys with its output."""

    spec: BlockSpec
    remat: Any = "none"

    @nn.compact
    def __call__(self, x, layer_cache, mask, segment_ids, positions, cross_input, cross_mask,
                 cache_index, keep_hidden, causal, deterministic):
        x, kv = block_class(self.remat, prevent_cse=False)(self.spec, name="block")(
            x, mask, segment_ids, positions, cross_input, cross_mask, layer_cache, cache_index,
            causal, deterministic)
        return x, (x if keep_hidden else None, kv)


def block_class(remat: Any, prevent_cse: bool = True):
    """`Block`, or `Block` under `nn.remat` with the named policy (also used by `mmjax.nn.mod`)."""
    use, policy = remat_policy(remat)
    if not use:
        return Block
    # causal and deterministic (args 9 and 10, counting self) are Python bools: static
    return nn.remat(Block, policy=policy, prevent_cse=prevent_cse, static_argnums=(9, 10))


def make_layers(spec: BlockSpec, num_layers: int, *, scan: bool = False, remat: Any = "none",
                name: str = "layers"):
    """The blocks of a stack, to create in a module's `setup` (assign to an attribute) or
    inside an `nn.compact` method: a list of `num_layers` Blocks named `{name}_{i}`, or (scan)
    one scanned block named `name` with params stacked over a leading [num_layers] axis."""
    if num_layers < 1:
        raise ConfigError(f"a transformer stack needs num_layers >= 1, got {num_layers}")
    remat_policy(remat)  # validate the name
    if not scan:
        cls = block_class(remat)
        return [cls(spec, name=f"{name}_{i}") for i in range(num_layers)]
    scanned = nn.scan(
        _ScanBody,
        variable_axes={"params": 0, "losses": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * 9,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
    )
    return scanned(spec, remat, name=name)


def run_layers(layers, x: jax.Array, *, mask=None, segment_ids=None, positions=None,
               cross_input=None, cross_mask=None, cache_kv=None, cache_index=None,
               causal: bool = False, deterministic: bool = True, keep_hidden: bool = True,
               layer_hook=None):
    """Run the stack from `make_layers` over x [batch, seq, dim].

    layer_hook: `hook(i, x) -> x`, called before block i (i = 0 .. n-1) and once after the
      last (i = n): what runs between a frozen stack's layers (Flamingo's gated
      cross-attention). Loop stacks only; `hidden_states` stay the blocks' own outputs.

    keep_hidden: return every block's output (a scanned stack otherwise keeps none, saving a
    [num_layers, batch, seq, dim] buffer; a loop stack's are free).
    cache_kv: None, or (`KVCache.k`, `KVCache.v`) for decoding: per-layer tuples, or for a
      scanned stack preferably the stacked [num_layers, ...] arrays (`KVCache.create(...,
      stacked=True)`), which the scan updates without copying; returned in the form given.
    Returns (x, hidden_states: tuple of each block's output (() when a scanned stack was told not
    to keep them), the new (k, v) or None).
    """
    if isinstance(layers, (list, tuple)):
        hidden, new_k, new_v = [], [], []
        for i, block in enumerate(layers):
            if layer_hook is not None:
                x = layer_hook(i, x)
            kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
            x, kv = block(x, mask, segment_ids, positions, cross_input, cross_mask, kv, cache_index,
                          causal, deterministic)
            hidden.append(x)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        if layer_hook is not None:
            x = layer_hook(len(layers), x)
        if cache_kv is None:
            return x, tuple(hidden), None
        if isinstance(cache_kv[0], (tuple, list)):
            return x, tuple(hidden), (tuple(new_k), tuple(new_v))
        return x, tuple(hidden), (jnp.stack(new_k), jnp.stack(new_v))  # in the form given
    if layer_hook is not None:
        raise ConfigError("a layer hook (work between the layers, e.g. Flamingo's gated "
                          "cross-attention) needs an unscanned stack: set scan_layers=False")
    per_layer = cache_kv is not None and isinstance(cache_kv[0], (tuple, list))
    stacked = cache_kv
    if per_layer:  # a per-layer cache given to a scanned stack: stack it (a copy per call)
        stacked = (jnp.stack(cache_kv[0]), jnp.stack(cache_kv[1]))
    x, (hidden, kv) = layers(x, stacked, mask, segment_ids, positions, cross_input, cross_mask,
                             cache_index, keep_hidden, causal, deterministic)
    hidden = () if hidden is None else tuple(hidden[i] for i in range(hidden.shape[0]))
    if per_layer:
        n = kv[0].shape[0]
        kv = (tuple(kv[0][i] for i in range(n)), tuple(kv[1][i] for i in range(n)))
    return x, hidden, kv


# --- the two param layouts ---------------------------------------------------------------------

def stack_layer_params(tree: Mapping[str, Any], name: str = "layers") -> dict[str, Any]:
    """Loop layout -> scan layout: every dict holding `{name}_0 .. {name}_{n-1}` gets one entry
    `{name}` whose leaves are the layers' leaves stacked on a new leading axis (numpy or jax)."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)$")
    if not isinstance(tree, Mapping):
        return tree
    out: dict[str, Any] = {}
    layers: dict[int, Any] = {}
    for key, value in tree.items():
        m = pattern.match(key)
        if m:
            layers[int(m.group(1))] = value
        else:
            out[key] = stack_layer_params(value, name)
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ConfigError(f"layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
        blocks = [layers[i] for i in range(len(layers))]
        xp = np if all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(blocks)) else jnp
        out[name] = {"block": jax.tree_util.tree_map(lambda *xs: xp.stack(xs), *blocks)}
    return out


def unstack_layer_params(tree: Mapping[str, Any], name: str = "layers") -> dict[str, Any]:
    """Scan layout -> loop layout (the inverse of `stack_layer_params`)."""
    if not isinstance(tree, Mapping):
        return tree
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == name and isinstance(value, Mapping) and set(value) == {"block"}:
            leaves = jax.tree_util.tree_leaves(value["block"])
            n = leaves[0].shape[0]
            for i in range(n):
                out[f"{name}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], value["block"])
        else:
            out[key] = unstack_layer_params(value, name)
    return out


def is_scanned(tree: Mapping[str, Any], name: str = "layers") -> bool:
    """Whether any dict in `tree` holds a scanned stack `{name: {"block": ...}}`."""
    if not isinstance(tree, Mapping):
        return False
    for key, value in tree.items():
        if key == name and isinstance(value, Mapping) and set(value) == {"block"}:
            return True
        if is_scanned(value, name):
            return True
    return False


def _scanned_here(tree: Mapping[str, Any], name: str) -> bool:
    value = tree.get(name)
    return isinstance(value, Mapping) and set(value) == {"block"}


def match_layer_layout(params: Mapping[str, Any], target: Mapping[str, Any],
                       name: str = "layers") -> dict[str, Any]:
    """`params` in the layer layout (loop or scan) of `target` (e.g. a module's abstract
    params), stack by stack: converted checkpoints load into scanned and unscanned models
    alike, and a two-tower model may scan one tower and loop the other."""
    if not isinstance(params, Mapping) or not isinstance(target, Mapping):
        return params
    pattern = re.compile(rf"^{re.escape(name)}_\d+$")
    layer_keys = [k for k in params if pattern.match(k)]
    out: dict[str, Any] = dict(params)
    if _scanned_here(target, name) and layer_keys:  # loop -> scan at this level
        for k in layer_keys:
            del out[k]
        out[name] = stack_layer_params({k: params[k] for k in layer_keys}, name)[name]
    elif _scanned_here(params, name) and f"{name}_0" in target:  # scan -> loop at this level
        del out[name]
        out.update(unstack_layer_params({name: params[name]}, name))
    for key, value in list(out.items()):
        if key in target and not (key == name and _scanned_here(out, name)):
            out[key] = match_layer_layout(value, target[key], name)
    return out
