"""Multi-host start-up: `jax.distributed.initialize` from CLI flags or environment variables.

    mmjax train CONFIG --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 --mesh ...
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 mmjax train ...
    mmjax train CONFIG --coordinator auto --mesh ...     # Cloud TPU pod slice, SLURM, Open MPI,
    MMJAX_DISTRIBUTED=auto mmjax train CONFIG --mesh ... # Kubernetes: JAX detects the cluster

Every process runs the same command; flags win over environment variables. After
initialisation `jax.devices()` lists the devices of all processes, the mesh spans them, and each
process feeds its own rows of every batch (`mmjax.train.step.shard_batch`). See
`docs/scale_out.md` for launch commands.
"""

from __future__ import annotations

import os

from mmjax.errors import ConfigError

_ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
AUTO_ENV = "MMJAX_DISTRIBUTED"  # "auto": let JAX detect the cluster


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"multi-host: environment variable {name}={raw!r} is not an integer") from None


def resolve_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` (None: single process).

    coordinator "auto" (or MMJAX_DISTRIBUTED=auto): no arguments, JAX auto-detects the cluster.
    Otherwise coordinator host:port, process count and id from the flags or JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    """
    coordinator = coordinator or os.environ.get(_ENV["coordinator"]) or None
    if coordinator is None and os.environ.get(AUTO_ENV, "").lower() == "auto":
        coordinator = "auto"
    if not coordinator:
        if num_processes is not None or process_id is not None:
            raise ConfigError("multi-host: --num-processes / --process-id need --coordinator "
                              f"host:port (or {_ENV['coordinator']}, or --coordinator auto)")
        return None
    if coordinator == "auto":
        return {}
    if ":" not in coordinator:
        raise ConfigError(f"multi-host: coordinator {coordinator!r} must be host:port (or 'auto')")
    if num_processes is None:
        num_processes = _env_int(_ENV["num_processes"])
    if process_id is None:
        process_id = _env_int(_ENV["process_id"])
    if num_processes is None or process_id is None:
        raise ConfigError(
            "multi-host: with a coordinator address, also give --num-processes and --process-id "
            f"(or {_ENV['num_processes']} and {_ENV['process_id']}); use --coordinator auto on a "
            "TPU pod slice, SLURM, Open MPI or Kubernetes")
    if num_processes < 1:
        raise ConfigError(f"multi-host: --num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"multi-host: process id {process_id} not in [0, {num_processes})")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Initialise jax.distributed when a coordinator is given (see `resolve_distributed`).

    Returns True when initialised, False for a single process. Must run before any other JAX
    call that touches devices.
    """
    kwargs = resolve_distributed(coordinator, num_processes, process_id)
    if kwargs is None:
        return False
    import jax

    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        where = kwargs.get("coordinator_address", "auto-detected cluster")
        raise ConfigError(f"multi-host: jax.distributed.initialize ({where}) failed: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return True
