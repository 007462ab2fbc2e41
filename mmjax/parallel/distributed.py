"""Multi-host start-up: `jax.distributed.initialize` from CLI flags or environment variables."""

from __future__ import annotations

import os

from mmjax.errors import ConfigError

_ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Initialise jax.distributed when a coordinator is given (flag or JAX_COORDINATOR_ADDRESS).

    Returns True when initialised. With no coordinator, does nothing (single process; on TPU pods
    and SLURM, call `jax.distributed.initialize()` with no arguments yourself, it auto-detects).
    """
    coordinator = coordinator or os.environ.get(_ENV["coordinator"])
    if not coordinator:
        return False
    if num_processes is None and _ENV["num_processes"] in os.environ:
        num_processes = int(os.environ[_ENV["num_processes"]])
    if process_id is None and _ENV["process_id"] in os.environ:
        process_id = int(os.environ[_ENV["process_id"]])
    if num_processes is None or process_id is None:
        raise ConfigError(
            "multi-host: with a coordinator address, also give --num-processes and --process-id "
            f"(or {_ENV['num_processes']} and {_ENV['process_id']})"
        )
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"multi-host: process id {process_id} not in [0, {num_processes})")
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True
