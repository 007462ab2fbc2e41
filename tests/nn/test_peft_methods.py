"""Prompt tuning, prefix tuning, LLaMA-Adapter and adapter tuning (`mmjax.nn.peft_methods`) on
a tiny Llama: configs, inits, identity at init, padding, greedy decoding through
`mmjax.generate.generate` against the full forward's argmax, and gradients. Parity with peft:
tests/parity/test_peft_prompts.py."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.generate import GenerationConfig, generate
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.nn import peft_methods as P
from mmjax.nn.transformer import stack_layer_params

CONFIG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
              max_len=64, eos_token_id=None)


@pytest.fixture(scope="module")
def lm():
    module = Llama(LlamaConfig(**CONFIG))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 7)), jnp.int32)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), tokens)["params"])
    # random norms too, so nothing is an identity by accident
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(np.asarray(x) * (1 + 0.3 * rng.standard_normal(x.shape)), x.dtype)
        if "norm" in str(p) else x, params)
    return module, params, tokens


_JITTED = {}


def _apply(module, params, cfg, tokens, **kw):
    """module.apply under the method's context, jitted (one compile per module/cfg/kw names)."""
    static = {k: v for k, v in kw.items() if isinstance(v, bool)}
    kw = {k: v for k, v in kw.items() if k not in static}
    key = (module, cfg, tuple(sorted(kw)), tuple(sorted(static.items())))
    if key not in _JITTED:
        def run(p, t, kw):
            with P.peft_method(cfg):
                return module.apply({"params": p}, t, **kw, **static)
        _JITTED[key] = jax.jit(run)
    return _JITTED[key](params, tokens, kw)


def _base(module, params, **kw):
    """The plain model's module.apply(**kw), jitted."""
    key = (module, None, tuple(sorted(kw)))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    return _JITTED[key](params, kw)


