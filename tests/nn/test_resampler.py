"""QwenVLResampler: any grid -> num_queries tokens, parity with a PyTorch reference, positions on
the keys only, gradients to every param, clear errors."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.nn import QwenVLResampler
from mmjax.nn.resampler import _TRUNC_NORMAL_002, qwen_sincos2d_positions

DIM, KV_DIM, HEADS, Q = 64, 48, 4, 16  # query grid 4 x 4


MODULE = QwenVLResampler(num_queries=Q, dim=DIM, num_heads=HEADS, kv_dim=KV_DIM)
# one compiled program per grid, shared by the tests (compiling dominates their time)
APPLY = jax.jit(lambda p, x, hw: MODULE.apply({"params": p}, x, hw), static_argnums=2)


def _feats(grid_hw, batch=2, seed=0):
    h, w = grid_hw
    return jax.random.normal(jax.random.key(seed), (batch, h * w, KV_DIM), jnp.float32)


@pytest.fixture(scope="module")
def boxed():
    """MODULE's param tree as init returns it (boxed with logical names), shapes only."""
    return jax.eval_shape(lambda: MODULE.init(jax.random.key(1), _feats((7, 5)), (7, 5)))["params"]


@pytest.fixture
def params(boxed):
    """Random params of that tree (norm scales around 1), without running init."""
    rng = np.random.default_rng(0)
    tree = nn.meta.unbox(boxed)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + x if jax.tree_util.keystr(path).endswith("['scale']") else x)

    return jax.tree_util.tree_map_with_path(draw, tree)


def test_output_is_num_queries_tokens_for_any_grid(params):
    for h, w in [(4, 4), (7, 5), (16, 16)]:
        out = APPLY(params, _feats((h, w)), (h, w))
        assert out.shape == (2, Q, DIM) and bool(jnp.all(jnp.isfinite(out))), (h, w)


def test_param_tree_and_logical_axes(boxed):
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    names = {jax.tree_util.keystr(p): leaf for p, leaf in leaves}
    for path, leaf in names.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
    shapes = {k: v.value.shape for k, v in names.items()}
    assert shapes["['query']"] == (Q, DIM)
    assert shapes["['kv_proj']['kernel']"] == (KV_DIM, DIM)
    assert shapes["['attn']['query']['kernel']"] == (DIM, HEADS, DIM // HEADS)
    assert shapes["['attn']['out']['kernel']"] == (HEADS, DIM // HEADS, DIM)
    assert shapes["['proj']['kernel']"] == (DIM, DIM)
    assert {"['ln_q']['scale']", "['ln_kv']['bias']", "['ln_post']['scale']"} <= set(shapes)
    # kv_dim == dim: no kv_proj (Qwen's identity)
    same = QwenVLResampler(num_queries=Q, dim=DIM, num_heads=HEADS)
    tree = jax.eval_shape(lambda: same.init(jax.random.key(0), jnp.zeros((1, 16, DIM))))["params"]
    assert "kv_proj" not in tree
    # init: std 0.02 for the queries and kernels (truncated at 2 std)
    draw = np.asarray(_TRUNC_NORMAL_002(jax.random.key(0), (20000,)))
    assert abs(draw.std() - 0.02) < 5e-4 and np.abs(draw).max() <= 0.04 / 0.8796 + 1e-6
    # defaults: 256 queries, dim // 128 heads (at least 1)
    assert QwenVLResampler(dim=4096).heads == 32 and QwenVLResampler(dim=64).heads == 1


# --- PyTorch reference --------------------------------------------------------------------------

def _torch_reference(torch, dim, heads, kv_dim, num_queries):
    """Qwen-VL's resampler + ln_post + proj, written from its description with torch modules."""
    F = torch.nn.functional

    def sincos(g):  # MAE / Qwen convention, computed independently in torch (float64)
        quarter = dim // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        row, col = torch.meshgrid(torch.arange(g, dtype=torch.float64),
                                  torch.arange(g, dtype=torch.float64), indexing="ij")
        ex = col.reshape(-1, 1) * omega
        ey = row.reshape(-1, 1) * omega
        return torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()], dim=1).float()

    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = int(math.isqrt(num_queries))
            self.register_buffer("pos_embed", sincos(self.g))
            self.query = torch.nn.Parameter(torch.randn(num_queries, dim) * 0.02)
            self.kv_proj = torch.nn.Linear(kv_dim, dim, bias=False)
            self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
            self.ln_q = torch.nn.LayerNorm(dim, eps=1e-6)
            self.ln_kv = torch.nn.LayerNorm(dim, eps=1e-6)
            self.ln_post = torch.nn.LayerNorm(dim, eps=1e-6)
            self.proj = torch.nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))

        def forward(self, x, hw):
            h, w = hw
            grid = self.pos_embed.reshape(1, self.g, self.g, dim).permute(0, 3, 1, 2)
            key_pos = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            key_pos = key_pos.permute(0, 2, 3, 1).reshape(h * w, dim)
            x = self.ln_kv(self.kv_proj(x))
            q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
            out = self.attn(q, x + key_pos, x, need_weights=False)[0]
            return self.ln_post(out) @ self.proj

    return Ref()


def _randomise(torch, ref):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ln in (ref.ln_q, ref.ln_kv, ref.ln_post):
            ln.weight.copy_(1 + 0.3 * torch.randn(ln.weight.shape, generator=g))
            ln.bias.copy_(0.3 * torch.randn(ln.bias.shape, generator=g))
        ref.attn.in_proj_bias.copy_(0.3 * torch.randn(ref.attn.in_proj_bias.shape, generator=g))
        ref.attn.out_proj.bias.copy_(0.3 * torch.randn(ref.attn.out_proj.bias.shape, generator=g))
        ref.query.mul_(20.0)  # O(1) queries, so the attention is far from uniform


def _to_jax(ref, heads):
    """The torch module's weights in the mmjax param tree (the mapping the docstring gives)."""
    t = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    dim = t["query"].shape[1]
    hd = dim // heads
    wq, wk, wv = np.split(t["attn.in_proj_weight"], 3)
    bq, bk, bv = np.split(t["attn.in_proj_bias"], 3)
    ln = lambda n: {"scale": t[f"{n}.weight"], "bias": t[f"{n}.bias"]}  # noqa: E731
    return {
        "query": t["query"],
        "kv_proj": {"kernel": t["kv_proj.weight"].T},
        "ln_kv": ln("ln_kv"), "ln_q": ln("ln_q"), "ln_post": ln("ln_post"),
        "attn": {
            "query": {"kernel": wq.T.reshape(dim, heads, hd), "bias": bq.reshape(heads, hd)},
            "key": {"kernel": wk.T.reshape(dim, heads, hd), "bias": bk.reshape(heads, hd)},
            "value": {"kernel": wv.T.reshape(dim, heads, hd), "bias": bv.reshape(heads, hd)},
            "out": {"kernel": t["attn.out_proj.weight"].T.reshape(heads, hd, dim),
                    "bias": t["attn.out_proj.bias"]},
        },
        "proj": {"kernel": t["proj"]},
    }


@pytest.mark.parametrize("grid_hw", [(7, 5), (4, 4)])  # resize path; query grid itself
def test_matches_pytorch_reference(grid_hw):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = _torch_reference(torch, DIM, HEADS, KV_DIM, Q).eval()
    _randomise(torch, ref)
    h, w = grid_hw
    x = torch.randn(2, h * w, KV_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x, grid_hw).numpy()
    # the reference's positions are the module's
    np.testing.assert_allclose(ref.pos_embed.numpy(), qwen_sincos2d_positions(4, 4, DIM), atol=1e-6)

    params = _to_jax(ref, HEADS)
    got = np.asarray(APPLY(params, jnp.asarray(x.numpy()), grid_hw))
    diff = float(np.max(np.abs(got - want)))
    # fp32: measured 1.0e-6 (7x5) / 7.2e-7 (4x4) on CPU, output values O(1)
    print(f"parity {grid_hw}: max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff
    assert float(np.max(np.abs(want))) > 0.5  # not a trivially small output


# --- positions ----------------------------------------------------------------------------------

def test_positions_reach_keys_not_values(params):
    feats = _feats((7, 5))
    # ln_kv with scale 0 makes every token's key/value input the same vector (its bias): the
    # keys then differ only by their positions, the values not at all, so every query gets
    # the same output. Were positions added to the values, the rows would differ.
    bias = jax.random.normal(jax.random.key(5), (DIM,))
    params["ln_kv"] = {"scale": jnp.zeros(DIM), "bias": bias}
    out = APPLY(params, feats, (7, 5))
    assert float(jnp.max(jnp.abs(out - out[:, :1]))) < 1e-5
    assert float(jnp.max(jnp.abs(out))) > 0.1


def test_output_depends_on_token_order(params):
    # without positions, attention over the tokens would be invariant to their order
    feats = _feats((7, 5))
    perm = jax.random.permutation(jax.random.key(9), 35)
    a = APPLY(params, feats, (7, 5))
    b = APPLY(params, feats[:, perm], (7, 5))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2
    # reading the same 35 tokens as a 5x7 grid moves their positions too
    c = APPLY(params, feats, (5, 7))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_sincos_layout():
    pos = qwen_sincos2d_positions(2, 3, 8)  # [6, 8]; quarter = 2, freqs 1, 0.01
    row, col = np.divmod(np.arange(6), 3)
    np.testing.assert_allclose(pos[:, 0], np.sin(col), atol=1e-7)
    np.testing.assert_allclose(pos[:, 3], np.cos(col * 0.01), atol=1e-7)
    np.testing.assert_allclose(pos[:, 4], np.sin(row), atol=1e-7)
    np.testing.assert_allclose(pos[:, 7], np.cos(row * 0.01), atol=1e-7)


# --- gradients ----------------------------------------------------------------------------------

def test_gradient_reaches_every_param(params):
    feats = _feats((7, 5))
    target = jax.random.normal(jax.random.key(7), (2, Q, DIM))
    loss = lambda p: jnp.sum(MODULE.apply({"params": p}, feats, (7, 5)) * target)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    norms = {jax.tree_util.keystr(p): float(jnp.max(jnp.abs(g)))
             for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert len(norms) == 17  # query, kv_proj, 3 norms x 2, attn 4 x (kernel, bias), proj
    # The key bias adds q . b_k to every logit of a query alike, which the softmax cancels: its
    # gradient is exactly 0 in exact arithmetic (so in torch's MultiheadAttention too); it is
    # kept for checkpoint compatibility. Every other param gets a real gradient.
    key_bias = norms.pop("['attn']['key']['bias']")
    assert key_bias < 1e-4 * min(norms.values()), key_bias
    assert all(v > 1e-3 for v in norms.values()), {k: v for k, v in norms.items() if v <= 1e-3}


# --- errors -------------------------------------------------------------------------------------

def test_bad_inputs_raise_input_error(params):
    apply = lambda x, hw=None: APPLY(params, x, hw)  # noqa: E731
    with pytest.raises(InputError, match="batch, tokens, kv_dim"):
        apply(jnp.zeros((16, KV_DIM)))
    with pytest.raises(InputError, match="grid_hw=3x5"):
        apply(jnp.zeros((1, 16, KV_DIM)), (3, 5))
    with pytest.raises(InputError, match=r"must be \(h, w\)"):
        apply(jnp.zeros((1, 16, KV_DIM)), 16)
    with pytest.raises(InputError, match="no square grid"):
        apply(jnp.zeros((1, 35, KV_DIM)))
    with pytest.raises(InputError, match="CLS"):
        apply(jnp.zeros((1, 17, KV_DIM)))
    with pytest.raises(InputError, match="kv_dim=48"):
        apply(jnp.zeros((1, 16, DIM)))


@pytest.mark.parametrize("fields, match", [
    (dict(num_queries=15), "perfect square"),
    (dict(num_heads=5), "not divisible"),
    (dict(dim=66, num_heads=2), "divisible by 4"),
])
def test_bad_config_raises_config_error(fields, match):
    m = QwenVLResampler(**{**dict(num_queries=Q, dim=DIM, num_heads=HEADS), **fields})
    with pytest.raises(ConfigError, match=match):
        m.init(jax.random.key(0), jnp.zeros((1, 16, DIM)))
