"""The jit-compiled train step (with micro-batch accumulation) and eval step, for any loss.

A loss function has the form

    loss_fn(params, batch, rng) -> (total, count, aux)

`total` is a float32 [] sum of per-example (or per-token) losses, `count` how many counted
([] float32; for a loss that is already a mean, return (loss, 1.0)), `aux` a dict of float32
[] metrics (averaged over micro-batches). `rng` is a PRNG key in training (dropout, noise) and
None in evaluation. Writing the loss as (sum, count) makes gradient accumulation and batch
sharding exact: the step's gradient is that of `sum(total) / sum(count)` over the whole batch.

A task with its own state (`TrainState.task_state`, see `mmjax.train.state`) trains with a
stateful loss instead:

    state_loss_fn(params, task_state, batch, rng) -> (total, count, aux, new_task_state)

The step differentiates `total` with respect to `params` only and stores `new_task_state`
(gradients stopped) in the next state; evaluation keeps the plain `loss_fn`. One micro-batch
per step (grad_accum_steps=1): a state updated per micro-batch would not equal the big-batch
step.

A batch is a dict of host (numpy) arrays whose leading axis is the batch: `shard_batch` puts it
on the devices with rows split over the mesh axes the rules give `act_batch` (("data", "fsdp")
by default; each parallelism preset has its own, see `mmjax.parallel.presets`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.errors import ConfigError
from mmjax.parallel.mesh import activate, mesh_axes_of, resolve_rules
from mmjax.parallel.rules import DEFAULT_RULES
from mmjax.train.state import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
StateLossFn = Callable[[Any, Any, Batch, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array], Any]]
BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch's rows under DEFAULT_RULES


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, schedule: Callable, *,
    grad_accum_steps: int = 1, mesh: Mesh | None = None, shardings: TrainState | None = None,
    rules=DEFAULT_RULES, state_loss_fn: StateLossFn | None = None, trainable: Any = None,
    state_params_fn: Callable[[Any, Any], Any] | None = None,
    compiler_options: dict[str, Any] | None = None, parallel_chains: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, jitted, the state's buffers donated;
    `step.lower(state, batch)` lowers it ahead of time (ShapeDtypeStructs are enough).

    With `grad_accum_steps > 1` the batch is split into that many micro-batches along axis 0
    and scanned, summing the gradients of the loss sums, so the step equals the big-batch step.
    metrics: loss (total / count), grad_norm, learning_rate, count, and the loss's aux metrics.
    `state_loss_fn` (a task with state): used instead of `loss_fn`, the state's `task_state`
    passed in and replaced by what it returns (see the module docstring).
    `state_params_fn(params, new_task_state) -> params` (with `state_loss_fn`): the params
    after the optimizer update rewritten from the new task state (non-gradient updates).
    `trainable` (a bool tree like the params, e.g. `optimizer.frozen_mask` negated; None = all):
    only those leaves are differentiated, the others (a frozen base) get no gradient buffers;
    their gradient is a zero the optimizer's freezing ignores, and grad_norm counts only the
    trainable ones.
    `compiler_options`: XLA options for this program only (`jax.jit(compiler_options=...)`);
    `mmjax train` passes `mmjax.xla_options.step_compiler_options(model dtype)`.
    `parallel_chains=n`: the loss is taken on n contiguous slices of the batch, side by side
    in one program (the gradient of their sum), so XLA has n independent forward/backward
    chains to run concurrently: on a 2-core CPU its threads otherwise idle through most of a
    small model's step. Only for losses that are sums over examples (not contrastive ones);
    each slice gets its own dropout key; the batch must divide by n. `mmjax train` chooses n
    with `parallel_chains_for` (see there).
    """
    if state_loss_fn is not None and grad_accum_steps != 1:
        raise ConfigError(f"optimizer.grad_accum_steps={grad_accum_steps}: a task with its own "
                          "train state (e.g. BLIP's momentum encoder) steps once per batch; use "
                          "grad_accum_steps=1 (a bigger data.batch_size instead)")

    def stateful_grads(params, task_state, batch, rng):
        def f(p):
            total, count, aux, new_task_state = state_loss_fn(p, task_state, batch, rng)
            return total, (count, aux, new_task_state)

        (total, (count, aux, new_ts)), grads = jax.value_and_grad(f, has_aux=True)(params)
        # compact like value_and_grad's (the frozen gradients are dead code XLA drops)
        return total, count, aux, trainable_part(grads), jax.lax.stop_gradient(new_ts)

    if isinstance(parallel_chains, bool) or not isinstance(parallel_chains, int) or parallel_chains < 1:
        raise ConfigError(f"parallel_chains must be an integer >= 1, got {parallel_chains!r}")
    if parallel_chains > 1 and state_loss_fn is not None:
        raise ConfigError("parallel_chains > 1 needs a loss that sums over examples; a task with "
                          "its own train state steps on the whole batch (use parallel_chains=1)")

    def chained_loss(p, batch, rng):
        n = parallel_chains
        if n == 1:
            return loss_fn(p, batch, rng)
        rows = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
        if len(rows) != 1 or next(iter(rows)) % n:
            raise ValueError(f"parallel_chains={n}: every batch array needs the same leading "
                             f"size divisible by {n}, got leading sizes {sorted(rows)}")
        m = next(iter(rows)) // n
        outs = [loss_fn(p, jax.tree_util.tree_map(lambda x: x[i * m:(i + 1) * m], batch),
                        None if rng is None else jax.random.fold_in(rng, i)) for i in range(n)]
        total = sum(o[0] for o in outs)
        count = sum(o[1] for o in outs)
        aux = jax.tree_util.tree_map(lambda *a: sum(a) / n, *[o[2] for o in outs])
        return total, count, aux

    def value_and_grad(params, batch, rng):
        def f(p):
            total, count, aux = chained_loss(p, batch, rng)
            return total, (count, aux)

        if trainable is None:
            (total, (count, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
            return total, count, aux, grads
        leaves, treedef = jax.tree_util.tree_flatten(params)
        pick = [i for i, t in enumerate(jax.tree_util.tree_leaves(trainable)) if t]

        def g(train_leaves):
            full = list(leaves)
            for i, leaf in zip(pick, train_leaves):
                full[i] = leaf
            return f(jax.tree_util.tree_unflatten(treedef, full))

        (total, (count, aux)), train_grads = jax.value_and_grad(g, has_aux=True)(
            [leaves[i] for i in pick])
        return total, count, aux, train_grads  # compact: the trainable leaves only

    def trainable_part(params):
        """What value_and_grad differentiates: the whole tree, or its trainable leaves."""
        if trainable is None:
            return params
        leaves = jax.tree_util.tree_leaves(params)
        return [x for x, t in zip(leaves, jax.tree_util.tree_leaves(trainable)) if t]

    def full_grads(grads, params):
        """Compact gradients -> the params' tree (zeros where frozen: the optimizer's
        set_to_zero ignores them, so XLA never materialises them)."""
        if trainable is None:
            return grads
        leaves, treedef = jax.tree_util.tree_flatten(params)
        it = iter(grads)
        out = [next(it) if t else jnp.zeros_like(x)
               for x, t in zip(leaves, jax.tree_util.tree_leaves(trainable))]
        return jax.tree_util.tree_unflatten(treedef, out)

    def grads_of(params, batch, rng):
        if grad_accum_steps == 1:
            return value_and_grad(params, batch, rng)

        def split(x):
            if x.shape[0] % grad_accum_steps:
                raise ValueError(f"batch of {x.shape[0]} rows is not divisible by "
                                 f"grad_accum_steps={grad_accum_steps}")
            return x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:])

        micro = jax.tree_util.tree_map(split, batch)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda: loss_fn(params, first, rng)[2])

        def body(carry, xs):
            total_acc, count_acc, aux_acc, g_acc = carry
            mb, i = xs
            total, count, aux, g = value_and_grad(params, mb, jax.random.fold_in(rng, i))
            return (total_acc + total, count_acc + count,
                    jax.tree_util.tree_map(jnp.add, aux_acc, aux),
                    jax.tree_util.tree_map(jnp.add, g_acc, g)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable_part(params))
        aux0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
        (total, count, aux, grads), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0, zeros),
            (micro, jnp.arange(grad_accum_steps)),
        )
        aux = jax.tree_util.tree_map(lambda a: a / grad_accum_steps, aux)
        return total, count, aux, grads

    def step(state: TrainState, batch: Batch):
        rng, loss_rng = jax.random.split(state.rng)
        task_state = state.task_state
        if state_loss_fn is not None:
            if task_state is None:
                raise ConfigError("make_train_step: state_loss_fn given but the train state has "
                                  "no task_state (create it with init_task_state)")
            total, count, aux, grads, task_state = stateful_grads(
                state.params, task_state, batch, loss_rng)
        else:
            total, count, aux, grads = grads_of(state.params, batch, loss_rng)
        denom = jnp.maximum(count, 1e-9)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)  # compact: the trainable gradients only
        updates, opt_state = tx.update(full_grads(grads, state.params), state.opt_state,
                                       state.params)
        params = optax.apply_updates(state.params, updates)
        if state_params_fn is not None and state_loss_fn is not None:
            params = state_params_fn(params, task_state)
        metrics = {
            **aux,
            "loss": total / denom,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "count": count,
        }
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                            task_state=task_state)
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options)
    repl = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options,
                     in_shardings=(shardings, batch_sharding(mesh, rules)),
                     out_shardings=(shardings, repl))

    def run_in_mesh(state, batch):
        with activate(mesh, rules):
            return jitted(state, batch)

    def lower(state, batch):
        """Ahead-of-time lowering (abstract inputs welcome): `.lower(...).compile()`."""
        with activate(mesh, rules):
            return jitted.lower(state, batch)

    run_in_mesh.lower = lower
    return run_in_mesh