# --- configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: P.PromptTuningConfig(0), "num_virtual_tokens must be a positive int"),
    (lambda: P.PromptTuningConfig(4, init="txt"), "one of random, text, sampled_vocab"),
    (lambda: P.PromptTuningConfig(4, init="text"), "needs init_token_ids"),
    (lambda: P.PromptTuningConfig(4, init_token_ids=(1, 2)), "used by init='text' only"),
    (lambda: P.PrefixTuningConfig(4, hidden=8), "set projection=True"),
    (lambda: P.PrefixTuningConfig(-1), "positive int"),
    (lambda: P.LlamaAdapterConfig(adapter_len=0), "adapter_len must be a positive int"),
    (lambda: P.LlamaAdapterConfig(layers=(-1,)), "non-negative layer indices"),
    (lambda: P.AdapterTuningConfig(sublayers=("ffn",)), "subset of attn, mlp"),
    (lambda: P.AdapterTuningConfig(activation="swish9"), "unknown activation"),
])
def test_config_errors(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_one_entry_point_and_trainable_paths(lm):
    module, params, tokens = lm
    with pytest.raises(ConfigError, match="not a PEFT method config"):
        P.peft_method(object())
    for cfg in (P.PromptTuningConfig(3), P.PrefixTuningConfig(2), P.LlamaAdapterConfig(2, 1),
                P.AdapterTuningConfig(4)):
        full = P.init_peft_method(module, params, cfg, jax.random.key(1), tokens)
        frozen, trained = P.split_params(full, cfg)
        assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(dict(params))
        n_mask = sum(jax.tree_util.tree_leaves(P.trainable_mask(full, cfg)))
        assert n_mask == len(jax.tree_util.tree_leaves(trained)) > 0
        assert jax.tree_util.tree_structure(P.merge_params(frozen, trained)) == \
            jax.tree_util.tree_structure(full)


def _grads(module, full, cfg, tokens):
    frozen, trained = P.split_params(full, cfg)

    def loss(t):
        with P.peft_method(cfg):
            logits = module.apply({"params": P.merge_params(frozen, t)}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    return jax.jit(jax.grad(loss))(trained)


def _greedy_equals_argmax(module, params, cfg, prompts, n_new=5):
    """generate's greedy tokens == argmax of the full forward over prompt + generated."""
    with P.peft_method(cfg):
        out = generate(module, params, prompts, GenerationConfig(max_new_tokens=n_new,
                                                                 eos_token_id=()))
    t = len(prompts[0])  # equal lengths: one batched forward (generate left-pads them to 16)
    seq = jnp.concatenate([jnp.asarray(prompts, jnp.int32), jnp.asarray(out.tokens[:, :-1])], 1)
    want = np.asarray(jnp.argmax(_apply(module, params, cfg, seq)[:, t - 1:], -1))
    np.testing.assert_array_equal(out.tokens, want)
    return out.tokens


PROMPTS = [[1, 5, 9, 3, 7], [1, 7, 11, 4, 30]]


# --- prompt tuning -----------------------------------------------------------------------------

def test_prompt_tuning_inits(lm):
    module, params, _ = lm
    table = np.asarray(params["embed"]["embedding"])
    text = P.init_prompt_tuning(module, params, P.PromptTuningConfig(5, "text", (4, 9)),
                                jax.random.key(0))["prompt_tuning"]["embedding"]
    np.testing.assert_array_equal(np.asarray(text), table[[4, 9, 4, 9, 4]])  # repeated, cut
    cut = P.init_prompt_tuning(module, params, P.PromptTuningConfig(2, "text", (4, 9, 11)),
                               jax.random.key(0))["prompt_tuning"]["embedding"]
    np.testing.assert_array_equal(np.asarray(cut), table[[4, 9]])
    sampled = np.asarray(P.init_prompt_tuning(module, params, P.PromptTuningConfig(6, "sampled_vocab"),
                                              jax.random.key(0))["prompt_tuning"]["embedding"])
    assert all(np.any(np.all(table == row, axis=1)) for row in sampled)
    rand = np.asarray(P.init_prompt_tuning(module, params, P.PromptTuningConfig(64),
                                           jax.random.key(0))["prompt_tuning"]["embedding"])
    assert rand.shape == (64, 32) and 0.9 < rand.std() < 1.1  # peft's N(0, 1)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        P.init_prompt_tuning(module, params, P.PromptTuningConfig(2, "text", (99,)), jax.random.key(0))


def test_prompt_tuning_forward_padding_generate_grads(lm):
    module, params, tokens = lm
    cfg = P.PromptTuningConfig(4)
    full = P.init_prompt_tuning(module, params, cfg, jax.random.key(1))
    logits, inter = _apply(module, full, cfg, tokens, return_intermediates=True)
    assert logits.shape == (2, 7, 64) and inter["hidden_states"][0].shape == (2, 7, 32)
    # equal to prepending the prompt by hand (positions 0..n+T-1, as peft's causal LM)
    emb = params["embed"]["embedding"][tokens]
    x = jnp.concatenate([jnp.broadcast_to(full["prompt_tuning"]["embedding"], (2, 4, 32)), emb], 1)
    np.testing.assert_allclose(logits, _base(module, params, embeddings=x)[:, 4:], atol=1e-6)
    assert np.abs(logits - _base(module, params, tokens=tokens)).max() > 1e-3
    # left padding: the real tokens' logits do not change
    padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens], 1)
    mask = jnp.concatenate([jnp.zeros((2, 3), bool), jnp.ones((2, 7), bool)], 1)
    np.testing.assert_allclose(_apply(module, full, cfg, padded, input_mask=mask)[:, 3:], logits,
                               atol=1e-5)
    with pytest.raises(InputError, match="segment_ids is not supported"):
        _apply(module, full, cfg, tokens, segment_ids=jnp.ones_like(tokens))
    with pytest.raises(InputError, match="no params at the root; create them with init_prompt"):
        _apply(module, params, cfg, tokens)
    _greedy_equals_argmax(module, full, cfg, PROMPTS)
    grads = _grads(module, full, cfg, tokens)
    assert float(jnp.abs(grads["prompt_tuning"]["embedding"]).min(axis=-1).max()) > 0


# --- prefix tuning -----------------------------------------------------------------------------

def test_prefix_tuning_forward_generate_grads(lm):
    module, params, tokens = lm
    cfg = P.PrefixTuningConfig(3)
    full = P.init_prefix_tuning(module, params, cfg, jax.random.key(2))
    assert full["prefix_tuning"]["kv"].shape == (2, 2, 3, 2, 8)
    logits = _apply(module, full, cfg, tokens)
    assert logits.shape == (2, 7, 64)
    assert np.abs(logits - _base(module, params, tokens=tokens)).max() > 1e-3
    # the same as a zero-length prefix of zeros keys/values? no: as a cache filled by hand
    cache = module.init_cache(2, 10)
    kv = P.prefix_key_values(full["prefix_tuning"])
    cache = cache.replace(
        k=tuple(c.at[:, :3].set(kv[i, 0][None]) for i, c in enumerate(cache.k)),
        v=tuple(c.at[:, :3].set(kv[i, 1][None]) for i, c in enumerate(cache.v)),
        index=jnp.int32(3), valid=cache.valid.at[:, :3].set(True), lengths=cache.lengths + 3)
    by_hand, _ = _base(module, params, tokens=tokens, cache=cache)
    np.testing.assert_allclose(logits, by_hand, atol=1e-6)
    _greedy_equals_argmax(module, full, cfg, PROMPTS)
    grads = _grads(module, full, cfg, tokens)
    assert float(jnp.abs(grads["prefix_tuning"]["kv"]).max()) > 0
    # with the projection
    pcfg = P.PrefixTuningConfig(3, projection=True, hidden=16)
    pfull = P.init_prefix_tuning(module, params, pcfg, jax.random.key(3))
    pg = _grads(module, pfull, pcfg, tokens)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(pg))


