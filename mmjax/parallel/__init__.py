"""Meshes, logical-axis sharding rules and parallelism presets."""

from mmjax.parallel.mesh import (
    activate,
    check_divisible,
    logical_sharding,
    make_mesh,
    parse_mesh_spec,
    replicated,
    resolve_rules,
)
from mmjax.parallel.presets import PRESETS, Preset, check_mesh, get_preset
from mmjax.parallel.rules import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, validate_rules

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "PRESETS", "Preset", "activate",
           "check_divisible", "check_mesh", "get_preset", "logical_sharding", "make_mesh",
           "parse_mesh_spec", "replicated", "resolve_rules", "validate_rules"]
