"""XLA compiler options that mmjax passes to its own jitted train and eval steps.

They go in through `jax.jit(..., compiler_options=...)`, so they apply to mmjax's compiled
programs only: never process-wide through `XLA_FLAGS`, never to the user's other jits.

CPU, float32 compute: `xla_cpu_experimental_ynn_fusion_type = DOT, REDUCE`. XLA's CPU backend
hands matrix products to YNNPACK; by default each dot goes alone ("individual dot"), so the
weight-gradient dots of the backward pass (contracting over the token axis, the *major* axis of
both operands) get their operands transposed by separate layout-copy fusions first (~25% of
the main job's training step on the 2-core CI machines, `docs/benchmarks.md`). With fused-dot
mode YNNPACK takes the producers and the transposes into its own graph, and with `REDUCE` it
also runs the reductions (norm statistics, softmax sums, gradient sums over the batch).
Measured A/B in one process (`docs/benchmarks.md`, "Train"): the float32 LLaMA train step
1.14-1.18x faster, the CLIP step 1.08x; identical losses. With bfloat16 compute the same mode
was *slower* (0.81x), so it is used for float32 compute only.

Set `MMJAX_XLA_CPU_OPTIONS=0` to turn it off; an option the user already sets in `XLA_FLAGS`
is left to the user.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CPU_FLOAT32_OPTIONS", "step_compiler_options"]

CPU_FLOAT32_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def step_compiler_options(compute_dtype: Any = "float32", backend: str | None = None
                          ) -> dict[str, Any] | None:
    """The compiler options for a train / eval step that computes in `compute_dtype` on
    `backend` (None: JAX's default backend); None where mmjax has none to add."""
    if os.environ.get("MMJAX_XLA_CPU_OPTIONS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu" or not _is_float32(compute_dtype):
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_FLOAT32_OPTIONS.items() if k not in user_flags}
    return options or None


def _is_float32(dtype: Any) -> bool:
    if dtype is None:
        return True  # modules without a compute dtype run in their params' float32
    import numpy as np

    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return str(dtype) in ("float32", "fp32", "f32")
