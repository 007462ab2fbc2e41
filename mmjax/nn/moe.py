"""Sparse Mixture-of-Experts feed-forward layer (Switch / Mixtral style), with expert parallelism.

    moe = MoE(num_experts=8, experts_per_token=2, hidden_dim=1024)
    y = moe.apply({"params": p}, x)                               # x, y: [batch, seq, embed]
    y, aux = moe.apply({"params": p}, x, mutable=["losses"])      # + weighted auxiliary losses

Each expert is a SwiGLU MLP `down(act(x gate_e) * (x up_e))`. Routing: router logits `x W_g`
(float32), probabilities `softmax`, the top-k experts per token (k = 1, 2, ...), their weights
the top-k probabilities (renormalised to sum to 1 when `renormalize`, Mixtral's rule; with
k = 1 keep `renormalize=False`, Switch's rule, or the router gets no gradient from the task
loss). In training (`deterministic=False`, needs a "dropout" rng) `router_noise` > 0 multiplies
the router's input by uniform noise in [1 - router_noise, 1 + router_noise] (Switch's jitter).

Auxiliary losses, sown (already weighted) into the "losses" collection, for the objective to add
(`aux_losses` collects them; `mmjax.tasks.lm` adds them to the training loss):
  moe_load_balance  aux_loss_weight * E * sum_e f_e P_e: f_e the fraction of the k*tokens
                    assignments that went to expert e, P_e the mean router probability of e
                    (Switch eq. 4-6 as Hugging Face's Mixtral computes it: k at perfect balance,
                    1 for k = 1; per layer, and averaged over layers by `aux_losses`).
  moe_router_z      z_loss_weight * mean_tokens logsumexp(logits)^2 (ST-MoE).

Two execution paths:
  "dropless"  sort the (token, choice) assignments by expert and run each expert on its group
              with a grouped matmul (`jax.lax.ragged_dot`; on CPU XLA lowers it to a masked dense
              product, on GPU/TPU to a grouped GEMM). No token is ever dropped.
  "capacity"  every expert takes at most C = ceil(capacity_factor * tokens * k / E) assignments,
              first choices before second choices, in token order; the rest are dropped: they
              contribute nothing, so a token whose choices are all dropped passes through the
              residual connection unchanged. Fixed shapes ([E, C, embed] buffers, einsums).

Expert parallelism: when the current logical-axis rules map `expert` to mesh axes of more than
one device (inside `mmjax.parallel.activate`), the expert weights stay sharded over those axes
and the layer runs under `jax.shard_map`: each device routes its own tokens (tokens split over
the batch axes and the expert axes), packs them into per-expert buffers of C slots, sends each
expert's buffer to the device holding it with `lax.all_to_all`, runs its local experts and sends
the results back with a second `all_to_all`. Router and attention weights are shared. Capacity is
then counted per source device (C from its own tokens); with "dropless" each device reserves room
for all its tokens at every expert (C = its token count), so nothing is dropped and the result
equals the unsharded layer.

Params: router [embed, E] ("embed", "router"); gate, up [E, embed, mlp] ("expert", "embed",
"mlp"); down [E, mlp, embed] ("expert", "mlp", "embed").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.errors import ConfigError
from mmjax.nn.mlp import get_activation

DISPATCH_MODES = ("dropless", "capacity")
LOSS_COLLECTION = "losses"


# --- routing -------------------------------------------------------------------------------

def route(logits: jax.Array, k: int, renormalize: bool = True
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [tokens, E] -> (probs [tokens, E] float32, weights [tokens, k], experts [tokens, k]
    int32), experts in descending probability order."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def load_balance_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e (see the module docstring); probs [tokens, E], experts [tokens, k]."""
    num_experts = probs.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1))
    f = counts / experts.shape[0]
    p = jnp.mean(probs, axis=0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """mean over tokens of logsumexp(logits)^2; logits [tokens, E]."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * tokens * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def slot_positions(experts: jax.Array, num_experts: int) -> jax.Array:
    """Each assignment's slot in its expert's buffer: [tokens, k] int32. All first choices are
    placed before any second choice (Switch / GShard priority), each in token order."""
    n, k = experts.shape
    onehot = jax.nn.one_hot(experts.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*n, E]
    before = jnp.cumsum(onehot, axis=0) - onehot
    return jnp.sum(before * onehot, axis=-1).reshape(k, n).T


def aux_losses(collections: Any) -> dict[str, jax.Array]:
    """{name: mean over the layers that sowed it} from a `mutable=["losses"]` apply's second
    output (or its "losses" entry); {} when nothing was sown. A scanned stack sows one
    [num_layers] array per name: its elements count as layers."""
    tree = collections.get(LOSS_COLLECTION, collections) if hasattr(collections, "get") else {}
    sums: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [getattr(k, "key", None) for k in path]
        name = next((n for n in reversed(names) if isinstance(n, str)), None)
        if name is not None:
            sums.setdefault(name, []).append(jnp.ravel(jnp.asarray(leaf, jnp.float32)))
    return {name: jnp.mean(jnp.concatenate(vals)) for name, vals in sums.items()}


# --- expert computation ----------------------------------------------------------------------

def _ffn(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, act: Callable
         ) -> jax.Array:
    """Stacked SwiGLU experts on per-expert buffers: x [..., E, C, embed] -> same shape."""
    g = jnp.einsum("...xce,xem->...xcm", x, gate)
    u = jnp.einsum("...xce,xem->...xcm", x, up)
    return jnp.einsum("...xcm,xme->...xce", act(g) * u, down)


def dropless(x, experts, weights, gate, up, down, act) -> jax.Array:
    """Sort assignments by expert, grouped matmuls (`ragged_dot`), unsort, weight, sum.
    x [n, embed], experts/weights [n, k] -> [n, embed]."""
    n, k = experts.shape
    num_experts = gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[order // k]  # [n*k, embed], grouped by expert
    h = act(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(h, down, sizes)
    y = ys[jnp.argsort(order)].reshape(n, k, -1)
    return jnp.einsum("nke,nk->ne", y, weights.astype(y.dtype))


def _dispatch(x, experts, pos, num_experts, slots) -> jax.Array:
    """Scatter tokens into [E, slots, embed] buffers; assignments with pos >= slots drop out."""
    n, k = experts.shape
    buf = jnp.zeros((num_experts, slots, x.shape[-1]), x.dtype)
    src = jnp.broadcast_to(x[:, None, :], (n, k, x.shape[-1]))
    return buf.at[experts, pos].set(src, mode="drop")


def _combine(buf, experts, pos, weights, slots) -> jax.Array:
    """Gather each assignment's result from [E, slots, embed] and sum with its weight (dropped
    assignments count zero). -> [n, embed]"""
    y = buf.at[experts, pos].get(mode="fill", fill_value=0)  # [n, k, embed]
    kept = (pos < slots).astype(y.dtype)
    return jnp.einsum("nke,nk->ne", y, weights.astype(y.dtype) * kept)


def with_capacity(x, experts, weights, gate, up, down, act, slots: int) -> jax.Array:
    """Capacity path on one device: x [n, embed] -> [n, embed] (overflowing assignments dropped)."""
    num_experts = gate.shape[0]
    pos = slot_positions(experts, num_experts)
    buf = _ffn(_dispatch(x, experts, pos, num_experts, slots), gate, up, down, act)
    return _combine(buf, experts, pos, weights, slots)


def expert_parallel(x, experts, weights, gate, up, down, act, *, mesh, token_axes, expert_axes,
                    dispatch: str, capacity_factor: float) -> jax.Array:
    """`shard_map` over `mesh`: tokens split over `token_axes`, experts over `expert_axes`;
    all-to-all to the experts' devices and back. x [N, embed] -> [N, embed]."""
    num_experts = gate.shape[0]
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    k = experts.shape[1]

    def body(x, experts, weights, gate, up, down):
        n = x.shape[0]
        slots = n if dispatch == "dropless" else capacity(n, k, num_experts, capacity_factor)
        pos = slot_positions(experts, num_experts)
        buf = _dispatch(x, experts, pos, num_experts, slots)  # [E, C, embed]
        buf = buf.reshape(ep, num_experts // ep, slots, -1)
        buf = jax.lax.all_to_all(buf, expert_axes, 0, 0)  # [source, local E, C, embed]
        buf = _ffn(buf, gate, up, down, act)
        buf = jax.lax.all_to_all(buf, expert_axes, 0, 0)  # back: [expert shard, local E, C, e]
        return _combine(buf.reshape(num_experts, slots, -1), experts, pos, weights, slots)

    tok = P(token_axes)
    wspec = P(expert_axes)
    return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec),
                         out_specs=tok)(x, experts, weights, gate, up, down)