def parallel_chains_for(batch_size: int, *, backend: str | None = None, mesh: Mesh | None = None,
                        sums_over_examples: bool = False) -> int:
    """The `parallel_chains` `mmjax train` uses: 4 (else 2) on CPU without a mesh, for a loss
    that sums over examples and a batch of >= 2 rows per chain that divides evenly; else 1.

    Measured on the 2-core CPU (`docs/benchmarks.md`, "Train"), the main job's float32 LLaMA
    step, batch 16, quiet: 1.18x over XLA's default with mmjax's compiler options alone,
    1.21x with 2 chains, 1.31x with 4. `MMJAX_PARALLEL_CHAINS=N` overrides (1 = off)."""
    import os

    env = os.environ.get("MMJAX_PARALLEL_CHAINS")
    if env:
        n = int(env)
        return n if n >= 1 and batch_size % n == 0 else 1
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or mesh is not None or not sums_over_examples:
        return 1
    for n in (4, 2):
        if batch_size % n == 0 and batch_size // n >= 2:
            return n
    return 1


def make_eval_step(
    loss_fn: LossFn, *, mesh: Mesh | None = None, rules=None,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]:
    """`eval_step(params, batch) -> loss_fn(params, batch, None)`, jitted (on the mesh; rules
    None = the rules current at each call, see `mmjax.parallel.mesh.resolve_rules`)."""
    jitted = jax.jit(lambda params, batch: loss_fn(params, batch, None),
                     compiler_options=compiler_options)
    if mesh is None:
        return jitted

    def run_in_mesh(params, batch):
        with activate(mesh, rules):
            return jitted(params, batch)

    return run_in_mesh


