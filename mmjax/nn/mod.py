"""Mixture-of-Depths (Raposo et al. 2024): a routed block processes only the top-k tokens of each
sequence; the others pass through it unchanged on the residual stream.

    layers = make_mod_layers(spec, num_layers=4, capacity=0.125, every=2)   # in setup
    x, hidden, kv, routed = run_mod_layers(layers, x, valid=valid, mask=mask, causal=True,
                                           positions=pos, routing="topk")

Routed block (`MoDBlock`, layers i with i % every == every - 1: every other block for every=2):
  logits = x . w_router + b  (params `router/{kernel [embed, 1], bias [1]}`, logical axes
               ("embed", "router"); the bias lets the router BCE place the 0.5 threshold at the
               capacity quantile)
  "topk"       (training, full-sequence forward): per row the k = ceil(capacity * seq) valid
               tokens with the largest logits; padding (input_mask False / segment id 0) is
               never routed (a row with fewer than k valid tokens routes all of them). The k
               tokens are gathered in their original order, so causal attention among them stays
               causal; RoPE sees their original positions, packed-document segment ids and the
               caller's mask (built by `mmjax.ops.masks`) are gathered with them. The block runs
               on the [batch, k, dim] gather only (this is where the FLOPs are saved).
  "predictor"  (causal inference, decoding with a KV cache): a token is routed iff
               sigmoid(logit) > 0.5, a per-token decision that needs no future tokens. The block
               runs on every token, but its keys are restricted to routed tokens (a token that
               skips the block is not a key there; with a cache its slot is marked not-routed in
               `KVCache.routed` so later tokens never attend to it) and the outputs of unrouted
               tokens are thrown away. A full forward in "predictor" mode and prefill + decode
               give the same logits.
  Routed tokens get x + r * f(x), f(x) = block(x) - x the block's residual branches (attention
  and MLP); unrouted tokens are returned bit-identical (scattered around, never recomputed).

The router weight is r = sigmoid(logit), not the raw logit the paper multiplies by: it is
bounded (a large logit cannot blow up the block's contribution, which matters in bf16), it is
0.5 at initialisation so the routed blocks start at half strength instead of near zero, the
top-k order is the same as the logits', and the same logit then is the predictor's
probability for the causal decision (sigmoid(logit) > 0.5), so one router serves both.
The router gets gradient from the task loss through r.

Causal decoding ("auxiliary loss" option of the paper): `mod_router_bce` = aux_weight * mean
over valid tokens of BCE(sigmoid(x_sg . w_router), in_top_k) with x_sg = stop_gradient(x): it
teaches the router's sign to predict the top-k decision without pulling the residual stream.
It is sown, already weighted, into the "losses" collection (`mmjax.nn.moe.aux_losses` collects
it and `mmjax.tasks.lm` adds it to the training loss, as for MoE). Routing statistics go to the
"intermediates" collection: `mod_routed` (tokens processed per row, [batch]) and, in "topk"
mode, `mod_agreement` (fraction of valid tokens whose predictor decision equals the top-k one).

Loop stacks only (no nn.scan: routed and dense blocks differ), no cross-attention.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.errors import ConfigError, InputError
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.moe import LOSS_COLLECTION
from mmjax.nn.transformer import BlockSpec, block_class

ROUTING_MODES = ("topk", "predictor")


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """k = ceil(capacity * seq_len), at least 1 and at most seq_len."""
    return min(seq_len, max(1, math.ceil(capacity * seq_len - 1e-9)))


def is_routed(i: int, every: int) -> bool:
    """Whether layer i is a routed block (every=2: layers 1, 3, 5, ...)."""
    return i % every == every - 1


def top_k_route(logits: jax.Array, valid: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """logits, valid [batch, seq] -> (indices [batch, k] int32 in increasing order, ok [batch, k]
    bool: False where a row had fewer than k valid tokens and the slot holds padding)."""
    scores = jnp.where(valid, logits.astype(jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(scores, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    ok = jnp.take_along_axis(valid, idx, axis=1)
    return idx, ok


def _gather_mask(mask: jax.Array | None, idx: jax.Array, batch: int, seq: int):
    """A mask broadcastable to [batch, heads, seq, seq] restricted to the routed queries and keys
    idx [batch, k] -> [batch, heads|1, k|1, k]."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    mask = jnp.broadcast_to(mask, (batch,) + mask.shape[1:3] + (seq,))
    mask = jnp.take_along_axis(mask, idx[:, None, None, :], axis=3)
    if mask.shape[2] > 1:
        mask = jnp.take_along_axis(mask, idx[:, None, :, None], axis=2)
    return mask