def _expert_mesh() -> tuple[Any, tuple[str, ...], tuple[str, ...]] | None:
    """(mesh, token axes, expert axes) when the current mesh + rules shard `expert` over more
    than one device; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None

    def axes(name):
        a = nn.logical_to_mesh_axes((name,), rules)[0]
        return () if a is None else (a,) if isinstance(a, str) else tuple(a)

    expert_axes = tuple(a for a in axes("expert") if mesh.shape[a] > 1)
    if not expert_axes:
        return None
    batch = tuple(a for a in axes("act_batch") if mesh.shape[a] > 1 and a not in expert_axes)
    return mesh, batch + expert_axes, expert_axes


# --- the layer -------------------------------------------------------------------------------

class MoE(nn.Module):
    """Sparse MoE of SwiGLU experts; see the module docstring. x [batch, seq, embed] -> same."""

    num_experts: int
    experts_per_token: int
    hidden_dim: int
    activation: str = "silu"
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    router_noise: float = 0.0
    renormalize: bool = True
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.dispatch not in DISPATCH_MODES:
            raise ConfigError(f"MoE dispatch {self.dispatch!r} unknown; choose one of "
                              f"{', '.join(DISPATCH_MODES)}")
        e, m, n_exp, k = x.shape[-1], self.hidden_dim, self.num_experts, self.experts_per_token
        if not 1 <= k <= n_exp:
            raise ConfigError(f"MoE: experts_per_token={k} must be in [1, num_experts={n_exp}]")
        init = self.kernel_init
        router = self.param("router", nn.with_logical_partitioning(init, ("embed", "router")),
                            (e, n_exp), self.param_dtype)
        gate = self.param("gate", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")),
                          (n_exp, e, m), self.param_dtype)
        up = self.param("up", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")),
                        (n_exp, e, m), self.param_dtype)
        down = self.param("down", nn.with_logical_partitioning(init, ("expert", "mlp", "embed")),
                          (n_exp, m, e), self.param_dtype)

        shape = x.shape
        x = x.reshape(-1, e).astype(self.dtype)  # [tokens, embed]
        r_in = x.astype(jnp.float32)
        if self.router_noise > 0 and not deterministic:
            noise = jax.random.uniform(self.make_rng("dropout"), r_in.shape, jnp.float32,
                                       1.0 - self.router_noise, 1.0 + self.router_noise)
            r_in = r_in * noise
        logits = r_in @ router.astype(jnp.float32)  # [tokens, E]
        probs, weights, experts = route(logits, k, self.renormalize)
        self.sow(LOSS_COLLECTION, "moe_load_balance",
                 self.aux_loss_weight * load_balance_loss(probs, experts))
        self.sow(LOSS_COLLECTION, "moe_router_z", self.z_loss_weight * router_z_loss(logits))

        act = get_activation(self.activation)
        gate, up, down = (w.astype(self.dtype) for w in (gate, up, down))
        sharded = _expert_mesh()
        if sharded is not None:
            mesh, token_axes, expert_axes = sharded
            ep = math.prod(mesh.shape[a] for a in expert_axes)
            if n_exp % ep:
                raise ConfigError(
                    f"MoE: num_experts={n_exp} is not divisible by mesh axis "
                    f"{'x'.join(expert_axes)!r} (size {ep}); use an expert axis size dividing "
                    f"{n_exp} or a multiple of {ep} experts")
            ways = math.prod(mesh.shape[a] for a in token_axes)
            if x.shape[0] % ways:
                raise ConfigError(
                    f"MoE: {x.shape[0]} tokens cannot be split over mesh axes "
                    f"{'x'.join(token_axes)} ({ways} devices); make batch x seq a multiple of "
                    f"{ways}")
            y = expert_parallel(x, experts, weights, gate, up, down, act, mesh=mesh,
                                token_axes=token_axes, expert_axes=expert_axes,
                                dispatch=self.dispatch, capacity_factor=self.capacity_factor)
        elif self.dispatch == "dropless":
            y = dropless(x, experts, weights, gate, up, down, act)
        else:
            slots = capacity(x.shape[0], k, n_exp, self.capacity_factor)
            y = with_capacity(x, experts, weights, gate, up, down, act, slots)
        return y.reshape(shape).astype(self.dtype)
