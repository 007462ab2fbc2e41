"""I-JEPA's multi-block masks: which patches the context encoder sees and which it predicts.

For a batch of images on a `grid` of patches (rows, columns), `sample_multiblock(cfg, batch, rng)`
draws, as the reference collator does (facebookresearch/ijepa, `src/masks/multiblock.py`):

  * one target block size per batch: scale s ~ U(target_scale), aspect a = exp(U(log
    target_aspect)), h = round(sqrt(s*N*a)), w = round(sqrt(s*N/a)), each below the grid side;
    one context block size likewise from `context_scale` with aspect 1;
  * per image, `num_targets` target blocks at uniform positions, then `num_context` context
    blocks at uniform positions with every target patch removed (`allow_overlap=False`); a block
    with `min_keep` or fewer patches left is redrawn, and after `max_tries` misses one more target
    region is ignored (the reference's relaxation), so sampling always ends;
  * masks are sorted patch-index lists (row-major, `row * columns + column`), each cut to the
    batch's shortest of its kind, so they stack: `context [num_context, batch, Kc]`,
    `targets [num_targets, batch, Kt]` (int32).

One difference from the reference, on purpose: a block's top row is drawn from
[0, rows - h] *inclusive* (the reference's `torch.randint(0, rows - h)` excludes rows - h, so the
last patch row and column can never be masked; its open PR #40). Block sizes are clipped below
the grid side as the reference does.

Defaults are the released models': 4 targets of scale 0.15-0.2 and aspect 0.75-1.5, 1 context
block of scale 0.85-1.0 and aspect 1, min_keep 10.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MultiBlockConfig:
    grid: tuple[int, int]  # patches: (rows, columns)
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    num_context: int = 1
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    max_tries: int = 20

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        rows, cols = self.grid
        if len(self.grid) != 2 or rows < 2 or cols < 2:
            raise ConfigError(f"MultiBlockConfig.grid must be (rows, columns) >= 2 each, got {self.grid}")
        for name in ("target_scale", "context_scale", "target_aspect", "context_aspect"):
            lo, hi = getattr(self, name)
            object.__setattr__(self, name, (float(lo), float(hi)))
            if not 0 < lo <= hi or (name.endswith("scale") and hi > 1):
                raise ConfigError(f"MultiBlockConfig.{name} must be 0 < low <= high"
                                  f"{' <= 1' if name.endswith('scale') else ''}, got {(lo, hi)}")
        if self.num_targets < 1 or self.num_context < 1:
            raise ConfigError("MultiBlockConfig needs num_targets >= 1 and num_context >= 1, got "
                              f"{self.num_targets} and {self.num_context}")
        if not 0 <= self.min_keep < rows * cols:
            raise ConfigError(f"MultiBlockConfig.min_keep must be in [0, {rows * cols}), got {self.min_keep}")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def max_target(self) -> int:
        """The most patches a target block can have (the padded length with `pad=True`)."""
        return max_block_area(self.grid, self.target_scale, self.target_aspect)

    @property
    def max_context(self) -> int:
        return max_block_area(self.grid, self.context_scale, self.context_aspect)


def max_block_area(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    """max h * w over every block size `block_size` can draw (its keep is an integer in
    [int(N lo), int(N hi)]; h and w are monotone in the aspect, scanned finely)."""
    rows, cols = grid
    n = rows * cols
    best = 1
    logs = np.linspace(math.log(aspect[0]), math.log(aspect[1]), 2001)
    for keep in range(int(n * scale[0]), int(n * scale[1]) + 1):
        a = np.exp(logs)
        h = np.clip(np.round(np.sqrt(keep * a)), 1, rows - 1)
        w = np.clip(np.round(np.sqrt(keep / a)), 1, cols - 1)
        best = max(best, int((h * w).max()))
    return best


def block_size(rng: np.random.Generator, grid: tuple[int, int], scale: tuple[float, float],
               aspect: tuple[float, float]) -> tuple[int, int]:
    """(h, w) of a block covering ~U(scale) of the grid with aspect ratio h/w ~ logU(aspect)."""
    rows, cols = grid
    s = scale[0] + rng.random() * (scale[1] - scale[0])
    keep = int(rows * cols * s)
    a = math.exp(math.log(aspect[0]) + rng.random() * (math.log(aspect[1]) - math.log(aspect[0])))
    h = int(round(math.sqrt(keep * a)))
    w = int(round(math.sqrt(keep / a)))
    return max(1, min(h, rows - 1)), max(1, min(w, cols - 1))


def _block(rng: np.random.Generator, cfg: MultiBlockConfig, size: tuple[int, int],
           forbidden: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted kept indices, the block's own boolean grid) of one block avoiding `forbidden`."""
    rows, cols = cfg.grid
    h, w = size
    ignored, misses = 0, 0
    while True:
        top = int(rng.integers(0, rows - h + 1))  # inclusive: the last row/column can be masked
        left = int(rng.integers(0, cols - w + 1))
        block = np.zeros(cfg.grid, bool)
        block[top:top + h, left:left + w] = True
        keep = block.copy()
        for region in forbidden[: max(len(forbidden) - ignored, 0)]:
            keep &= ~region
        idx = np.flatnonzero(keep)
        if len(idx) > cfg.min_keep:
            return idx.astype(np.int32), block
        misses += 1
        if misses >= cfg.max_tries:  # relax: ignore one more forbidden region, as the reference
            misses = 0
            ignored += 1
            if ignored > len(forbidden):
                raise ConfigError(
                    f"multi-block masks: a {h}x{w} block cannot keep more than min_keep={cfg.min_keep} "
                    f"patches on a {rows}x{cols} grid; lower min_keep or raise the scale")