class MoDBlock(nn.Module):
    """A routed `Block` (params `router`, `block/...`); see the module docstring. Call:

        x, cache_kv, routed_cache = mod_block(x, mask, segment_ids, positions, cache_kv,
            cache_index, causal, deterministic, valid, routed_cache, routing)

    valid [batch, seq] bool (False = padding, never routed); routed_cache [batch, max_len] bool
    (decoding: which cache slots this block's K/V hold for real) or None.
    """

    spec: BlockSpec
    capacity: float
    aux_weight: float = 0.01
    remat: Any = "none"

    def setup(self):
        s = self.spec
        self.router = DenseGeneral(1, ("embed", "router"), use_bias=True, dtype=jnp.float32,
                                   param_dtype=jnp.dtype(s.param_dtype),
                                   kernel_init=nn.initializers.normal(s.initializer_range),
                                   name="router")
        self.block = block_class(self.remat)(s, name="block")

    def __call__(self, x, mask, segment_ids, positions, cache_kv, cache_index, causal,
                 deterministic, valid, routed_cache=None, routing="topk"):
        if routing not in ROUTING_MODES:
            raise ConfigError(f"MoD routing {routing!r}; choose one of {', '.join(ROUTING_MODES)}")
        b, t = x.shape[:2]
        logits = self.router(x.astype(jnp.float32))[..., 0]  # [batch, seq] float32
        sg_logits = self.router(jax.lax.stop_gradient(x).astype(jnp.float32))[..., 0]
        vf = valid.astype(jnp.float32)
        n_valid = jnp.maximum(jnp.sum(vf), 1.0)
        predicted = (logits > 0) & valid

        if routing == "topk":
            if cache_kv is not None:
                raise InputError("MoD: decoding with a KV cache needs routing='predictor' (top-k "
                                 "over the sequence is not causal)")
            k = capacity_tokens(self.capacity, t)
            idx, ok = top_k_route(logits, valid, k)
            rows = jnp.arange(b)[:, None]
            chosen = jnp.zeros((b, t), bool).at[rows, idx].set(ok)
            bce = optax.sigmoid_binary_cross_entropy(sg_logits, chosen.astype(jnp.float32))
            self.sow(LOSS_COLLECTION, "mod_router_bce",
                     self.aux_weight * jnp.sum(bce * vf) / n_valid)
            self.sow("intermediates", "mod_routed", jnp.sum(ok, axis=1))
            self.sow("intermediates", "mod_agreement",
                     jnp.sum((predicted == chosen) * vf) / n_valid)
            x_sel = jnp.take_along_axis(x, idx[..., None], axis=1)
            pos_sel = None if positions is None else jnp.take_along_axis(positions, idx, axis=1)
            seg_sel = (None if segment_ids is None
                       else jnp.take_along_axis(segment_ids, idx, axis=1))
            y_sel, _ = self.block(x_sel, _gather_mask(mask, idx, b, t), seg_sel, pos_sel, None,
                                  None, None, None, causal, deterministic)
            r = jax.nn.sigmoid(jnp.take_along_axis(logits, idx, axis=1))[..., None]
            out_sel = x_sel + (r * (y_sel - x_sel).astype(jnp.float32)).astype(x.dtype)
            out_sel = jnp.where(ok[..., None], out_sel, x_sel)
            return x.at[rows, idx].set(out_sel), None, None

        # "predictor": causal per-token decisions; keys restricted to routed tokens
        self.sow("intermediates", "mod_routed", jnp.sum(predicted, axis=1))
        if cache_kv is not None:
            routed_cache = jax.lax.dynamic_update_slice(routed_cache, predicted, (0, cache_index))
            kv_routed = routed_cache
            q_slots = cache_index + jnp.arange(t)
        else:
            kv_routed = predicted
            q_slots = jnp.arange(t)
        own = q_slots[:, None] == jnp.arange(kv_routed.shape[1])[None, :]  # [seq, kv_len]
        # each query also sees its own slot: an unrouted query (output discarded) never has an
        # empty row
        keys = kv_routed[:, None, None, :] | own[None, None]
        block_mask = keys if mask is None else (mask.astype(bool) & keys)
        y, new_kv = self.block(x, block_mask, segment_ids, positions, None, None, cache_kv,
                               cache_index, causal, deterministic)
        r = jax.nn.sigmoid(logits)[..., None]
        out = x + (r * (y - x).astype(jnp.float32)).astype(x.dtype)
        return jnp.where(predicted[..., None], out, x), new_kv, routed_cache


