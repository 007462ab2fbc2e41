"""Train state (params, optimizer state, step, RNG) and its creation, optionally pre-sharded.

    init_params = lambda rng: model.init(rng, tokens)["params"]   # boxed, logical axis names
    state, shardings = create_train_state(init_params, tx, seed=0, mesh=None)

`init_params(rng)` returns the model's params still boxed in `nn.LogicallyPartitioned` (what
`model.init` gives for mmjax layers), so their logical axis names decide the layout. With a
mesh, params come from `logical_sharding(jax.eval_shape(init_params))` and the optimizer state
inherits each param's sharding (Adam moments mirror params; counters are replicated), so the
whole state is created already laid out: nothing is materialised on one device first.
`opt_rules` gives the optimizer state its own rules table (ZeRO-1: moments sharded over the
data axis while params stay replicated); each moment then takes the layout its param would
have under `opt_rules`.

Task state. A task may carry its own pytree through training beside the params (BLIP's
momentum encoder and feature queues): `init_task_state(params) -> pytree` (plain params in,
called inside the jitted init) gives `TrainState.task_state`; the train step hands it to the
task's loss and stores what the loss returns (`mmjax.train.step`); the checkpoint saves and
restores it with the optimizer state. Without one `task_state` is None (an empty pytree node:
nothing is traced, sharded or saved). Its shardings mirror the params' like the optimizer
state's do: a leaf whose dict-key path ends with a param's path and has its shape (a momentum
copy of that param) takes the param's sharding, the rest (queues, pointers) are replicated.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.parallel.mesh import activate, check_divisible, logical_sharding
from mmjax.parallel.rules import DEFAULT_RULES

InitFn = Callable[[jax.Array], Any]  # rng -> boxed param tree
TaskStateFn = Callable[[Any], Any]  # plain params -> the task's state pytree (or None)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [] steps taken so far
    params: Any  # plain (unboxed) float32 param tree
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw PRNG key, split once per step
    task_state: Any = None  # the task's own pytree (e.g. a momentum encoder), None = none


def abstract_boxed_params(init_params: InitFn) -> Any:
    """The param tree's shapes, still boxed with their logical axis names."""
    return jax.eval_shape(init_params, jax.random.PRNGKey(0))


def state_shardings(
    init_params: InitFn, tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES,
    opt_rules=None, init_task_state: TaskStateFn | None = None,
) -> TrainState:
    """A TrainState-shaped tree of NamedShardings for `mesh` (optimizer state under
    `opt_rules`, default `rules`; task state mirroring the params, see the module docstring).
    ConfigError when a param dimension does not divide by the mesh axes its logical name maps
    to."""
    boxed = abstract_boxed_params(init_params)
    check_divisible(boxed, mesh, rules, "param")
    param_sh = logical_sharding(boxed, mesh, rules)
    if opt_rules is None:
        opt_param_sh = param_sh
    else:
        check_divisible(boxed, mesh, opt_rules, "optimizer state of param")
        opt_param_sh = logical_sharding(boxed, mesh, opt_rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = NamedSharding(mesh, PartitionSpec())
    opt_sh = _mirror_param_shardings(abstract_opt, abstract_params, opt_param_sh, repl)
    task_sh = None
    if init_task_state is not None:
        abstract_task = jax.eval_shape(init_task_state, abstract_params)
        if abstract_task is not None:
            task_sh = _mirror_param_shardings(abstract_task, abstract_params, param_sh, repl)
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, task_state=task_sh)


def _mirror_param_shardings(opt_state, params, param_sh, default):
    """Each optimizer-state leaf whose dict-key path ends with a param's path and has that
    param's shape gets the param's sharding (Adam moments); the rest (counters) `default`."""
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_sh)
    ):
        by_path[_dict_keys(path)] = (tuple(leaf.shape), sh)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _fresh_state(init_params: InitFn, tx: optax.GradientTransformation, rng: jax.Array,
                 init_task_state: TaskStateFn | None = None) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    params = nn.meta.unbox(init_params(params_rng))
    task_state = init_task_state(params) if init_task_state is not None else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng, task_state=task_state)


def create_train_state(
    init_params: InitFn, tx: optax.GradientTransformation, *, seed: int,
    mesh: Mesh | None = None, rules=DEFAULT_RULES, opt_rules=None,
    init_task_state: TaskStateFn | None = None,
) -> tuple[TrainState, TrainState | None]:
    """Fresh state (params from `seed`, the task state from those params) and its shardings
    (None without a mesh)."""
    rng = jax.random.PRNGKey(seed)
    init = lambda r: _fresh_state(init_params, tx, r, init_task_state)  # noqa: E731
    if mesh is None:
        return jax.jit(init)(rng), None
    shardings = state_shardings(init_params, tx, mesh, rules, opt_rules, init_task_state)
    with activate(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def abstract_train_state(
    init_params: InitFn, tx: optax.GradientTransformation, *, shardings: TrainState | None = None,
    init_task_state: TaskStateFn | None = None,
) -> TrainState:
    """ShapeDtypeStructs of the state (with shardings when given): the target of a restore."""
    abstract = jax.eval_shape(lambda r: _fresh_state(init_params, tx, r, init_task_state),
                              jax.random.PRNGKey(0))
    if shardings is None:
        return abstract
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def reinit_task_state(state: TrainState, init_task_state: TaskStateFn | None,
                      shardings: TrainState | None = None) -> TrainState:
    """`state` with its task state rebuilt from its (e.g. just overlaid pretrained) params."""
    if init_task_state is None or state.task_state is None:
        return state
    out_sh = None if shardings is None else shardings.task_state
    task_state = jax.jit(init_task_state, out_shardings=out_sh)(state.params)
    return state.replace(task_state=task_state)


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
