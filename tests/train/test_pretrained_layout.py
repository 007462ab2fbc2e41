"""init_from across layer layouts: a checkpoint whose layers are looped (`layers_{i}`, what every
converter and older workdir holds) initialises a model that scans them, and back."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.llama import Llama, LlamaConfig
from mmjax.nn.transformer import stack_layer_params
from mmjax.train.pretrained import overlay

CFG = LlamaConfig.from_variant("tiny", vocab_size=32, dim=16, num_heads=2, num_kv_heads=1,
                               mlp_dim=24, num_layers=3, max_len=16)


def _params(cfg, seed):
    tokens = jnp.zeros((1, 4), jnp.int32)
    return nn.meta.unbox(Llama(cfg).init(jax.random.PRNGKey(seed), tokens)["params"])


def test_looped_source_initialises_a_scanned_model_and_back():
    source = jax.tree_util.tree_map(np.asarray, _params(CFG, 0))
    target = _params(CFG.replace(scan_layers=True), 1)
    out, report = overlay(target, source)
    assert not report["kept"]
    want = stack_layer_params(source)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)
    back, report = overlay(_params(CFG, 2), jax.tree_util.tree_map(np.asarray, out))
    assert not report["kept"]
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(source)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_several_sources_fill_their_own_subtrees():
    """Two sources build one composite model (LLaVA-style: an image tower and an LM): each fills
    the subtree its `into` names, a param no source holds stays fresh, and the report says so."""
    import pytest

    from mmjax.errors import ConfigError, InputError
    from mmjax.train.pretrained import InitSource, init_sources, overlay_sources

    lm_a, lm_b = _params(CFG, 3), _params(CFG, 4)
    target = {"tower": _params(CFG, 5), "language_model": _params(CFG, 6),
              "projector": {"kernel": jnp.ones((2, 2))}}
    stores = {"a": {"vision": lm_a}, "b": lm_b}
    sources = init_sources(({"path": "a", "prefix": "vision", "into": "tower"},
                            InitSource("b", "", "language_model")))
    out, report = overlay_sources(target, sources, load=lambda p: stores[p])
    for got, want in ((out["tower"], lm_a), (out["language_model"], lm_b)):
        for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(out["projector"]["kernel"], np.ones((2, 2)))
    assert report["kept"] == ["projector/kernel"]
    n = len(jax.tree_util.tree_leaves(lm_a))
    assert [s["copied"] for s in report["sources"]] == [n, n]
    assert all(p.startswith(("tower/", "language_model/")) for p in report["copied"])
    # a bare path keeps its old meaning; two sources into one subtree and a wrong `into` fail
    assert init_sources("wd", "vision") == (InitSource("wd", "vision", ""),)
    with pytest.raises(ConfigError, match="same subtree"):
        init_sources(("a", "b"))
    with pytest.raises(InputError, match="no 'vision' in the model's params"):
        overlay_sources(target, (InitSource("b", "", "vision"),), load=lambda p: stores[p])
