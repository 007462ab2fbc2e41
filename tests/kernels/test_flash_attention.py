"""Pallas flash attention (interpret mode on CPU): values and gradients against the reference.

Each case checks the forward output, the log-sum-exp and the q/k/v gradients of a nonlinear
loss (sum of sin(out), so d_out varies per element) against `jax.grad` of the pure-JAX
reference. Tiles are 16 so the small shapes here still span several tiles, padded edges
included. fp32: max abs diff <= 1e-5 (measured ~1e-6: the kernels use IEEE fp32 dots, the
only difference from the reference is summation order). bf16: see `test_bf16`.
"""

import functools
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from mmjax.kernels.flash_attention import (
    BlockSizes,
    _first_q_block,
    _kv_blocks_visible,
    flash_attention,
    flash_attention_forward,
    flash_attention_reference,
    make_spec,
)

from mmjax.errors import InputError
from mmjax.ops import attention
from mmjax.ops.attention import AttentionInputError

TILES = BlockSizes(16, 16, 16, 16, 16, 16)
FP32_TOL = 1e-5


def rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_params(model, tokens, seed=0):
    """Random weights of the init's shapes, without compiling `init` (that alone takes ~7 s)."""
    from flax.core import meta

    shapes = meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def sorted_ids(batch, length, seed, num=3):
    return jnp.asarray(
        np.sort(np.random.default_rng(seed).integers(0, num, (batch, length)), 1), jnp.int32
    )


