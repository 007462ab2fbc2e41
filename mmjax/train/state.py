"""Train state (params, optimizer state, step, RNG) and its creation, optionally pre-sharded.

    state, shardings = create_train_state(model, tx, seq_len=128, seed=0, mesh=None)

With a mesh, params come from `logical_sharding(jax.eval_shape(init))` and the optimizer state
inherits each param's sharding (Adam moments mirror params; counters are replicated), so the
whole state is created already laid out: nothing is materialised on one device first.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.parallel.mesh import logical_sharding
from mmjax.parallel.rules import DEFAULT_RULES


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [] steps taken so far
    params: Any  # plain (unboxed) float32 param tree
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw PRNG key, split once per step


def _init_params(model: nn.Module, rng: jax.Array, seq_len: int) -> Any:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens)["params"]  # boxed in nn.LogicallyPartitioned


def abstract_boxed_params(model: nn.Module, seq_len: int) -> Any:
    """The param tree's shapes, still boxed with their logical axis names."""
    return jax.eval_shape(lambda r: _init_params(model, r, seq_len), jax.random.PRNGKey(0))


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh,
    rules=DEFAULT_RULES,
) -> TrainState:
    """A TrainState-shaped tree of NamedShardings for `mesh`."""
    boxed = abstract_boxed_params(model, seq_len)
    param_sh = logical_sharding(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = NamedSharding(mesh, PartitionSpec())
    opt_sh = _mirror_param_shardings(abstract_opt, abstract_params, param_sh, repl)
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)


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


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, *, seq_len: int, seed: int,
    mesh: Mesh | None = None, rules=DEFAULT_RULES,
) -> tuple[TrainState, TrainState | None]:
    """Fresh state (params from `seed`) and its shardings (None without a mesh)."""

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = nn.meta.unbox(_init_params(model, params_rng, seq_len))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
        )

    rng = jax.random.PRNGKey(seed)
    if mesh is None:
        return jax.jit(init)(rng), None
    shardings = state_shardings(model, tx, seq_len, mesh, rules)
    with mesh, nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def abstract_train_state(
    model: nn.Module, tx: optax.GradientTransformation, *, seq_len: int,
    shardings: TrainState | None = None,
) -> TrainState:
    """ShapeDtypeStructs of the state (with shardings when given): the target of a restore."""

    def init(rng):
        params = nn.meta.unbox(_init_params(model, rng, seq_len))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            rng=jax.random.PRNGKey(0),
        )

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    if shardings is None:
        return abstract
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