def test_prefix_tuning_scanned_stack(lm):
    module, params, tokens = lm
    cfg = P.PrefixTuningConfig(3)
    full = P.init_prefix_tuning(module, params, cfg, jax.random.key(2))
    scanned = Llama(LlamaConfig(**CONFIG, scan_layers=True))
    sparams = stack_layer_params(full)
    np.testing.assert_allclose(_apply(scanned, sparams, cfg, tokens), _apply(module, full, cfg, tokens),
                               atol=1e-5)


# --- LLaMA-Adapter -----------------------------------------------------------------------------

def test_llama_adapter_identity_at_init_generate_grads(lm):
    module, params, tokens = lm
    cfg = P.LlamaAdapterConfig(adapter_len=3, adapter_layers=1)
    full = P.init_llama_adapter(module, params, cfg, jax.random.key(4), tokens)
    assert set(P.method_params(full, cfg)) == {"layers_1"}
    assert full["layers_1"]["attn"]["adaption_prompt"].shape == (3, 32)
    np.testing.assert_array_equal(full["layers_1"]["attn"]["adaption_gate"], np.zeros(1))
    base = _base(module, params, tokens=tokens)
    np.testing.assert_array_equal(np.asarray(_apply(module, full, cfg, tokens)), np.asarray(base))
    grads = _grads(module, full, cfg, tokens)  # at init only the gate gets a gradient
    assert float(jnp.abs(grads["layers_1"]["attn"]["adaption_gate"]).max()) > 0
    gated = P.merge_params(full, {"layers_1": {"attn": {"adaption_gate": jnp.full((1,), 0.7)}}})
    assert np.abs(_apply(module, gated, cfg, tokens) - base).max() > 1e-3
    grads = _grads(module, gated, cfg, tokens)
    assert float(jnp.abs(grads["layers_1"]["attn"]["adaption_prompt"]).max()) > 0
    _greedy_equals_argmax(module, gated, cfg, PROMPTS)


def test_llama_adapter_layer_choice_and_errors(lm):
    module, params, tokens = lm
    both = P.init_llama_adapter(module, params, P.LlamaAdapterConfig(2, layers=(0, 1)),
                                jax.random.key(0), tokens)
    assert set(P.method_params(both, P.LlamaAdapterConfig())) == {"layers_0", "layers_1"}
    with pytest.raises(ConfigError, match="adapter_layers=3 exceeds the model's 2 layers"):
        P.init_llama_adapter(module, params, P.LlamaAdapterConfig(2, 3), jax.random.key(0), tokens)
    scanned = Llama(LlamaConfig(**CONFIG, scan_layers=True))
    with pytest.raises(ConfigError, match="needs an unscanned stack"):
        P.init_llama_adapter(scanned, stack_layer_params(params), P.LlamaAdapterConfig(2, 1),
                             jax.random.key(0), tokens)


# --- adapter tuning (Houlsby) ---------------------------------------------------------------------

def test_adapter_tuning_identity_then_changes(lm):
    module, params, tokens = lm
    cfg = P.AdapterTuningConfig(bottleneck=4, sublayers=("attn", "mlp"), layers=(1,))
    full = P.init_adapter_tuning(module, params, cfg, jax.random.key(5), tokens)
    assert set(P.method_params(full, cfg)) == {"layers_1"}
    assert set(P.method_params(full, cfg)["layers_1"]) == {"attn", "mlp"}
    base = _base(module, params, tokens=tokens)
    np.testing.assert_array_equal(np.asarray(_apply(module, full, cfg, tokens)), np.asarray(base))
    grads = _grads(module, full, cfg, tokens)
    assert float(jnp.abs(grads["layers_1"]["mlp"]["adapter_up_kernel"]).max()) > 0
    trained = P.merge_params(full, {"layers_1": {"mlp": {
        "adapter_down_kernel": 0.5 * jax.random.normal(jax.random.key(7), (32, 4)),
        "adapter_up_kernel": 0.5 * jax.random.normal(jax.random.key(6), (4, 32))}}})
    assert np.abs(_apply(module, trained, cfg, tokens) - base).max() > 1e-3
    _greedy_equals_argmax(module, trained, cfg, PROMPTS, n_new=3)
    # every layer under a scanned stack (params stacked [layers, ...])
    scanned = Llama(LlamaConfig(**CONFIG, scan_layers=True))
    scfg = P.AdapterTuningConfig(bottleneck=4, sublayers="mlp")
    sfull = P.init_adapter_tuning(scanned, stack_layer_params(params), scfg, jax.random.key(5), tokens)
    assert sfull["layers"]["block"]["mlp"]["adapter_up_kernel"].shape == (2, 4, 32)
    with pytest.raises(ConfigError, match="needs an unscanned stack"):
        P.init_adapter_tuning(scanned, stack_layer_params(params), cfg, jax.random.key(5), tokens)