def check_against_reference(q, k, v, tol=FP32_TOL, grad_tol=None, backend=None, **kw):
    """Forward, lse and q/k/v gradients of flash vs the reference (computed in fp32).

    Each side is one jitted program (one compilation instead of many small eager ones)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

    @jax.jit
    def flash_side(q, k, v):
        out, lse = flash_attention_forward(q, k, v, block_sizes=TILES, backend=backend, **kw)
        fn = functools.partial(flash_attention, block_sizes=TILES, backend=backend, **kw)
        return out, lse, jax.grad(loss(fn), (0, 1, 2))(q, k, v)

    @jax.jit
    def reference_side(q, k, v):
        ref, ref_lse = flash_attention_reference(q, k, v, return_lse=True, **kw)
        fn = functools.partial(flash_attention_reference, **kw)
        return ref, ref_lse, jax.grad(loss(fn), (0, 1, 2))(q, k, v)

    out, lse, got = flash_side(q, k, v)
    ref, ref_lse, want = reference_side(*f32)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=0)
    # lse: -inf exactly on rows that see no key, equal elsewhere
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=tol, rtol=0)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == q.dtype, name
        gt = grad_tol if grad_tol is not None else tol
        np.testing.assert_allclose(
            np.asarray(g, np.float32), w, atol=gt, rtol=0, err_msg=f"d{name}"
        )
    return out, ref


# --- the combinations: every one has a fast case ----------------------------------------------


def test_causal_gqa_segments_unaligned_lengths():
    """causal + GQA (4 query heads on 2 K/V heads) + packed segment ids, 40 = 2.5 tiles."""
    q, k, v = rand((2, 40, 4, 32), 0), rand((2, 40, 2, 32), 1), rand((2, 40, 2, 32), 2)
    check_against_reference(q, k, v, causal=True, segment_ids=sorted_ids(2, 40, 3))


def test_noncausal_mqa_head_dim_64_segment_pair_cross_lengths():
    """non-causal + MQA (1 K/V head) + (q_ids, kv_ids) pair, q_len 24 != kv_len 50, head_dim 64."""
    q, k, v = rand((2, 24, 4, 64), 0), rand((2, 50, 1, 64), 1), rand((2, 50, 1, 64), 2)
    check_against_reference(q, k, v, segment_ids=(sorted_ids(2, 24, 3), sorted_ids(2, 50, 4)))


def test_causal_bottom_right_with_empty_rows_and_padding_mask():
    """q_len 50 > kv_len 24: causal bottom-right leaves the first 26 rows with no key -> zeros;
    a [batch, 1, 1, kv_len] padding mask on top."""
    q, k, v = rand((2, 50, 2, 16), 0), rand((2, 24, 2, 16), 1), rand((2, 24, 2, 16), 2)
    valid = jnp.asarray(np.arange(24)[None] < np.array([[17], [24]]))[:, None, None, :]
    out, _ = check_against_reference(q, k, v, causal=True, mask=valid)
    assert np.all(np.asarray(out)[:, :26] == 0)
    assert np.all(np.abs(np.asarray(out)[:, 26:]) > 0)


def test_causal_chunk_after_prefix_matches_ops_attention():
    """q_len 20 < kv_len 52 (new queries after a prefix) through mmjax.ops.attention."""
    q, k, v = rand((1, 20, 4, 16), 0), rand((1, 52, 2, 16), 1), rand((1, 52, 2, 16), 2)
    check_against_reference(q, k, v, causal=True)
    got = jax.jit(functools.partial(attention, causal=True, implementation="flash"))(q, k, v)
    want = jax.jit(functools.partial(attention, causal=True, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(got, want, atol=FP32_TOL, rtol=0)


def test_arbitrary_per_head_mask_with_fully_masked_rows():
    """A full [1, heads, q_len, kv_len] boolean mask, some rows all False (-> zeros)."""
    q, k, v = rand((2, 21, 4, 16), 0), rand((2, 37, 2, 16), 1), rand((2, 37, 2, 16), 2)
    m = np.random.default_rng(5).random((1, 4, 21, 37)) > 0.5
    m[0, 1, 3] = False
    m[0, 2, 20] = False
    out, _ = check_against_reference(q, k, v, mask=jnp.asarray(m))
    assert np.all(np.asarray(out)[:, 3, 1] == 0) and np.all(np.asarray(out)[:, 20, 2] == 0)


def test_bf16_head_dim_128_causal_gqa():
    """bf16 inputs, fp32 accumulation. Tolerance: the kernel rounds the probabilities to bf16
    before the P.V product (as FlashAttention does) and the output to bf16; both are ~2^-8
    relative, so outputs of magnitude <= ~1 are within 2e-2 and gradients within 5e-2 of the
    fp32 reference on the same (bf16-rounded) inputs. A wrong mask or a missed rescale gives
    errors of order 1."""
    q, k, v = (rand((1, 48, 4, 128), s, jnp.bfloat16) for s in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    check_against_reference(q, k, v, tol=2e-2, grad_tol=5e-2, causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_head_dims_64_128(head_dim, causal):
    q, k, v = (
        rand((1, 33, 2, head_dim), 0),
        rand((1, 33, 2, head_dim), 1),
        rand((1, 33, 2, head_dim), 2),
    )
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.slow
def test_bf16_segments_mask_noncausal():
    q, k, v = (rand((2, 40, 2, 64), s, jnp.bfloat16) for s in range(3))
    mask = jnp.asarray(np.random.default_rng(1).random((2, 1, 40, 40)) > 0.3)
    check_against_reference(
        q, k, v, tol=2e-2, grad_tol=5e-2, segment_ids=sorted_ids(2, 40, 2), mask=mask
    )


# --- TPU (Mosaic) kernels under force_tpu_interpret_mode --------------------------------------


def test_tpu_kernels_causal_gqa_segments_mask():
    q, k, v = rand((2, 40, 4, 16), 0), rand((2, 40, 2, 16), 1), rand((2, 40, 2, 16), 2)
    mask = jnp.asarray(np.random.default_rng(2).random((2, 4, 1, 40)) > 0.2)
    with pltpu.force_tpu_interpret_mode():
        check_against_reference(
            q, k, v, backend="mosaic", causal=True, segment_ids=sorted_ids(2, 40, 3), mask=mask
        )


@pytest.mark.slow
def test_tpu_kernels_noncausal_mqa_pair_and_empty_rows():
    q, k, v = rand((1, 50, 4, 32), 0), rand((1, 24, 1, 32), 1), rand((1, 24, 1, 32), 2)
    with pltpu.force_tpu_interpret_mode():
        check_against_reference(q, k, v, backend="mosaic", causal=True)
        check_against_reference(
            q, k, v, backend="mosaic", segment_ids=(sorted_ids(1, 50, 1), sorted_ids(1, 24, 2))
        )


# --- causal tile skipping -------------------------------------------------------------------


def test_causal_skips_future_tiles():
    """A tile that is visited but masked still multiplies 0 x value, so a NaN there would leak
    into the output. NaN keys/values in the future tiles of the first query tile must not reach
    its rows (forward and dQ), and NaN queries before a key tile's first visible row must not
    reach its dK/dV."""
    q, k, v = rand((1, 64, 2, 16), 0), rand((1, 64, 2, 16), 1), rand((1, 64, 2, 16), 2)
    k_nan = k.at[:, 16:].set(jnp.nan)
    v_nan = v.at[:, 16:].set(jnp.nan)
    out = jax.jit(functools.partial(flash_attention, causal=True, block_sizes=TILES))(
        q, k_nan, v_nan
    )
    ref = flash_attention_reference(q[:, :16], k[:, :16], v[:, :16], causal=True)
    np.testing.assert_allclose(out[:, :16], ref, atol=FP32_TOL)
    assert np.all(np.isnan(np.asarray(out)[:, 16:]))  # the later rows did read them

    dq = jax.jit(
        jax.grad(
            lambda q: jnp.sum(
                flash_attention(q, k_nan, v_nan, causal=True, block_sizes=TILES)[:, :16]
            )
        )
    )(q)
    assert np.all(np.isfinite(np.asarray(dq)[:, :16]))

    q_nan = q.at[:, :48].set(jnp.nan)
    dk, dv = jax.jit(
        jax.grad(
            lambda k, v: jnp.sum(
                flash_attention(q_nan, k, v, causal=True, block_sizes=TILES)[:, 48:]
            ),
            (0, 1),
        )
    )(k, v)
    assert np.all(np.isfinite(np.asarray(dk)[:, 48:])) and np.all(
        np.isfinite(np.asarray(dv)[:, 48:])
    )


def test_tile_loop_bounds():
    """Causal tiles visited: the lower triangle of tiles only (10 of 16 for 4 x 4 tiles), with
    the bottom-right offset when kv_len != q_len."""
    q, k = jnp.zeros((1, 64, 1, 16)), jnp.zeros((1, 64, 1, 16))
    spec = make_spec(q, k, causal=True, block_sizes=TILES)
    per_q = [int(_kv_blocks_visible(spec, i, 16, 16, 4)) for i in range(4)]
    assert per_q == [1, 2, 3, 4]
    assert [int(_first_q_block(spec, j, 16, 16)) for j in range(4)] == [0, 1, 2, 3]
    k2 = jnp.zeros((1, 96, 1, 16))  # 32 keys of prefix: every query tile sees 2 more key tiles
    spec2 = make_spec(q, k2, causal=True, block_sizes=TILES)
    assert [int(_kv_blocks_visible(spec2, i, 16, 16, 6)) for i in range(4)] == [3, 4, 5, 6]
    assert make_spec(q, k, causal=False, block_sizes=TILES).causal is False


# --- wiring and bad input ---------------------------------------------------------------------


def test_tiny_llama_flash_matches_xla():
    """implementation='flash' in the model config gives the xla logits: packed segments (ids
    to the kernel) and a padding mask (through the mask path) in one call."""
    from mmjax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig.from_variant("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24])
    valid = jnp.asarray(np.arange(24)[None] < np.array([[20], [24]]))
    model = Llama(cfg)
    params = random_params(model, tokens)
    flash = Llama(cfg.replace(implementation="flash"))

    def run(m):
        return jax.jit(lambda p: m.apply({"params": p}, tokens, segment_ids=seg, input_mask=valid))

    want, got = run(model)(params), run(flash)(params)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)


def test_block_sizes_validate_themselves():
    with pytest.raises(InputError, match="block_q must be a power of two"):
        BlockSizes(block_q=96)
    with pytest.raises(InputError, match="block_k_dq"):
        BlockSizes(block_k_dq=8)
    with pytest.raises(InputError, match="num_warps"):
        BlockSizes(num_warps=3)
    assert BlockSizes.for_platform("gpu", 128).launch(128) == (8, 2)
    assert BlockSizes.for_platform("gpu", 64).launch(64) == (4, 3)
    assert hash(BlockSizes()) == hash(BlockSizes())  # usable as a static argument


def test_forced_flash_names_the_limit():
    q = jnp.zeros((1, 8, 2, 320))
    with pytest.raises(AttentionInputError, match="head_dim 320"):
        attention(q, q, q, implementation="flash")
    with pytest.raises(InputError, match="head_dim 320"):
        flash_attention(q, q, q)
    q64 = jnp.zeros((1, 8, 2, 16), jnp.float64) if jax.config.jax_enable_x64 else None
    if q64 is not None:
        with pytest.raises(AttentionInputError, match="dtype"):
            attention(q64, q64, q64, implementation="flash")


def test_default_implementation_per_platform(monkeypatch):
    """None picks xla on CPU, flash on TPU, cuDNN for half precision without masks on GPU and
    flash otherwise; inputs the kernel can't take fall back to xla with one warning."""
    att = importlib.import_module("mmjax.ops.attention")  # the module, not the function

    q16 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    q32 = jnp.zeros((1, 8, 2, 64), jnp.float32)
    seg = jnp.zeros((1, 8), jnp.int32)
    assert att._default_implementation(q32, q32, None, None) == "xla"  # CPU here
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert att._default_implementation(q16, q16, None, None) == "flash"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert att._default_implementation(q16, q16, None, None) == "cudnn"
    assert att._default_implementation(q16, q16, None, seg) == "flash"
    assert att._default_implementation(q32, q32, None, None) == "flash"
    big = jnp.zeros((1, 8, 2, 512), jnp.bfloat16)
    att._WARNED.clear()
    with pytest.warns(UserWarning, match="head_dim 512"):
        assert att._default_implementation(big, big, None, seg) == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert att._default_implementation(big, big, None, seg) == "xla"


