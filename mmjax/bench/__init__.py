"""Benchmarks: mmjax against a reference run in the same process.

    mmjax bench decode --json          # greedy KV-cache decoding vs transformers' generate
    from mmjax.bench import run; result = run("decode", batch_sizes=(1,), new_tokens=16)

Every benchmark returns a dict with at least `name`, `reference` (what it was compared with),
`ratio` (mmjax throughput / reference throughput, higher is better; the worst case's when there
are several), `cases` (each case's figures) and `machine`. Timings are medians of repeated runs
after a warm-up (compilation is excluded and reported separately).
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
from typing import Any, Callable

from mmjax import configs
from mmjax.errors import InputError

# name -> "module:function"; the function takes keyword overrides and returns the result dict.
BENCHMARKS: dict[str, str] = {
    "decode": "mmjax.bench.decode:run",
    "train": "mmjax.bench.train:run",
    "clip": "mmjax.bench.clip:run",
    "attention": "mmjax.bench.attention:run",
    "memory": "mmjax.bench.memory:run",
    "peft_memory": "mmjax.bench.peft_memory:run",
    "compile": "mmjax.bench.compile:run",
    "speculative": "mmjax.bench.speculative:run",
}


def get_benchmark(name: str) -> Callable[..., dict[str, Any]]:
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}{configs.closest_name(name, BENCHMARKS)}; "
                         f"available: {', '.join(sorted(BENCHMARKS))}")
    module, fn = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run(name: str, **overrides: Any) -> dict[str, Any]:
    """Run benchmark `name` with keyword overrides of its defaults; return its result dict."""
    fn = get_benchmark(name)
    allowed = inspect.signature(fn).parameters
    for key in overrides:
        if key not in allowed:
            raise InputError(f"benchmark {name!r} has no argument {key!r}"
                             f"{configs.closest_name(key, allowed)}; it takes {', '.join(allowed)}")
    result = fn(**overrides)
    result.setdefault("machine", machine_info())
    return result


def machine_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