def in_mesh(fn: Callable, mesh: Mesh | None, rules=None) -> Callable:
    """`fn` (already jitted) called with `mesh` and `rules` active (None: the rules current at
    each call); `fn` itself without a mesh."""
    if mesh is None:
        return fn

    def run(*args, **kwargs):
        with activate(mesh, rules):
            return fn(*args, **kwargs)

    return run


def batch_axes(rules=None) -> tuple[str, ...]:
    """Mesh axes that split a batch's rows under `rules` (those of `act_batch`; rules None =
    the current rules)."""
    return mesh_axes_of(("act_batch",), resolve_rules(rules))[0]


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Rows over the `act_batch` mesh axes of `rules` (None: the current rules); the other
    dimensions replicated."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def shard_batch(batch: dict[str, Any], mesh: Mesh | None, rules=None) -> Batch:
    """Put a host batch (numpy) on the devices; with a mesh each process passes its own rows,
    which become its slice of the global batch (rows split over the `act_batch` mesh axes of
    `rules`; None = the current rules)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sh = batch_sharding(mesh, rules)
    axes = batch_axes(rules)
    ways = math.prod(mesh.shape[a] for a in axes)
    per_process = max(ways // jax.process_count(), 1)
    for k, v in batch.items():
        rows = v.shape[0] if getattr(v, "ndim", 0) else 0
        if ways > 1 and rows % per_process:
            raise ConfigError(
                f"batch {k!r}: {rows} rows per process cannot be split over mesh axes "
                f"{'x'.join(axes)} ({ways} devices across {jax.process_count()} process(es)); "
                f"make the batch size a multiple of {ways}")
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}
