"""What the sampling loop (`loop.py`) and beam search (`beam_search.py`) share.

Both import from here, so neither imports the other for these; `mmjax.generate.loop`
re-exports `TRACE_COUNT` and `is_eos`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# Incremented each time a decode program is traced (tests check it stays put between calls).
TRACE_COUNT = {"decode": 0, "beam": 0}


def is_eos(tokens: jax.Array, eos: Sequence[int]) -> jax.Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, jnp.int32))
