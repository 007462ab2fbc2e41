"""Logical axis names and the table that maps them to mesh axes.

Models name what each array dimension *is* (`embed`, `heads`, `mlp`, `vocab`, ...); this table
says which mesh axis (`data`, `fsdp`, `tensor`, `expert`, `seq`) shards it. Changing the
parallelism changes only the table, never model code (MaxText's design).
"""

from __future__ import annotations

from typing import Sequence

MESH_AXES = ("data", "fsdp", "tensor", "expert", "seq")

# Parameter axes
LOGICAL_PARAM_AXES = (
    "vocab",      # vocabulary rows of embeddings / output head
    "embed",      # model width (d_model)
    "heads",      # query heads
    "kv_heads",   # key/value heads (GQA/MQA)
    "head_dim",   # per-head feature dim
    "mlp",        # MLP hidden width
    "norm",       # norm scales/biases
    "expert",     # MoE experts
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

# Default: FSDP over `fsdp`, Megatron tensor parallelism over `tensor`, batch over data+fsdp,
# sequence over `seq`, experts over `expert`. Size-1 mesh axes make any rule a no-op.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
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


def validate_rules(rules: Sequence[tuple[str, object]]) -> None:
    """Every logical name known, every mesh axis known; raise ValueError naming the culprit."""
    for name, target in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(
                f"logical-axis rules: unknown logical axis {name!r}; known: {', '.join(LOGICAL_AXES)}"
            )
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(
                    f"logical-axis rules: {name!r} maps to unknown mesh axis {t!r}; mesh axes are {MESH_AXES}"
                )
