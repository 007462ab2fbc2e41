"""Ring attention on 8 simulated CPU devices: values and gradients equal full (xla) attention.

Gradients are of a nonlinear loss (sum of sin(out)) so d_out varies per element. fp32
tolerance 1e-5 (measured ~1e-6: the ring only changes the summation order, merging partial
softmaxes by their log-sum-exp). Every jitted call is followed by block_until_ready(): many
back-to-back ppermute programs on simulated CPU devices can deadlock XLA's rendezvous
(FACTS.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from mmjax.kernels.flash_attention import BlockSizes
from mmjax.kernels.ring_attention import ring_attention, zigzag_indices

from mmjax.errors import InputError
from mmjax.ops import attention
from mmjax.ops.attention import AttentionInputError

TOL = 1e-5


def rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_params(model, tokens, seed=0):
    """Random weights of the init's shapes, without compiling `init` (that alone takes ~7 s)."""
    from flax.core import meta

    shapes = meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def mesh_of(**axes):
    return Mesh(
        np.array(jax.devices()[: int(np.prod(list(axes.values())))]).reshape(tuple(axes.values())),
        tuple(axes),
    )


def qkv(b=2, t=32, s=None, n=4, kh=2, h=16, dtype=jnp.float32):
    s = t if s is None else s
    return (
        rand((b, t, n, h), 0, dtype),
        rand((b, s, kh, h), 1, dtype),
        rand((b, s, kh, h), 2, dtype),
    )


def check_ring(mesh, q, k, v, tol=TOL, shard=None, **kw):
    """Output and q/k/v gradients of ring attention vs xla attention on the full sequence."""
    causal, seg = kw.get("causal", False), kw.get("segment_ids")
    if shard is not None:
        q, k, v = (jax.device_put(x, NamedSharding(mesh, shard)) for x in (q, k, v))

    def ring_loss(q, k, v):
        return jnp.sum(jnp.sin(ring_attention(q, k, v, mesh=mesh, **kw)))

    def ref_loss(q, k, v):
        return jnp.sum(
            jnp.sin(attention(q, k, v, causal=causal, segment_ids=seg, implementation="xla"))
        )

    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, **kw))(q, k, v)
    out.block_until_ready()
    grads = jax.jit(jax.grad(ring_loss, (0, 1, 2)))(q, k, v)
    jax.block_until_ready(grads)
    ref = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=seg))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)
    for name, g, w in zip("qkv", grads, jax.jit(jax.grad(ref_loss, (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(g, w, atol=tol, rtol=0, err_msg=f"d{name}")
    return out


def sorted_ids(b, t, seed):
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (b, t)), 1), jnp.int32)


def test_seq8_causal_zigzag_gqa_segments():
    check_ring(mesh_of(seq=8), *qkv(), causal=True, segment_ids=sorted_ids(2, 32, 3))


def test_seq8_noncausal_mqa_cross_lengths():
    """non-causal, MQA, q_len 16 != kv_len 32 (each sharded over the ring)."""
    check_ring(mesh_of(seq=8), *qkv(t=16, s=32, kh=1))


def test_data2_seq4_causal_batch_stays_sharded():
    """data=2 x seq=4: the batch stays sharded over data, the output keeps the input layout."""
    mesh = mesh_of(data=2, seq=4)
    out = check_ring(mesh, *qkv(), shard=P("data", "seq"), causal=True)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "seq")), 4)


def test_data2_seq4_contiguous_layout_and_segment_pair():
    check_ring(
        mesh_of(data=2, seq=4),
        *qkv(t=16, s=24, kh=1),
        segment_ids=(sorted_ids(2, 16, 1), sorted_ids(2, 24, 2)),
    )
    check_ring(mesh_of(data=2, seq=4), *qkv(), causal=True, layout="contiguous")


def test_tensor2_seq4_heads_sharded():
    """tensor=2 x seq=4: heads sharded over tensor (GQA groups stay together)."""
    check_ring(mesh_of(tensor=2, seq=4), *qkv(), shard=P(None, "seq", "tensor"), causal=True)


