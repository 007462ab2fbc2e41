"""Meshes and logical-axis sharding rules."""

from mmjax.parallel.rules import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, validate_rules

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "validate_rules"]