def make_mod_layers(spec: BlockSpec, num_layers: int, *, capacity: float, every: int = 2,
                    aux_weight: float = 0.01, remat: Any = "none", name: str = "layers"):
    """`num_layers` blocks named `{name}_{i}`: a `MoDBlock` where `is_routed(i, every)`, else a
    plain `Block` (the same params as a dense stack's)."""
    if not 0.0 < capacity <= 1.0:
        raise ConfigError(f"MoD capacity must be in (0, 1], got {capacity}")
    if every < 1:
        raise ConfigError(f"MoD every must be >= 1, got {every}")
    if spec.cross_attention:
        raise ConfigError("MoD blocks do not support cross-attention")
    out = []
    for i in range(num_layers):
        if is_routed(i, every):
            out.append(MoDBlock(spec, capacity, aux_weight, remat, name=f"{name}_{i}"))
        else:
            out.append(block_class(remat)(spec, name=f"{name}_{i}"))
    return out


def run_mod_layers(layers, x: jax.Array, *, valid: jax.Array, mask=None, segment_ids=None,
                   positions=None, cache_kv=None, cache_index=None, routed_cache=None,
                   causal: bool = False, deterministic: bool = True, routing: str = "topk",
                   layer_hook=None):
    """`mmjax.nn.transformer.run_layers` for a stack from `make_mod_layers`. valid [batch, seq]
    bool (False: padding); cache_kv per-layer (k, v) tuples; routed_cache per-layer
    [batch, max_len] bool (`KVCache.routed`). Returns (x, hidden_states, new (k, v) or None,
    new routed_cache or None)."""
    hidden, new_k, new_v, new_r = [], [], [], []
    for i, block in enumerate(layers):
        if layer_hook is not None:
            x = layer_hook(i, x)
        kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
        rc = None if routed_cache is None else routed_cache[i]
        if isinstance(block, MoDBlock):
            x, kv, rc = block(x, mask, segment_ids, positions, kv, cache_index, causal,
                              deterministic, valid, rc, routing)
        else:
            x, kv = block(x, mask, segment_ids, positions, None, None, kv, cache_index, causal,
                          deterministic)
        hidden.append(x)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
        new_r.append(rc)
    if layer_hook is not None:
        x = layer_hook(len(layers), x)
    if cache_kv is None:
        return x, tuple(hidden), None, None
    return x, tuple(hidden), (tuple(new_k), tuple(new_v)), (
        None if routed_cache is None else tuple(new_r))


def flops_per_token(num_layers: int, dim: int, mlp_dim: int, num_heads: int, kv_heads: int,
                    head_dim: int, vocab: int, seq_len: int, capacity: float | None = None,
                    every: int = 2) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6 x the matmul params each
    token goes through (attention projections, SwiGLU, the LM head) + 6 x seq x heads x head_dim
    for causal attention scores and values (half of the 2 x 2 x seq x ... dense product,
    forward; x3). A routed block sees capacity x seq tokens: its matmuls count capacity x, its
    attention capacity^2 x (k queries over k keys), plus the router (2 x dim, twice)."""
    attn_params = dim * head_dim * (2 * num_heads + 2 * kv_heads)
    layer = 6 * (attn_params + 3 * dim * mlp_dim)
    attn = 6 * seq_len * num_heads * head_dim
    total = 6.0 * dim * vocab
    for i in range(num_layers):
        if capacity is not None and is_routed(i, every):
            total += capacity * layer + capacity ** 2 * attn + 2 * 6 * dim
        else:
            total += layer + attn
    return total
