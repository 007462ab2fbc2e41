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
