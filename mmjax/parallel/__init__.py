"""Meshes and logical-axis sharding rules."""

from mmjax.parallel.mesh import logical_sharding, make_mesh, parse_mesh_spec, replicated
from mmjax.parallel.rules import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, validate_rules

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "validate_rules", "logical_sharding",
           "make_mesh", "parse_mesh_spec", "replicated"]