def test_project_mesh_through_ops_attention():
    """The five-axis mesh from mmjax.parallel.make_mesh, through mmjax.ops.attention."""
    from mmjax.parallel import make_mesh

    mesh = make_mesh("data=2,seq=4")
    q, k, v = qkv()
    f = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, implementation="ring", mesh=mesh))
    out = f(q, k, v).block_until_ready()
    np.testing.assert_allclose(out, attention(q, k, v, causal=True, implementation="xla"), atol=TOL)


def test_inputs_already_in_zigzag_order():
    """Data laid out in zigzag order by the caller (no reordering inside): output in that order."""
    mesh = mesh_of(seq=4)
    q, k, v = qkv()
    idx = zigzag_indices(32, 4)
    assert sorted(idx.tolist()) == list(range(32)) and idx[:8].tolist() == [
        0,
        1,
        2,
        3,
        28,
        29,
        30,
        31,
    ]
    f = jax.jit(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True, inputs_in_zigzag_order=True)
    )
    out = f(q[:, idx], k[:, idx], v[:, idx]).block_until_ready()
    ref = attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_allclose(out, ref[:, idx], atol=TOL)


def test_flash_blocks_in_interpret_mode():
    """block_impl='flash': the Pallas kernel does each ring step (interpret mode on CPU)."""
    check_ring(
        mesh_of(seq=2),
        *qkv(b=1, t=64, n=2, kh=1),
        causal=True,
        block_impl="flash",
        block_sizes=BlockSizes(16, 16, 16, 16, 16, 16),
    )


@pytest.mark.slow
def test_flash_blocks_noncausal_segments_seq4():
    check_ring(
        mesh_of(seq=4),
        *qkv(b=1, t=64, n=2, kh=2),
        block_impl="flash",
        segment_ids=sorted_ids(1, 64, 4),
        block_sizes=BlockSizes(16, 16, 16, 16, 16, 16),
    )


def test_bf16_causal():
    """bf16 inputs: fp32 merge and accumulation; each block's output and the final output are
    rounded to bf16 (~2^-8 relative), so 2e-2 absolute on outputs of magnitude <= ~1."""
    mesh = mesh_of(seq=8)
    q, k, v = qkv(dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True))(q, k, v)
    out.block_until_ready()
    assert out.dtype == jnp.bfloat16
    ref = attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=0)


def test_bad_input_names_the_numbers():
    mesh = mesh_of(seq=8)
    q, k, v = qkv(t=36)
    with pytest.raises(InputError, match="36 is not divisible by the ring size 8"):
        ring_attention(q, k, v, mesh=mesh)
    q, k, v = qkv(t=24)
    with pytest.raises(InputError, match="24 is not divisible by 2 x ring size = 16"):
        ring_attention(q, k, v, mesh=mesh, causal=True)
    with pytest.raises(AttentionInputError, match="needs mesh=.*or a current mesh"):
        attention(q, k, v, implementation="ring")
    with pytest.raises(AttentionInputError, match="segment id"):
        attention(q, k, v, implementation="ring", mesh=mesh, mask=jnp.ones((1, 1, 24, 24), bool))
    with pytest.raises(AttentionInputError, match="no axis 'sequence'"):
        attention(q, k, v, implementation="ring", mesh=mesh, seq_axis="sequence")
    q, k, v = qkv(t=16, s=32)
    with pytest.raises(InputError, match="causal needs q_len == kv_len"):
        ring_attention(q, k, v, mesh=mesh, causal=True)


def test_tiny_llama_ring_under_current_mesh():
    """LlamaConfig(implementation='ring') under mmjax.parallel.activate(data=2 x seq=4): the
    model passes no mesh, ring takes the current one; logits equal the xla model's."""
    from mmjax.models.llama import Llama, LlamaConfig
    from mmjax.parallel import make_mesh
    from mmjax.parallel.mesh import activate

    cfg = LlamaConfig.from_variant("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
    seg = jnp.asarray([[1] * 12 + [2] * 20, [1] * 32])
    model = Llama(cfg)
    params = random_params(model, tokens)
    want = jax.jit(lambda p: model.apply({"params": p}, tokens, segment_ids=seg))(params)
    ring = Llama(cfg.replace(implementation="ring"))
    with activate(make_mesh("data=2,seq=4")):
        got = jax.jit(lambda p, t, s: ring.apply({"params": p}, t, segment_ids=s))(
            params, tokens, seg
        )
        got.block_until_ready()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