def test_compiled_memory_grows_linearly_for_flash_quadratically_for_xla():
    """The benchmark's memory table (compiled fwd+bwd programs, never run): doubling the length
    doubles flash's temporary bytes and quadruples xla's ([seq, seq] scores)."""
    from mmjax.bench.attention import _memory_table

    table = _memory_table(("xla", "flash"), (512, 2048), heads=2, head_dim=32, dtype="float32")
    growth = table["growth_exponent"]
    assert 0.8 < growth["flash"] < 1.2, growth
    assert 1.8 < growth["xla"] < 2.2, growth


def test_runs_per_shard_under_the_current_mesh():
    """Under mmjax.parallel.activate(mesh) (data=4 x tensor=2) the kernel runs on each device's
    batch/head shard: no all-gather in the compiled program, values and gradients still equal
    xla (without a mesh, XLA gathers the inputs to run the kernel whole)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mmjax.parallel import make_mesh
    from mmjax.parallel.mesh import activate

    mesh = make_mesh("data=4,tensor=2")
    q, k, v = rand((4, 24, 4, 16), 0), rand((4, 24, 2, 16), 1), rand((4, 24, 2, 16), 2)
    seg = sorted_ids(4, 24, 3)
    mask = jnp.asarray(np.random.default_rng(4).random((4, 1, 1, 24)) > 0.2)

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            jnp.sin(
                attention(q, k, v, causal=True, segment_ids=seg, mask=mask, implementation=impl)
            )
        )

    with activate(mesh):
        sh = NamedSharding(mesh, P("data", None, "tensor"))
        qs, ks, vs = (jax.device_put(x, sh) for x in (q, k, v))
        fwd = jax.jit(
            lambda q, k, v: attention(
                q, k, v, causal=True, segment_ids=seg, mask=mask, implementation="flash"
            )
        )
        compiled = fwd.lower(qs, ks, vs).compile()
        assert "all-gather" not in compiled.as_text()
        out = compiled(qs, ks, vs)
        grads = jax.jit(jax.grad(loss("flash"), (0, 1, 2)))(qs, ks, vs)
    want = attention(q, k, v, causal=True, segment_ids=seg, mask=mask, implementation="xla")
    np.testing.assert_allclose(out, want, atol=FP32_TOL, rtol=0)
    for g, w in zip(grads, jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, w, atol=FP32_TOL, rtol=0)
