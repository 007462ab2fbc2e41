"""What the Triton (`flash_attention.py`) and Mosaic (`flash_attention_tpu.py`) flash kernels share.

The softmax constants, the tile-size config `BlockSizes`, the static per-call `_Spec` and the
tile logic (which (query, key) pairs of a tile are visible, which tiles a causal pass visits).
Both kernel modules import these from here, so neither imports the other; `flash_attention`
re-exports them (`mmjax.kernels.flash_attention.BlockSizes` etc. stay importable).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from mmjax.errors import InputError

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite stand-in for -inf on masked scores: keeps `m_old - m_new` free of inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters. Validates itself; hashable (a static jit argument).

    block_q, block_k:          forward query / key tile.
    block_q_dkv, block_k_dkv:  dK/dV kernel: the key tile a program owns, the query tile it loops.
    block_q_dq, block_k_dq:    dQ kernel: the query tile a program owns, the key tile it loops.
    num_warps, num_stages:     GPU (Triton) launch parameters; None = chosen from head_dim.

    All tiles are powers of two >= 16 (Triton's dot needs 16; TPU wants multiples of 128 on the
    key axis for lane-dense tiles, see `for_platform`). A tile longer than the (padded)
    sequence is shrunk to it, so small inputs never pay for a big tile.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            val = getattr(self, f)
            if not isinstance(val, int) or not _is_pow2(val) or val < 16:
                raise InputError(f"BlockSizes.{f} must be a power of two >= 16, got {val!r}")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise InputError(
                f"BlockSizes.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}"
            )
        if self.num_stages is not None and not (
            isinstance(self.num_stages, int) and self.num_stages >= 1
        ):
            raise InputError(
                f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}"
            )

    @classmethod
    def for_platform(cls, platform: str, head_dim: int) -> BlockSizes:
        """Defaults per platform. GPU: FlashAttention-2's H100 tiles (128 x 64 forward, 64 x 64
        backward), 4 warps up to head_dim 64 and 8 above. TPU: 128-wide tiles (one MXU pass)."""
        if platform == "tpu":
            return cls(128, 128, 128, 128, 128, 128)
        if head_dim > 128:  # register pressure: smaller key tiles
            return cls(64, 32, 32, 32, 32, 32)
        return cls()

    def launch(self, head_dim: int) -> tuple[int, int]:
        warps = self.num_warps or (4 if head_dim <= 64 else 8)
        stages = self.num_stages or (3 if head_dim <= 64 else 2)
        return warps, stages


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call (hashable: used as a custom_vjp non-diff argument)."""

    causal: bool
    scale: float
    q_len: int
    kv_len: int
    head_dim: int
    blocks: BlockSizes
    backend: str
    interpret: bool
    has_segments: bool
    mask_shape: tuple[int, ...] | None  # [Bm, Nm, Tm, Sm] after broadcasting rank to 4

    @property
    def offset(self) -> int:  # bottom-right causal alignment
        return self.kv_len - self.q_len


# ----------------------------------------------------------------------------------------
# Shared tile logic
# ----------------------------------------------------------------------------------------


def _dot(a, b, contract: tuple[int, int]):
    """a @ b contracting dims `contract`, fp32 accumulation; fp32 inputs use IEEE precision."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _tile_visible(spec: _Spec, rows, cols, q_seg, kv_seg, mask_tile, shape):
    """Boolean [bq, bk] tile of visible (query, key) pairs, or None when everything is visible.

    rows [bq, 1] and cols [1, bk] are global positions; q_seg [bq, 1], kv_seg [1, bk];
    mask_tile broadcastable to [bq, bk] (int, nonzero = attend)."""
    vis = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if spec.kv_len % _padded_multiple(spec, "k"):  # padded key columns
        vis = both(vis, cols < spec.kv_len)
    if spec.causal:
        vis = both(vis, cols <= rows + spec.offset)
    if q_seg is not None:
        vis = both(vis, q_seg == kv_seg)
    if mask_tile is not None:
        vis = both(vis, mask_tile != 0)
    if vis is not None:
        vis = jnp.broadcast_to(vis, shape)
    return vis


def _padded_multiple(spec: _Spec, axis: str) -> int:
    b = spec.blocks
    if axis == "q":
        return max(b.block_q, b.block_q_dkv, b.block_q_dq)
    return max(b.block_k, b.block_k_dkv, b.block_k_dq)


def _kv_blocks_visible(spec: _Spec, q_block, block_q: int, block_k: int, num_kv_blocks: int):
    """How many key tiles (from 0) a query tile must visit: all, or up to the causal diagonal."""
    if not spec.causal:
        return num_kv_blocks
    last_row_end = (q_block + 1) * block_q + spec.offset  # keys < this may be visible
    n = lax.div(jnp.maximum(last_row_end, 0) + block_k - 1, block_k)
    return jnp.minimum(n, num_kv_blocks)


def _first_q_block(spec: _Spec, kv_block, block_q: int, block_k: int):
    """First query tile that can see any key of this key tile (causal), else 0."""
    if not spec.causal:
        return 0
    first_row = kv_block * block_k - spec.offset
    return lax.div(jnp.maximum(first_row, 0), block_q)
