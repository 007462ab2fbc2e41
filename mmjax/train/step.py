"""The loss, the jit-compiled train step (with micro-batch accumulation) and the eval step.

A batch is a dict of [batch, seq] arrays: `inputs`, `targets` (inputs shifted by one),
`segment_ids` (packed documents; no attention across them), `positions` (restart per
document) and `loss_mask` (1 where a target counts).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.parallel.rules import DEFAULT_RULES
from mmjax.train.state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def lm_loss_sums(
    model: nn.Module, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over counted targets, number of counted targets), float32 [].

    With `dropout_rng` the model runs in training mode (its config's dropout applies)."""
    train = dropout_rng is not None and getattr(model.config, "dropout", 0.0) > 0.0
    logits = model.apply(
        {"params": params}, batch["inputs"],
        positions=batch["positions"], segment_ids=batch["segment_ids"],
        **({"deterministic": False, "rngs": {"dropout": dropout_rng}} if train else {}),
    )  # [batch, seq, vocab] float32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, *,
    grad_accum_steps: int = 1, mesh: Mesh | None = None, shardings: TrainState | None = None,
    rules=DEFAULT_RULES,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, jitted, the state's buffers donated.

    The gradient is that of the mean NLL over all counted tokens of the whole batch; with
    `grad_accum_steps > 1` the batch is split into that many micro-batches along axis 0 and
    scanned, summing per-token gradients, so the result equals the one big-batch step.
    """

    def grads_of(params, batch, rng):
        def f(p, b, r):
            total, count = lm_loss_sums(model, p, b, r)
            return total, count

        if grad_accum_steps == 1:
            (total, count), grads = jax.value_and_grad(f, has_aux=True)(params, batch, rng)
            return total, count, grads

        def split(x):
            return x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:])

        micro = jax.tree_util.tree_map(split, batch)

        def body(carry, xs):
            total_acc, count_acc, g_acc = carry
            mb, i = xs
            (total, count), g = jax.value_and_grad(f, has_aux=True)(
                params, mb, jax.random.fold_in(rng, i))
            return (total_acc + total, count_acc + count,
                    jax.tree_util.tree_map(jnp.add, g_acc, g)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (total, count, grads), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
            (micro, jnp.arange(grad_accum_steps)),
        )
        return total, count, grads

    def step(state: TrainState, batch: Batch):
        rng, dropout_rng = jax.random.split(state.rng)
        total, count, grads = grads_of(state.params, batch, dropout_rng)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": total / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": count,
        }
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    batch_sh = batch_sharding(mesh)
    repl = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step, donate_argnums=(0,),
        in_shardings=(shardings, {k: batch_sh for k in BATCH_KEYS}),
        out_shardings=(shardings, repl),
    )

    def run_in_mesh(state, batch):
        with mesh, nn.logical_axis_rules(rules):
            return jitted(state, batch)

    return run_in_mesh


def make_eval_step(
    model: nn.Module, *, mesh: Mesh | None = None, rules=DEFAULT_RULES,
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """`eval_step(params, batch) -> (sum NLL, counted tokens)`, jitted."""

    def f(params, batch):
        return lm_loss_sums(model, params, batch)

    if mesh is None:
        return jax.jit(f)
    jitted = jax.jit(f)

    def run_in_mesh(params, batch):
        with mesh, nn.logical_axis_rules(rules):
            return jitted(params, shard_batch(batch, mesh))

    return run_in_mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ("data", "fsdp"); sequence and the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def shard_batch(batch: dict[str, Any], mesh: Mesh | None) -> Batch:
    """Put a host batch (numpy) on the devices, rows split over ("data", "fsdp")."""
    batch = {k: batch[k] for k in BATCH_KEYS}
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}
