"""Prompt tuning, prefix tuning and LLaMA-Adapter (`mmjax.nn.peft_methods`) against peft.

A tiny random `LlamaForCausalLM` (every tensor randomised, norms included; GQA 4 heads / 2 KV
heads) is wrapped by `peft.get_peft_model` with each method; the method's own weights are
randomised too (LLaMA-Adapter's gates nonzero), copied into the mmjax params, and the logits
of the real tokens compared in float32.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from support import randomise_torch  # noqa: E402

from mmjax.convert import from_hf  # noqa: E402
from mmjax.nn import peft_methods as P  # noqa: E402

TOL = 1e-4
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
L, KV, HD = 2, 2, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(hf model, mmjax module, params)."""
    torch.manual_seed(0)
    model = randomise_torch(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 0.08)
    model.config._attn_implementation = "eager"
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    module, params = from_hf(path)
    return model, module, params


def _peft(model, cfg, seed, scale=0.5):
    wrapped = peft.get_peft_model(copy.deepcopy(model), cfg)
    torch.manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn_like(p))
                weights[name] = p.detach().numpy().copy()
    return wrapped.eval(), weights


def _tokens(seed=0, batch=2, seq=9):
    return np.random.default_rng(seed).integers(3, LLAMA["vocab_size"], size=(batch, seq))


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.numpy()


def _ours(module, params, cfg, tokens):
    with jax.default_matmul_precision("highest"), P.peft_method(cfg):
        return np.asarray(jax.jit(lambda p, t: module.apply({"params": p}, t))(
            params, jnp.asarray(tokens, jnp.int32)))


def test_prompt_tuning_matches_peft(base):
    model, module, params = base
    n = 5
    ref_model, w = _peft(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), 1)
    tokens = _tokens()
    ref = _torch_logits(ref_model, tokens)
    assert ref.shape[1] == n + tokens.shape[1]  # peft returns the virtual tokens' logits too
    cfg = P.PromptTuningConfig(n)
    full = P.merge_params(params, {"prompt_tuning": {
        "embedding": jnp.asarray(w["prompt_encoder.default.embedding.weight"])}})
    ours = _ours(module, full, cfg, tokens)
    assert ours.shape == (2, tokens.shape[1], LLAMA["vocab_size"])
    err = np.abs(ours - ref[:, n:]).max()
    assert np.abs(ref[:, n:] - _torch_logits(model, tokens)).max() > 0.05  # the prompt matters
    print(f"max |diff| {err:.2e}")
    assert err < TOL, err


def _prefix_params(w, projection):
    """peft's PrefixEncoder weights -> mmjax's prefix_tuning tree."""
    key = "prompt_encoder.default."
    emb = w[key + "embedding.weight"]
    if not projection:  # [n, L*2*kv*hd] -> [L, 2, n, kv, hd]
        kv = emb.reshape(emb.shape[0], L, 2, KV, HD).transpose(1, 2, 0, 3, 4)
        return {"prefix_tuning": {"kv": jnp.asarray(kv)}}
    w0, b0 = w[key + "transform.0.weight"], w[key + "transform.0.bias"]
    w2, b2 = w[key + "transform.2.weight"], w[key + "transform.2.bias"]
    return {"prefix_tuning": {
        "embedding": jnp.asarray(emb),
        "proj_in": {"kernel": jnp.asarray(w0.T), "bias": jnp.asarray(b0)},
        "proj_out": {"kernel": jnp.asarray(w2.T.reshape(w2.shape[1], L, 2, KV, HD)),
                     "bias": jnp.asarray(b2.reshape(L, 2, KV, HD))}}}


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_matches_peft(base, projection):
    model, module, params = base
    n = 4
    kw = dict(prefix_projection=True, encoder_hidden_size=24) if projection else {}
    ref_model, w = _peft(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                        **kw), 2)
    tokens = _tokens(1)
    ref = _torch_logits(ref_model, tokens)
    cfg = P.PrefixTuningConfig(n, projection=projection, hidden=24 if projection else None)
    full = P.merge_params(params, _prefix_params(w, projection))
    # the tree init_prefix_tuning makes has the same structure and shapes
    made = P.method_params(P.init_prefix_tuning(module, params, cfg, jax.random.key(0)), cfg)
    assert jax.tree_util.tree_map(jnp.shape, made) == jax.tree_util.tree_map(
        jnp.shape, _prefix_params(w, projection))
    ours = _ours(module, full, cfg, tokens)
    assert np.abs(ref - _torch_logits(model, tokens)).max() > 0.05
    err = np.abs(ours - ref).max()
    print(f"max |diff| {err:.2e}")
    assert err < TOL, err


def test_llama_adapter_matches_peft(base):
    model, module, params = base
    ref_model, w = _peft(model, peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3,
                                                          adapter_layers=1), 3, scale=1.0)
    tokens = _tokens(2)
    ref = _torch_logits(ref_model, tokens)
    cfg = P.LlamaAdapterConfig(adapter_len=3, adapter_layers=1)
    prefix = "base_model.model.model.layers.1.self_attn."
    assert abs(float(w[prefix + "adaption_gate"][0])) > 0.1
    full = P.merge_params(params, {"layers_1": {"attn": {
        "adaption_prompt": jnp.asarray(w[prefix + "adaption_prompt"][0]),
        "adaption_gate": jnp.asarray(w[prefix + "adaption_gate"])}}})
    made = P.method_params(P.init_llama_adapter(module, params, cfg, jax.random.key(0), tokens), cfg)
    assert jax.tree_util.tree_map(jnp.shape, made) == jax.tree_util.tree_map(
        jnp.shape, P.method_params(full, cfg))
    ours = _ours(module, full, cfg, tokens)
    assert np.abs(ref - _torch_logits(model, tokens)).max() > 0.05
    err = np.abs(ours - ref).max()
    print(f"max |diff| {err:.2e}")
    assert err < TOL, err
