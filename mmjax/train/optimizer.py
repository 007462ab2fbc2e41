"""The optimizer: AdamW + warmup/cosine schedule, clipping, weight-decay mask, regex freezing.

    tx, schedule = make_optimizer(cfg.optimizer, total_steps, params)

Param paths are '/'-joined tree keys (`layers_0/attn/query/kernel`). Frozen params (any
`freeze` regex matches) get a zero update through `optax.multi_transform` + `set_to_zero`, so
they stay bit-identical and hold no Adam moments; clipping sees only the trainable gradients.
Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches
(`mmjax.train.step`), so one optimizer step == one `step` of the run.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.errors import ConfigError
from mmjax.train.experiment import OptimizerConfig


def path_str(path: Sequence[Any]) -> str:
    """A jax key path -> 'a/b/c'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_paths(params: Any) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def regex_mask(params: Any, patterns: Sequence[str]) -> Any:
    """Tree of bools: True where the param's path matches any regex (re.search)."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"bad parameter-path regex {p!r}: {e}") from None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(c.search(path_str(path)) for c in compiled), params
    )


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """True where weight decay applies (no `no_decay` regex matches)."""
    return jax.tree_util.tree_map(lambda m: not m, regex_mask(params, no_decay))


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine to lr * end_lr_ratio at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def weight_decay_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Cosine from cfg.weight_decay at step 0 to cfg.weight_decay_end at total_steps (constant
    when weight_decay_end is None)."""
    start = cfg.weight_decay
    end = start if cfg.weight_decay_end is None else cfg.weight_decay_end
    span = max(total_steps, 1)

    def schedule(count):
        t = jnp.clip(jnp.asarray(count, jnp.float32) / span, 0.0, 1.0)
        return start + (end - start) * 0.5 * (1.0 - jnp.cos(jnp.pi * t))

    return schedule


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, params: Any, trainable: Sequence[str] | None = None,
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """(transform, schedule) for `params` (concrete, abstract or boxed; only the tree structure is used).

    `trainable` (regexes; PEFT runs, `mmjax.train.peft`): only the params matching one of them
    train, the others are frozen like `cfg.freeze`'s. Raises ConfigError when a freeze or
    trainable regex matches nothing (a typo would silently train all, or nothing).
    """
    params = nn.meta.unbox(params)
    schedule = make_schedule(cfg, total_steps)
    inner = []
    if cfg.grad_clip is not None:
        inner.append(optax.clip_by_global_norm(cfg.grad_clip))
    mask = lambda p: decay_mask(p, cfg.no_decay)  # noqa: E731
    if cfg.weight_decay_end is None:
        inner.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=mask))
    else:  # the decay coefficient follows its own schedule (kept in the optimizer state)
        inner.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=weight_decay_schedule(cfg, total_steps), mask=mask))
    tx = optax.chain(*inner)
    frozen = frozen_mask(cfg, params, trainable)
    if frozen is not None:
        labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def frozen_mask(cfg: OptimizerConfig, params: Any, trainable: Sequence[str] | None = None
                ) -> Any | None:
    """Bool tree, True where a param is frozen (`cfg.freeze` matches, or `trainable` is given
    and none of it matches); None when every param trains. ConfigError for a regex that
    matches nothing, and when nothing would train."""
    params = nn.meta.unbox(params)
    if not cfg.freeze and trainable is None:
        return None
    frozen = jax.tree_util.tree_map(lambda _: False, params)
    if cfg.freeze:
        frozen = regex_mask(params, cfg.freeze)
        if not any(jax.tree_util.tree_leaves(frozen)):
            raise ConfigError(
                f"optimizer.freeze={list(cfg.freeze)} matches no parameter; paths look like "
                f"{', '.join(param_paths(params)[:4])}, ..."
            )
    if trainable is not None:
        train = regex_mask(params, trainable)
        if not any(jax.tree_util.tree_leaves(train)):
            raise ConfigError(f"trainable params {list(trainable)} match no parameter; paths "
                              f"look like {', '.join(param_paths(params)[:4])}, ...")
        frozen = jax.tree_util.tree_map(lambda f, t: f or not t, frozen, train)
    if all(jax.tree_util.tree_leaves(frozen)):
        raise ConfigError("every parameter is frozen (optimizer.freeze / peft): nothing would "
                          "train")
    return frozen
