"""Logical axis names and the tables that map them to mesh axes.

Models name what each array dimension *is* (`embed`, `heads`, `mlp`, `vocab`, ...); a rules
table says which mesh axis (`data`, `fsdp`, `tensor`, `expert`, `seq`) shards it. Changing the
parallelism changes only the table, never model code (MaxText's design). The named tables
(presets: pure data parallel, ZeRO-1, FSDP, FSDP + tensor, tensor + sequence, expert,
Flamingo) live in `mmjax.parallel.presets`.

A table is a tuple of `(logical_name, mesh_axes)` pairs, `mesh_axes` one mesh axis, a tuple of
them, or None (replicated). Flax resolves an array's dimensions by walking the table in order
and giving each rule to its dimension when those mesh axes are still free in that array, so a
logical name may appear twice: the first rule wins, the second is the fallback (the `tp_sp`
preset shards the residual stream's length over `seq` x `tensor`, and over `seq` alone where
`tensor` already splits the MLP's hidden units). A logical name absent from the table is
replicated.
"""

from __future__ import annotations

from typing import Sequence

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert", "seq")

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

# Parameter axes
LOGICAL_PARAM_AXES = (
    "vocab",      # vocabulary rows of embeddings / output head
    "embed",      # model width (d_model)
    "heads",      # query heads
    "kv_heads",   # key/value heads (GQA/MQA)
    "head_dim",   # per-head feature dim
    "mlp",        # MLP hidden width
    "norm",       # norm scales/biases
    "expert",     # MoE experts (the leading dim of the stacked expert weights)
    "router",     # MoE router logits, one per expert (kept replicated: every device routes)
    "position",   # learned position tables
    "patch",      # flattened patch features (ViT)
)
# Activation axes (for with_logical_constraint)
LOGICAL_ACTIVATION_AXES = (
    "act_batch",
    "act_len",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
)
LOGICAL_AXES = LOGICAL_PARAM_AXES + LOGICAL_ACTIVATION_AXES

# Default (the `fsdp_tp` preset): FSDP over `fsdp`, Megatron tensor parallelism over `tensor`,
# batch over data+fsdp, sequence over `seq`, experts over `expert`. Size-1 mesh axes make any
# rule a no-op.
DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("expert", "expert"),
    ("position", None),
    ("patch", None),
    ("act_batch", ("data", "fsdp")),
    ("act_len", "seq"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def rule_targets(target) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: None -> (), 'fsdp' -> ('fsdp',)."""
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def validate_rules(rules: Sequence[tuple[str, object]]) -> None:
    """Every logical name known, every mesh axis known; ConfigError naming the culprit."""
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ConfigError(f"logical-axis rules must be a sequence of (logical, mesh) pairs, "
                          f"got {type(rules).__name__}")
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"logical-axis rules: expected a (logical, mesh) pair, got {item!r}")
        name, target = item
        if name not in LOGICAL_AXES:
            from mmjax.configs import closest_name

            raise ConfigError(
                f"logical-axis rules: unknown logical axis {name!r}{closest_name(str(name), LOGICAL_AXES)}; "
                f"known: {', '.join(LOGICAL_AXES)} (add a new name to "
                "mmjax.parallel.rules.LOGICAL_AXES first)"
            )
        for t in rule_targets(target):
            if t not in MESH_AXES:
                raise ConfigError(
                    f"logical-axis rules: {name!r} maps to unknown mesh axis {t!r}; "
                    f"mesh axes are {', '.join(MESH_AXES)}"
                )


def mesh_axes_used(rules: Sequence[tuple[str, object]]) -> set[str]:
    """The mesh axes that any rule of `rules` shards over."""
    return {t for _, target in rules for t in rule_targets(target)}
