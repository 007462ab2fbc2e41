"""Build a device mesh from `--mesh data=2,fsdp=4` and turn logical names into shardings."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.errors import ConfigError
from mmjax.parallel.rules import DEFAULT_RULES, MESH_AXES, rule_targets, validate_rules


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': -1, ...} with every mesh axis present (default 1)."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec:
        return sizes
    items = spec.items() if isinstance(spec, Mapping) else (
        part.split("=", 1) if "=" in part else (part, None) for part in spec.split(",") if part.strip()
    )
    for name, value in items:
        name = name.strip()
        if name not in MESH_AXES:
            raise ConfigError(f"--mesh: unknown axis {name!r}; mesh axes are {', '.join(MESH_AXES)}")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--mesh: axis {name!r} needs an integer size, got {value!r}") from None
        if size == 0 or size < -1:
            raise ConfigError(f"--mesh: axis {name!r} size must be positive or -1, got {size}")
        sizes[name] = size
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise ConfigError("--mesh: at most one axis may be -1 (= the rest of the devices)")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, fsdp, tensor, expert, seq).

    One axis may be -1 (the rest). The product of sizes must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    known = math.prod(s for s in sizes.values() if s != -1)
    for name, s in sizes.items():
        if s == -1:
            if len(devices) % known:
                raise ConfigError(
                    f"--mesh: {len(devices)} devices are not divisible by the other axes' product {known}"
                )
            sizes[name] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        shown = ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
        raise ConfigError(
            f"--mesh: axis sizes ({shown}) multiply to {total} but there are {len(devices)} devices; "
            "make the product equal the device count or use -1 for one axis"
        )
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def logical_sharding(tree: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of boxed (nn.LogicallyPartitioned) values or their abstract shapes."""
    validate_rules(rules)
    specs = nn.get_partition_spec(tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def resolve_rules(rules: Sequence | None) -> Sequence:
    """`rules`, or when None the rules made current by `activate` / `nn.logical_axis_rules`
    (DEFAULT_RULES when none are)."""
    if rules is not None:
        return rules
    return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


def mesh_axes_of(names: Sequence[str | None], rules: Sequence) -> list[tuple[str, ...]]:
    """Per dimension, the mesh axes that split it under `rules` (() = replicated)."""
    return [rule_targets(a) for a in nn.logical_to_mesh_axes(tuple(names), rules)]


def check_divisible(boxed: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES, what: str = "param"
                    ) -> None:
    """ConfigError when a dimension of a boxed (logically named) leaf does not divide by the
    mesh axes its logical name maps to: names the array, the axis, both sizes and a fix."""
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for path, leaf in leaves:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        shape = tuple(leaf.value.shape)
        for dim, (name, axes) in enumerate(zip(leaf.names, mesh_axes_of(leaf.names, rules))):
            size = math.prod(mesh.shape[a] for a in axes)
            if size > 1 and shape[dim] % size:
                axis_txt = "x".join(axes)
                sizes = "x".join(str(mesh.shape[a]) for a in axes)
                if name == "expert":
                    fix = (f"use an expert mesh axis size that divides the {shape[dim]} experts "
                           f"(e.g. --mesh expert={math.gcd(shape[dim], size)},...) or make "
                           f"num_experts a multiple of {size}")
                else:
                    fix = (f"use a mesh where {axis_txt} divides {shape[dim]}, a model size that "
                           f"is a multiple of {size}, or a parallelism preset that does not split "
                           f"{name!r}")
                raise ConfigError(
                    f"{what} {path_str(path)} {shape}: dimension {dim} ({name!r}, size "
                    f"{shape[dim]}) is not divisible by mesh axis {axis_txt!r} (size {sizes}); "
                    f"{fix}")


def path_str(path) -> str:
    """A jax key path -> 'layers_0/mlp/gate/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence | None = DEFAULT_RULES):
    """Make `mesh` the current mesh and `rules` the logical-axis rules (for jit, logical
    constraints and sharded init): `with activate(mesh): state = jitted(...)`. rules=None keeps
    the rules already current (see `resolve_rules`)."""
    rules = resolve_rules(rules)
    validate_rules(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh
