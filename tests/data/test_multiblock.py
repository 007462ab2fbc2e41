"""I-JEPA's multi-block masks (`mmjax.data.multiblock`): seeded determinism, block sizes within
their scales, context and targets disjoint, equal lengths after the cut, and the last patch row
and column reachable (the reference's exclusive randint never masks them)."""

import numpy as np
import pytest

from mmjax.data.multiblock import MultiBlockConfig, block_size, sample_multiblock
from mmjax.errors import ConfigError

CFG = MultiBlockConfig(grid=(14, 14))  # the released models' 224 px / patch 16


def test_seeded_and_shaped():
    a = sample_multiblock(CFG, 8, np.random.default_rng(3))
    b = sample_multiblock(CFG, 8, np.random.default_rng(3))
    c = sample_multiblock(CFG, 8, np.random.default_rng(4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    ctx, tgt = a
    assert ctx.shape[:2] == (1, 8) and tgt.shape[:2] == (4, 8) and ctx.dtype == tgt.dtype == np.int32
    assert ctx.shape[2] > CFG.min_keep and tgt.shape[2] > CFG.min_keep
    assert ctx.min() >= 0 and max(ctx.max(), tgt.max()) < CFG.num_patches
    for m in (*ctx.reshape(-1, ctx.shape[2]), *tgt.reshape(-1, tgt.shape[2])):
        assert np.all(np.diff(m) > 0)  # sorted, no repeats


def test_context_and_targets_are_disjoint_and_blocks_are_rectangles():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ctx, tgt = sample_multiblock(CFG, 4, rng)
        for i in range(4):
            assert not set(ctx[0, i]) & set(tgt[:, i].ravel())
            for j in range(4):  # a target is a prefix of a full h x w rectangle, in row-major order
                rows, cols = np.divmod(tgt[j, i], 14)
                assert rows.max() - rows.min() + 1 <= 14 and cols.max() - cols.min() + 1 <= 13
    with_overlap = MultiBlockConfig(grid=(14, 14), allow_overlap=True)
    ctx, tgt = sample_multiblock(with_overlap, 16, np.random.default_rng(1))
    assert any(set(ctx[0, i]) & set(tgt[:, i].ravel()) for i in range(16))


def test_block_sizes_follow_the_scales_and_aspects():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = block_size(rng, (14, 14), (0.15, 0.2), (0.75, 1.5))
        assert 0.15 * 196 - 14 <= h * w <= 0.2 * 196 + 14  # rounding of h and w
        assert 0.75 / 1.4 <= h / w <= 1.5 * 1.4
    sizes = {block_size(rng, (14, 14), (0.85, 1.0), (1.0, 1.0)) for _ in range(200)}
    assert all(h == w and 12 <= h <= 13 for h, w in sizes)  # clipped below the grid side, as the reference


def test_the_last_row_and_column_can_be_masked():
    rng = np.random.default_rng(0)
    seen_rows, seen_cols = set(), set()
    for _ in range(30):
        _, tgt = sample_multiblock(CFG, 4, rng)
        rows, cols = np.divmod(tgt, 14)
        seen_rows |= set(rows.ravel().tolist())
        seen_cols |= set(cols.ravel().tolist())
    assert 13 in seen_rows and 13 in seen_cols


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="grid"):
        MultiBlockConfig(grid=(1, 14))
    with pytest.raises(ConfigError, match="target_scale"):
        MultiBlockConfig(grid=(14, 14), target_scale=(0.3, 0.2))
    with pytest.raises(ConfigError, match="min_keep"):
        MultiBlockConfig(grid=(4, 4), min_keep=16)
    tiny = MultiBlockConfig(grid=(4, 4), target_scale=(0.1, 0.1), min_keep=10)
    with pytest.raises(ConfigError, match="cannot keep more than min_keep=10"):
        sample_multiblock(tiny, 1, np.random.default_rng(0))


def test_padded_lists_hold_the_same_draws_at_fixed_shapes():
    cfg = MultiBlockConfig(grid=(8, 8), min_keep=4)
    assert (cfg.max_target, cfg.max_context) == (12, 49)
    ctx, tgt = sample_multiblock(cfg, 6, np.random.default_rng(5))
    pctx, pctx_ok, ptgt, ptgt_ok = sample_multiblock(cfg, 6, np.random.default_rng(5), pad=True)
    assert pctx.shape == pctx_ok.shape == (1, 6, 49) and ptgt.shape == ptgt_ok.shape == (4, 6, 12)
    for cut, padded, ok in ((ctx, pctx, pctx_ok), (tgt, ptgt, ptgt_ok)):
        for j in range(cut.shape[0]):
            for b in range(6):
                kept = padded[j, b][ok[j, b]]
                assert len(kept) >= cut.shape[2] and np.array_equal(kept[:cut.shape[2]], cut[j, b])
                assert np.all(padded[j, b][~ok[j, b]] == 0)
