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
from mmjax.parallel.rules import DEFAULT_RULES, MESH_AXES, validate_rules


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


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """Make `mesh` the current mesh and `rules` the logical-axis rules (for jit, logical
    constraints and sharded init): `with activate(mesh): state = jitted(...)`."""
    validate_rules(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh
