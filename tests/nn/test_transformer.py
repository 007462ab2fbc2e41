"""The shared transformer stack (`mmjax.nn.transformer`): block formulas (pre/post-norm,
cross-attention), loop == scan (outputs, grads, KV-cache decoding, MoE losses), remat policies,
the two param layouts both ways, and a scanned LLaMA converted from and to Hugging Face.

Tolerances: scan and loop run the same ops in the same order per layer; XLA may fuse them
differently, so float32 outputs agree to ~1e-7 (measured <= 2e-7) and grads of a summed-logits
loss (magnitudes ~1e1) to ~5e-5; we assert 1e-5 / rel 1e-4."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.nn.moe import aux_losses
from mmjax.nn.transformer import (Block, BlockSpec, is_scanned, make_layers, match_layer_layout,
                                  run_layers, stack_layer_params, unstack_layer_params)

CFG = LlamaConfig.from_variant("tiny", vocab_size=64, dim=32, num_heads=4, num_kv_heads=2,
                               mlp_dim=48, num_layers=3, max_len=32)


def _unbox(tree):
    return nn.meta.unbox(tree)


def _tokens(b=2, t=10, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


class _Stack(nn.Module):
    spec: BlockSpec
    n: int = 2
    scan: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x, ctx=None, causal=False):
        layers = make_layers(self.spec, self.n, scan=self.scan, remat=self.remat)
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return run_layers(layers, x, positions=pos, cross_input=ctx, causal=causal)[0]


def test_post_norm_block_is_norm_of_residual_sums():
    """BERT order: x = LN(x + Attn(x)); x = LN(x + MLP(x)), checked against the formula built
    from the block's own sub-modules' params."""
    spec = BlockSpec(num_heads=2, mlp_dim=16, norm="layer", norm_position="post", mlp="plain",
                     activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                     norm_eps=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    block = Block(spec)
    params = _unbox(block.init(jax.random.PRNGKey(0), x)["params"])
    assert set(params) == {"attn", "attn_norm", "mlp", "mlp_norm"}
    got, _ = block.apply({"params": params}, x)

    def ln(v, p):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / jnp.sqrt(var + 1e-12) * p["scale"] + p["bias"]

    a = params["attn"]
    q = jnp.einsum("bte,ehd->bthd", x, a["query"]["kernel"]) + a["query"]["bias"]
    k = jnp.einsum("bte,ehd->bthd", x, a["key"]["kernel"]) + a["key"]["bias"]
    v = jnp.einsum("bte,ehd->bthd", x, a["value"]["kernel"]) + a["value"]["bias"]
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4), -1)
    att = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    att = jnp.einsum("bqhd,hde->bqe", att, a["out"]["kernel"]) + a["out"]["bias"]
    h = ln(x + att, params["attn_norm"])
    m = params["mlp"]
    f = jax.nn.gelu(h @ m["fc1"]["kernel"] + m["fc1"]["bias"], approximate=False)
    want = ln(h + f @ m["fc2"]["kernel"] + m["fc2"]["bias"], params["mlp_norm"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_cross_attention_reads_the_context_and_is_required():
    spec = BlockSpec(num_heads=2, mlp_dim=16, norm="layer", mlp="plain", activation="gelu",
                     cross_attention=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 12))  # other length and width
    stack = _Stack(spec)
    params = stack.init(jax.random.PRNGKey(0), x, ctx)["params"]
    assert {"cross_attn", "cross_norm"} <= set(params["layers_0"])
    assert _unbox(params)["layers_0"]["cross_attn"]["key"]["kernel"].shape == (12, 2, 4)
    a = stack.apply({"params": params}, x, ctx)
    b = stack.apply({"params": params}, x, ctx.at[:, 3].add(1.0))
    assert float(jnp.abs(a - b).max()) > 1e-4  # the context is read
    with pytest.raises(ConfigError, match="cross_input"):
        stack.apply({"params": params}, x)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_outputs_and_grads(remat):
    spec = BlockSpec(num_heads=2, mlp_dim=16, rope_theta=1e4)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 8))
    plain = _Stack(spec, n=2)
    params = plain.init(jax.random.PRNGKey(0), x)["params"]
    for scan in (False, True):
        stack = _Stack(spec, n=2, scan=scan, remat=remat)
        p = stack_layer_params(_unbox(params)) if scan else params

        def loss(m, q):
            return jnp.sum(m.apply({"params": q}, x, causal=True) ** 2)
        np.testing.assert_allclose(float(loss(stack, p)), float(loss(plain, params)), rtol=1e-6)
        g, g0 = jax.grad(lambda q: loss(stack, q))(p), jax.grad(lambda q: loss(plain, q))(params)
        g = unstack_layer_params(_unbox(g)) if scan else _unbox(g)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(_unbox(g0))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="remat policy"):
        make_layers(spec, 2, remat="everything")


def test_layouts_round_trip_and_match():
    rng = np.random.default_rng(0)
    tree = {"embed": {"embedding": rng.normal(size=(3, 2))},
            **{f"layers_{i}": {"attn": {"kernel": rng.normal(size=(2, 2))}, "n": {"s": rng.normal(size=2)}}
               for i in range(3)},
            "vision": {f"layers_{i}": {"w": rng.normal(size=(4,))} for i in range(2)}}
    stacked = stack_layer_params(tree)
    assert stacked["layers"]["block"]["attn"]["kernel"].shape == (3, 2, 2)
    assert stacked["vision"]["layers"]["block"]["w"].shape == (2, 4)  # nested towers too
    assert is_scanned(stacked) and not is_scanned(tree)
    back = unstack_layer_params(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(a, b)
    assert match_layer_layout(tree, stacked)["layers"]["block"]["attn"]["kernel"].shape == (3, 2, 2)
    assert match_layer_layout(stacked, tree).keys() == tree.keys()
    # stack by stack: a two-tower model may scan one tower and loop the other
    mixed_target = {**tree, "vision": stack_layer_params(tree["vision"])}
    mixed = match_layer_layout(tree, mixed_target)
    assert mixed["vision"]["layers"]["block"]["w"].shape == (2, 4) and "layers_0" in mixed
    assert match_layer_layout(mixed, tree)["vision"].keys() == tree["vision"].keys()
    with pytest.raises(ConfigError, match="numbered"):
        stack_layer_params({"layers_0": {"w": 1}, "layers_2": {"w": 2}})


@pytest.fixture(scope="module")
def llama_pair():
    loop, scan = Llama(CFG), Llama(CFG.replace(scan_layers=True))
    params = _unbox(loop.init(jax.random.PRNGKey(3), _tokens())["params"])
    abstract = jax.eval_shape(lambda r: scan.init(r, _tokens())["params"], jax.random.PRNGKey(3))
    sp = match_layer_layout(params, _unbox(abstract))
    assert jax.tree_util.tree_structure(sp) == jax.tree_util.tree_structure(_unbox(abstract))
    assert abstract["layers"]["block"]["attn"]["query"]["kernel"].names[0] == "layers"
    return loop, params, scan, sp


def test_scanned_llama_equals_loop_forward_grads_and_intermediates(llama_pair):
    loop, params, scan, sp = llama_pair
    t = _tokens()
    mask = jnp.array([[1] * 10, [0] * 3 + [1] * 7], bool)
    a, ia = loop.apply({"params": params}, t, input_mask=mask, return_intermediates=True)
    b, ib = scan.apply({"params": sp}, t, input_mask=mask, return_intermediates=True)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    assert len(ib["hidden_states"]) == CFG.num_layers + 1
    for x, y in zip(ia["hidden_states"], ib["hidden_states"]):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=0)
    g = jax.grad(lambda p: loop.apply({"params": p}, t).sum())(params)
    gs = jax.grad(lambda p: scan.apply({"params": p}, t).sum())(sp)
    for x, y in zip(jax.tree_util.tree_leaves(stack_layer_params(g)), jax.tree_util.tree_leaves(gs)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)


def test_scanned_llama_decodes_with_the_cache_like_the_loop(llama_pair):
    loop, params, scan, sp = llama_pair
    t = _tokens(2, 6)
    outs = []
    for model, p in ((loop, params), (scan, sp)):
        step = jax.jit(lambda p, x, c, m=model: m.apply({"params": p}, x, cache=c))
        logits, cache = step(p, t, model.init_cache(2, 16))
        seq = [logits[:, -1]]
        for _ in range(4):
            nxt = jnp.argmax(seq[-1], -1)[:, None].astype(jnp.int32)
            logits, cache = step(p, nxt, cache)
            seq.append(logits[:, -1])
        outs.append(np.stack([np.asarray(s) for s in seq]))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=0)


def test_scanned_llama_keeps_a_stacked_cache_and_beam_searches_like_the_loop(llama_pair):
    from mmjax.generate import GenerationConfig, generate

    loop, params, scan, sp = llama_pair
    cache = scan.init_cache(2, 16)
    assert cache.stacked and cache.k.shape == (CFG.num_layers, 2, 16, CFG.kv_heads, CFG.head_size)
    assert cache.nbytes() == loop.init_cache(2, 16).nbytes()
    gen = GenerationConfig(max_new_tokens=4, num_beams=2, eos_token_id=(), prompt_bucket=4)
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(loop, params, prompts, gen)
    b = generate(scan, sp, prompts, gen)
    assert a.tokens.tolist() == b.tokens.tolist()
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)


def test_scanned_moe_sows_the_same_aux_losses():
    cfg = CFG.replace(num_experts=4, mlp_dim=16)
    loop, scan = Llama(cfg), Llama(cfg.replace(scan_layers=True))
    t = _tokens()
    params = _unbox(loop.init(jax.random.PRNGKey(0), t)["params"])
    _, la = loop.apply({"params": params}, t, mutable=["losses"])
    _, lb = scan.apply({"params": stack_layer_params(params)}, t, mutable=["losses"])
    a, b = aux_losses(la), aux_losses(lb)
    assert set(a) == set(b) == {"moe_load_balance", "moe_router_z"}
    for k in a:
        assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5)


def test_hf_llama_converts_into_and_out_of_a_scanned_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mmjax.convert import from_hf, to_hf
    from mmjax.convert.hf_io import read_weights

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    module, params = from_hf(str(tmp_path / "hf"))
    scan = Llama(module.config.replace(scan_layers=True))
    abstract = _unbox(jax.eval_shape(lambda r: scan.init(r, _tokens())["params"], jax.random.PRNGKey(0)))
    sp = match_layer_layout(params, abstract)
    t = _tokens(2, 9)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.asarray(t, np.int64))).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = scan.apply({"params": sp}, t)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)  # fp32 parity bound
    to_hf(scan, sp, str(tmp_path / "back"))
    a, b = read_weights(str(tmp_path / "hf")), read_weights(str(tmp_path / "back"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