def sample_multiblock(cfg: MultiBlockConfig, batch: int, rng: np.random.Generator, *, pad: bool = False
                      ) -> tuple[np.ndarray, ...]:
    """(context [num_context, batch, Kc], targets [num_targets, batch, Kt]) int32 patch indices.

    `pad=False` (the reference): every list cut to the batch's shortest of its kind, so Kc / Kt
    vary from batch to batch. `pad=True` (fixed shapes: one compiled train step): nothing is cut;
    lists are padded to `cfg.max_context` / `cfg.max_target` with index 0 and come with validity
    masks: (context, context_valid, targets, targets_valid), the masks bool of the same shapes."""
    if batch < 1:
        raise ConfigError(f"multi-block masks need batch >= 1, got {batch}")
    t_size = block_size(rng, cfg.grid, cfg.target_scale, cfg.target_aspect)
    c_size = block_size(rng, cfg.grid, cfg.context_scale, cfg.context_aspect)
    targets, contexts = [], []
    for _ in range(batch):
        t_masks, t_blocks = [], []
        for _ in range(cfg.num_targets):
            idx, block = _block(rng, cfg, t_size, [])
            t_masks.append(idx)
            t_blocks.append(block)
        forbidden = [] if cfg.allow_overlap else t_blocks
        contexts.append([_block(rng, cfg, c_size, forbidden)[0] for _ in range(cfg.num_context)])
        targets.append(t_masks)
    if pad:
        ctx, ctx_ok = _padded(contexts, cfg.num_context, cfg.max_context)
        tgt, tgt_ok = _padded(targets, cfg.num_targets, cfg.max_target)
        return ctx, ctx_ok, tgt, tgt_ok
    kt = min(len(m) for ms in targets for m in ms)
    kc = min(len(m) for ms in contexts for m in ms)
    # cut each list to the batch's shortest (the reference keeps the first, lowest indices)
    tgt = np.stack([np.stack([ms[j][:kt] for ms in targets]) for j in range(cfg.num_targets)])
    ctx = np.stack([np.stack([ms[j][:kc] for ms in contexts]) for j in range(cfg.num_context)])
    return ctx, tgt


def _padded(lists: list[list[np.ndarray]], count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((count, len(lists), length), np.int32)
    ok = np.zeros((count, len(lists), length), bool)
    for b, ms in enumerate(lists):
        for j, m in enumerate(ms):
            if len(m) > length:  # cannot happen: max_block_area bounds every block
                raise AssertionError(f"a block of {len(m)} patches exceeds the padded length {length}")
            out[j, b, :len(m)] = m
            ok[j, b, :len(m)] = True
    return out, ok
