"""Mixture of Experts: routing and auxiliary losses on constructed inputs, the capacity path
against the dropless path, dropped tokens, expert parallelism against the unsharded layer, and
the LM objective with the auxiliary losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.nn.moe import (
    MoE,
    aux_losses,
    capacity,
    load_balance_loss,
    route,
    router_z_loss,
    slot_positions,
)
from mmjax.parallel import activate, get_preset, make_mesh
from mmjax.tasks.lm import lm_init_fn, lm_loss_fn, lm_loss_terms


def _init(layer, x, seed=0):
    return nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(seed), x)["params"])


def test_load_balance_and_z_loss_on_a_constructed_routing():
    probs = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1],
                       [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    experts = jnp.array([[0], [0], [1], [2]])
    # f = (2, 1, 1, 0) / 4, P = column means (0.4, 0.25, 0.25, 0.1): 4 * (0.2 + 1/16 + 1/16)
    assert float(load_balance_loss(probs, experts)) == pytest.approx(1.3, rel=1e-6)
    # perfect balance: 1 for top-1 (Switch), k for top-k (Hugging Face's Mixtral form)
    uniform = jnp.full((8, 4), 0.25)
    assert float(load_balance_loss(uniform, jnp.arange(8)[:, None] % 4)) == pytest.approx(1.0)
    two = jnp.stack([jnp.arange(8) % 4, (jnp.arange(8) + 1) % 4], axis=1)
    assert float(load_balance_loss(uniform, two)) == pytest.approx(2.0)
    # z-loss: logsumexp(log p + c) = c (p sums to 1), so z = mean(c^2)
    c = jnp.array([0.0, 1.0, 2.0, -3.0])
    assert float(router_z_loss(jnp.log(probs) + c[:, None])) == pytest.approx(14 / 4, rel=1e-5)


def test_the_layer_sows_its_weighted_losses():
    """One-hot tokens and a router of log-probabilities make the routing known exactly."""
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1],
                      [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]], np.float32)
    shift = np.array([0.0, 1.0, 2.0, -3.0], np.float32)
    layer = MoE(num_experts=4, experts_per_token=1, hidden_dim=8, renormalize=False,
                aux_loss_weight=0.5, z_loss_weight=0.25)
    x = jnp.eye(4)[None]  # [1, 4 tokens, embed 4]
    params = dict(_init(layer, x), router=jnp.asarray(np.log(probs) + shift[:, None]))
    y, sown = jax.jit(lambda p: layer.apply({"params": p}, x, mutable=["losses"]))(params)
    losses = aux_losses(sown)
    assert float(losses["moe_load_balance"]) == pytest.approx(0.5 * 1.3, rel=1e-5)
    assert float(losses["moe_router_z"]) == pytest.approx(0.25 * 14 / 4, rel=1e-5)
    assert y.shape == x.shape
    # without mutable collections the layer just returns its output
    np.testing.assert_array_equal(jax.jit(layer.apply)({"params": params}, x), y)


def test_load_balance_matches_transformers_mixtral():
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    probs, _, experts = route(jnp.asarray(logits), 2)
    ours = float(load_balance_loss(probs, experts))
    ref = float(load_balancing_loss_func((torch.from_numpy(logits),), 8, 2))
    assert ours == pytest.approx(ref, rel=1e-6)


def test_routing_renormalises_top_k_like_mixtral():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    _, w, e = route(logits, 2)
    np.testing.assert_allclose(w, [[0.625, 0.375]], rtol=1e-6)
    assert e.tolist() == [[0, 1]]
    _, w1, _ = route(logits, 1, renormalize=False)  # Switch: the probability itself
    np.testing.assert_allclose(w1, [[0.5]], rtol=1e-6)


def test_slots_give_first_choices_priority():
    experts = jnp.array([[1, 0], [0, 2], [0, 3]])
    # first choices: t0 -> e1 slot 0, t1 -> e0 slot 0, t2 -> e0 slot 1; then t0's second
    # choice takes e0 slot 2 although token 0 comes first
    assert slot_positions(experts, 4).tolist() == [[0, 2], [0, 0], [1, 0]]
    assert capacity(8, 2, 4, 1.0) == 4 and capacity(3, 1, 8, 1.0) == 1


def _balanced_tokens(n=8, e=8, experts=4):
    """Token i picks expert i % E first and (i + 1) % E second: every expert gets exactly
    n * 2 / E assignments (router = identity on the first E features)."""
    i = np.arange(n)
    x = np.zeros((1, n, e), np.float32)
    x[0, i, i % experts] = 3.0
    x[0, i, (i + 1) % experts] = 2.0
    x[0, :, experts:] = np.abs(np.random.default_rng(1).normal(size=(n, e - experts)))
    router = np.zeros((e, experts), np.float32)
    router[:experts] = np.eye(experts)
    return jnp.asarray(x), jnp.asarray(router)


def test_capacity_1_equals_dropless_when_nothing_overflows():
    x, router = _balanced_tokens()
    kw = dict(num_experts=4, experts_per_token=2, hidden_dim=16,
              kernel_init=nn.initializers.normal(1.0))
    dropless = MoE(dispatch="dropless", **kw)
    params = dict(_init(dropless, x), router=router)
    capped = MoE(dispatch="capacity", capacity_factor=1.0, **kw)
    _, _, e = route(x[0] @ router, 2)
    assert np.bincount(np.asarray(e).ravel(), minlength=4).tolist() == [4, 4, 4, 4]  # = C
    a = jax.jit(dropless.apply)({"params": params}, x)
    b = jax.jit(capped.apply)({"params": params}, x)
    assert float(jnp.abs(a).max()) > 1.0
    # same function, different float32 summation order (einsum vs ragged_dot): measured 2e-6
    # relative on outputs of magnitude ~50
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_overflowing_tokens_are_dropped_to_the_residual():
    """Every token wants expert 0 (k=1); capacity 1.0 gives it ceil(8/4) = 2 slots: tokens 0
    and 1 are processed, the other six get a zero update (the residual passes them on)."""
    x, router = _balanced_tokens()
    router = router.at[:, 0].set(10.0)
    kw = dict(num_experts=4, experts_per_token=1, hidden_dim=16, renormalize=False,
              kernel_init=nn.initializers.normal(1.0))
    dropless, capped = MoE(dispatch="dropless", **kw), MoE(dispatch="capacity", capacity_factor=1.0, **kw)
    params = dict(_init(dropless, x), router=router)
    a = jax.jit(dropless.apply)({"params": params}, x)[0]
    b = jax.jit(capped.apply)({"params": params}, x)[0]
    np.testing.assert_allclose(b[:2], a[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b[2:], 0.0)
    assert float(jnp.abs(a[2:]).min()) > 0  # dropless processed them


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_parallel_output_and_grads_equal_the_unsharded_layer(dispatch):
    """Experts over `expert` (all_to_all inside shard_map) vs the same layer on one device.
    "capacity" uses a factor large enough that no device's buffer overflows (capacity is per
    source device under expert parallelism), so both compute the same function; only the order of
    float32 sums differs (measured max diff ~1e-9)."""
    layer = MoE(num_experts=8, experts_per_token=2, hidden_dim=24, dispatch=dispatch,
                capacity_factor=8.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 32))
    params = _init(layer, x, seed=1)

    def loss(p, x):
        y, sown = layer.apply({"params": p}, x, mutable=["losses"])
        return jnp.sum(y ** 2) + sum(aux_losses(sown).values()), y

    (l0, y0), g0 = jax.value_and_grad(loss, has_aux=True)(params, x)
    mesh = make_mesh("data=2,expert=4")
    with activate(mesh, get_preset("expert").rules):
        f = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (l1, y1), g1 = f(params, x)
        hlo = f.lower(params, x).compile().as_text()
    assert "all-to-all" in hlo  # the expert-parallel path ran
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_expert_parallel_layer_rejects_indivisible_experts():
    layer = MoE(num_experts=6, experts_per_token=2, hidden_dim=8)
    x = jnp.ones((8, 2, 16))
    params = jax.eval_shape(lambda: nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x)["params"]))
    with activate(make_mesh("data=2,expert=4"), get_preset("expert").rules):
        with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by mesh axis "
                                              r"'expert' \(size 4\)"):
            jax.eval_shape(lambda p: layer.apply({"params": p}, x), params)


MOE_CFG = LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=16, max_len=32, num_experts=4, experts_per_token=2,
                      aux_loss_weight=0.01, router_z_loss_weight=0.001)


def _lm_batch(b=2, t=8):
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, 64, (b, t + 1)), jnp.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.tile(jnp.arange(t), (b, 1)), "loss_mask": jnp.ones((b, t))}


def test_lm_training_loss_adds_the_aux_losses_and_evaluation_does_not():
    cfg = MOE_CFG
    model = Llama(cfg)
    params = nn.meta.unbox(lm_init_fn(model, 8)(jax.random.PRNGKey(0)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cfg.num_params()
    batch = _lm_batch()
    loss_fn = lm_loss_fn(model)

    @jax.jit
    def everything(p):
        terms = lm_loss_terms(model, p, batch)
        train = loss_fn(p, batch, jax.random.PRNGKey(1))
        evaluation = loss_fn(p, batch, None)
        router = lambda g: g["layers_0"]["moe"]["router"]  # noqa: E731
        g_train = router(jax.grad(lambda q: loss_fn(q, batch, jax.random.PRNGKey(1))[0])(p))
        g_eval = router(jax.grad(lambda q: loss_fn(q, batch, None)[0])(p))
        return terms, train, evaluation, g_train, g_eval

    (nll, count, aux), (total, count2, _), (ev_total, _, _), g_train, g_eval = everything(params)
    assert set(aux) == {"moe_load_balance", "moe_router_z"}
    assert float(aux["moe_load_balance"]) > 0.01 * 1.9  # >= k (=2) times the weight, ~balanced
    assert float(total / count2) == pytest.approx(
        float(nll / count + aux["moe_load_balance"] + aux["moe_router_z"]), rel=1e-6)
    assert float(ev_total) == pytest.approx(float(nll), rel=1e-6)
    # the aux losses reach the router: its gradient differs with and without them
    assert float(jnp.abs(g_train - g_eval).max()) > 1e-6


def test_aux_losses_survive_remat():
    """Blocks recomputed in the backward pass (`remat=True`) still sow their losses."""
    batch = _lm_batch()
    params = nn.meta.unbox(lm_init_fn(Llama(MOE_CFG), 8)(jax.random.PRNGKey(0)))
    terms = jax.jit(lambda p, remat: lm_loss_terms(Llama(MOE_CFG.replace(remat=remat)), p, batch),
                    static_argnums=1)
    plain, remat = terms(params, False)[2], terms(params, True)[2]
    assert set(remat) == {"moe_load_balance", "moe_router_z"}
    for k in plain:
        assert float(remat[k]) == pytest.approx(float(plain[k]), rel=1e-6)


def test_router_noise_acts_only_in_training():
    model = Llama(MOE_CFG.replace(router_noise=0.5))
    params = nn.meta.unbox(lm_init_fn(model, 8)(jax.random.PRNGKey(0)))
    batch = _lm_batch()
    loss = jax.jit(lambda p, rng: lm_loss_fn(model)(p, batch, rng)[0])
    a = loss(params, jax.random.PRNGKey(1))
    b = loss(params, jax.random.PRNGKey(2))
    assert float(a) != float(b)  # different noise, different routing weights
    ev = jax.jit(lambda p: lm_loss_fn(model)(p, batch, None)[0])
    e1, e2 = ev(params), ev(params)
    assert float(e1) == float(e2)


@pytest.mark.parametrize("change, needle", [
    (dict(experts_per_token=5), "experts_per_token=5 must be in [1, num_experts=4]"),
    (dict(moe_dispatch="dropped"), "did you mean 'dropless'"),
    (dict(capacity_factor=0.0), "capacity_factor must be positive"),
    (dict(router_noise=1.5), "router_noise must be in [0, 1)"),
    (dict(mlp_bias=True), "mlp_bias is not supported with num_experts > 0"),
    (dict(num_experts=-1), "num_experts must be >= 0"),
])
def test_bad_moe_config(change, needle):
    with pytest.raises(ConfigError) as e:
        MOE_CFG.replace(**change)
    assert needle in str(e.value)
