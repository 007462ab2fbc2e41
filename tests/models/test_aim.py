"""AIM model (`mmjax.models.aim`): the prefix-causal mask against a numpy-built one, causality and the
bidirectional prefix checked on real outputs, the bidirectional trunk = mmjax's ViT on the same
params, named intermediates, logical axis names, and clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models.aim import AIM, AIMConfig, aim_trunk
from mmjax.models.vit import ViT

# 16 px / patch 4: a 4 x 4 grid of 16 patches
CFG = AIMConfig(trunk=aim_trunk(image_size=16, patch_size=4, channels=1, dim=32, num_layers=2, num_heads=4,
                                mlp_dim=64), head_width=32, head_blocks=2, head_mlp_dim=64)
N = 16


def numpy_prefix_mask(n: int, k: int) -> np.ndarray:
    m = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = (i < k and j < k) or (i >= k and j <= i)
    return m


@pytest.fixture(scope="module")
def setup():
    model = AIM(CFG)
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))
    boxed = model.init(jax.random.PRNGKey(1), images, jnp.ones((4,), jnp.int32))["params"]
    params = nn.unbox(boxed)
    params = jax.tree_util.tree_map(  # nonzero biases / norms so every path matters
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    apply = jax.jit(lambda p, x, k: model.apply({"params": p}, x, k, return_intermediates=True))
    return model, boxed, params, images, apply


def test_mask_is_bidirectional_in_the_prefix_and_causal_after(setup):
    model, _, params, images, apply = setup
    ks = np.array([0, 1, 5, N - 1], np.int32)
    out = apply(params, images, jnp.asarray(ks))
    assert out["mask"].shape == (4, 1, N, N)
    for b, k in enumerate(ks):
        np.testing.assert_array_equal(np.asarray(out["mask"][b, 0]), numpy_prefix_mask(N, int(k)))
    assert model.apply({"params": params}, images)["mask"] is None  # bidirectional: no mask


def test_later_patches_do_not_change_earlier_outputs(setup):
    """Causality on the real predictions and features: poking patch p (after the prefix) leaves
    every position < p unchanged and changes p; poking a prefix patch changes the whole prefix."""
    _, _, params, images, apply = setup
    k = jnp.full((4,), 5, jnp.int32)
    base = apply(params, images, k)
    for p in (5, 9, 15):
        r, c = divmod(p, 4)
        poked = apply(params, images.at[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].add(3.0), k)
        for key in ("predictions", "features"):
            np.testing.assert_allclose(poked[key][:, :p], base[key][:, :p], atol=1e-5, err_msg=f"{key} p={p}")
            assert float(jnp.abs(poked[key][:, p] - base[key][:, p]).max()) > 1e-3
    # inside the prefix (K=5) attention is bidirectional: patch 3 reaches position 0 ...
    poked = apply(params, images.at[:, 0:4, 12:16].add(3.0), k)
    assert float(jnp.abs(poked["predictions"][:, 0] - base["predictions"][:, 0]).max()) > 1e-3
    # ... and with K=0 (causal) it does not
    k0 = jnp.zeros((4,), jnp.int32)
    a, b = apply(params, images, k0), apply(params, images.at[:, 0:4, 12:16].add(3.0), k0)
    np.testing.assert_allclose(a["predictions"][:, :3], b["predictions"][:, :3], atol=1e-5)


def test_bidirectional_trunk_is_the_vit_and_intermediates(setup):
    model, _, params, images, apply = setup
    feats = model.apply({"params": params}, images, method=AIM.features)
    _, vit_out = ViT(CFG.trunk).apply({"params": params["trunk"]}, images, return_intermediates=True)
    np.testing.assert_allclose(feats, vit_out["final_hidden"], atol=1e-5)
    out = apply(params, images, jnp.full((4,), 3, jnp.int32))
    assert out["predictions"].shape == (4, N, 16) and out["features"].shape == (4, N, 32)
    assert out["pooled"].shape == (4, 32) and len(out["hidden_states"]) == CFG.trunk.num_layers + 1


def test_params_carry_logical_axis_names(setup):
    _, boxed, _, _, _ = setup
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)
    assert boxed["head"]["out"]["kernel"].names == ("mlp", "patch")
    assert boxed["trunk"]["patch_embed"]["kernel"].names == ("patch", "embed")


def test_bad_inputs_name_the_setting(setup):
    model, _, params, images, _ = setup
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        AIMConfig(trunk=aim_trunk(image_size=18, patch_size=4, dim=32, num_layers=1, num_heads=4, mlp_dim=64))
    with pytest.raises(InputError, match="not divisible by the patch size"):
        model.apply({"params": params}, jnp.zeros((1, 18, 18, 1)), jnp.ones((1,), jnp.int32))
    with pytest.raises(InputError, match=r"prefix_len 16 is outside \[0, 15\]"):
        model.apply({"params": params}, images, jnp.full((4,), 16, jnp.int32))
    with pytest.raises(InputError, match=r"prefix_len -1 is outside"):
        model.apply({"params": params}, images, jnp.asarray([1, 2, -1, 3], jnp.int32))
    with pytest.raises(InputError, match=r"prefix_len must be \[batch=4\]"):
        model.apply({"params": params}, images, jnp.ones((2,), jnp.int32))
    with pytest.raises(ConfigError, match="class_token=False"):
        AIMConfig(trunk=aim_trunk(class_token=True, pool="cls"))
    with pytest.raises(ConfigError, match="unknown AIM variant"):
        AIMConfig.from_variant("huge")
