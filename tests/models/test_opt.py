"""OPT: parity with transformers' `OPTForCausalLM` (logits, hidden states, greedy and beam
generation with left padding, a soft-prompt prefix), the export round trip, the embeddings
path, the "lm" task's loss, logical axis names, and bad input.

Three tiny random-weight references (every tensor randomised, LayerNorm weights and biases
included), saved with `save_pretrained` and converted with `from_hf`:
  pre_proj: pre-LN, word_embed_proj_dim (32) != hidden_size (64) -> project_in/out, relu, tied;
  post:     post-LN (opt-350m style: no final LayerNorm), untied head, exact gelu;
  plain:    LayerNorms without scale/bias, no biases (logits and the round trip only).
Measured (fp32, 2-core CPU): logits max |diff| 6.6e-7 (pre_proj), 1.0e-6 (post), 1.1e-6
(plain); hidden states <= 1.7e-6 (`mmjax compare`); tolerance 1e-4 (~60x headroom).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.convert.compare import compare  # noqa: E402
from mmjax.convert.opt import config_from_hf  # noqa: E402
from mmjax.errors import ConfigError, InputError, UnsupportedModelError  # noqa: E402
from mmjax.generate import GenerationConfig, generate  # noqa: E402
from mmjax.models.opt import OPT, OPTConfig  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
PAD = 1
BASE = dict(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, pad_token_id=PAD, bos_token_id=2, eos_token_id=2)
CASES = {
    "pre_proj": dict(word_embed_proj_dim=32, activation_function="relu", tie_word_embeddings=True),
    "post": dict(do_layer_norm_before=False, activation_function="gelu",
                 tie_word_embeddings=False),
    # no LayerNorm affine params, no biases (HF options no released checkpoint uses)
    "plain": dict(layer_norm_elementwise_affine=False, enable_bias=False, num_hidden_layers=1),
}


def build(name, seed):
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**BASE, **CASES[name]}))
    randomise_torch(model, 0.1)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (hf model, hf dir, mmjax module, params); built once per case."""
    return hf_model_cache(tmp_path_factory, build)


def padded_batch(seq=13, pad=4, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, BASE["vocab_size"], size=(2, seq))
    mask = np.ones((2, seq), bool)
    mask[1, :pad] = False
    tokens[1, :pad] = PAD
    return tokens, mask


def test_case_layouts_are_what_they_claim(saved):
    _, _, module, params = saved("pre_proj")
    c = module.config
    assert c.projects and c.final_norm and c.tie_embeddings and c.activation == "relu"
    assert {"project_in", "project_out", "final_norm"} <= set(params) and "lm_head" not in params
    _, _, module, params = saved("post")
    c = module.config
    assert c.norm_position == "post" and not c.final_norm and not c.tie_embeddings
    assert "final_norm" not in params and "lm_head" in params and c.activation == "gelu"


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_hidden_states_match_transformers(saved, name):
    model, _, module, params = saved(name)
    tokens, mask = padded_batch()
    with torch.no_grad():  # positions: transformers derives them from the attention mask
        ref = model(input_ids=torch.from_numpy(tokens),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    output_hidden_states=True)
    logits, inter = jax.jit(
        lambda p, t, m: module.apply({"params": p}, t, input_mask=m, return_intermediates=True)
    )(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    ref_logits = ref.logits.numpy()
    assert np.abs(ref_logits[mask]).max() > 0.1  # not a comparison between near-zeros
    diff = np.abs(np.asarray(logits) - ref_logits)[mask].max()
    assert diff <= TOL, f"{name}: logits max |diff| {diff:.3e}"
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]
    for i, (a, b) in enumerate(zip(ours, ref.hidden_states, strict=True)):
        d = np.abs(np.asarray(a) - b.numpy())[mask].max()
        assert d <= TOL, f"{name}: hidden state {i} max |diff| {d:.3e}"
    print(f"{name}: logits max |diff| {diff:.2e}")


def hf_generate(model, tokens, mask, new, **kw):
    model.generation_config.eos_token_id = None  # always produce `new` tokens
    with torch.no_grad():
        out = model.generate(torch.from_numpy(tokens),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             max_new_tokens=new, pad_token_id=PAD, **kw)
    return out[:, tokens.shape[1]:].numpy()


def prompts(seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, BASE["vocab_size"], size=(2, 7))
    mask = np.ones_like(tokens, bool)
    mask[1, :3] = False  # second prompt is 4 tokens, left-padded
    tokens[1, :3] = PAD
    return tokens, mask


@pytest.mark.parametrize("name", ["pre_proj", "post"])
def test_greedy_generate_matches_transformers_with_left_padding(saved, name):
    model, _, module, params = saved(name)
    tokens, mask = prompts()
    new = 10
    ref = hf_generate(model, tokens, mask, new, do_sample=False)
    gen = GenerationConfig(max_new_tokens=new, eos_token_id=(), pad_token_id=PAD, prompt_bucket=8)
    out = generate(module, params, (tokens, mask), gen)
    np.testing.assert_array_equal(out.tokens, ref)


def test_beam_search_matches_transformers(saved):
    model, _, module, params = saved("pre_proj")
    tokens, mask = prompts(seed=2)
    new = 6
    ref = hf_generate(model, tokens, mask, new, do_sample=False, num_beams=3, length_penalty=1.0)
    gen = GenerationConfig(max_new_tokens=new, num_beams=3, eos_token_id=(), pad_token_id=PAD,
                           prompt_bucket=8)
    out = generate(module, params, (tokens, mask), gen)
    np.testing.assert_array_equal(out.tokens, ref)


def test_sampling_runs_and_is_seeded(saved):
    _, _, module, params = saved("post")
    tokens, mask = prompts()
    gen = GenerationConfig(max_new_tokens=5, temperature=0.9, top_k=20, eos_token_id=(),
                           pad_token_id=PAD, prompt_bucket=8)
    a = generate(module, params, (tokens, mask), gen, rng=jax.random.key(3))
    b = generate(module, params, (tokens, mask), gen, rng=jax.random.key(3))
    assert a.tokens.shape == (2, 5) and (a.tokens < BASE["vocab_size"]).all()
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name", ["pre_proj", "post"])
def test_soft_prompt_prefix_generates_as_the_tokens_would(saved, name):
    """generate(prefix_embeddings=embed_tokens(ids[:k])) on the rest == transformers on all ids:
    the soft-prompt path BLIP-2 uses (causal prefix), positions continuing past the prefix; the
    prefix is `embed_width` wide (32 for pre_proj, whose stack is 64 wide)."""
    model, _, module, params = saved(name)
    rng = np.random.default_rng(4)
    full = rng.integers(3, BASE["vocab_size"], size=(2, 9))
    k, new = 4, 8
    prefix = module.apply({"params": params}, jnp.asarray(full[:, :k], jnp.int32),
                          method="embed_tokens")
    rest, rest_mask = full[:, k:].copy(), np.ones((2, 9 - k), bool)
    rest_mask[1, :2] = False  # the second prompt after the prefix is shorter (left-padded)
    rest[1, :2] = PAD
    gen = GenerationConfig(max_new_tokens=new, eos_token_id=(), pad_token_id=PAD, prompt_bucket=8)
    out = generate(module, params, (rest, rest_mask), gen, prefix_embeddings=prefix,
                   prefix_bidirectional=False)
    # the reference sees [prefix ids, real prompt ids], row 1 left-padded by 2
    ref_tokens = np.stack([full[0], np.concatenate([[PAD, PAD], full[1, :k], full[1, k + 2:]])])
    ref_mask = np.ones_like(ref_tokens, bool)
    ref_mask[1, :2] = False
    ref = hf_generate(model, ref_tokens, ref_mask, new, do_sample=False)
    np.testing.assert_array_equal(out.tokens, ref)


@pytest.mark.parametrize("name", ["pre_proj", "post"])
def test_embeddings_path_equals_token_path(saved, name):
    _, _, module, params = saved(name)
    tokens, mask = padded_batch()
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)

    def run(p, tokens, mask):
        emb = module.apply({"params": p}, tokens, method="embed_tokens")
        a = module.apply({"params": p}, tokens, input_mask=mask)
        b = module.apply({"params": p}, embeddings=emb, input_mask=mask)
        # and through the cache: prefill on embeddings
        cache = module.init_cache(2, tokens.shape[1] + 1)
        c, _ = module.apply({"params": p}, embeddings=emb, input_mask=mask, cache=cache)
        return emb, a, b, c

    emb, a, b, c = jax.jit(run)(params, tokens, mask)
    assert emb.shape == (2, tokens.shape[1], module.config.embed_width)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(c)[m], np.asarray(a)[m], atol=1e-5)


def test_scanned_stack_and_mask_ar_give_the_same_logits(saved):
    """`scan_layers` (params stacked by `stack_layer_params`) and an all-ones `mask_ar` (the
    causal default spelled out) compute the same function as the loop stack."""
    from mmjax.nn.transformer import stack_layer_params

    _, _, module, params = saved("post")
    scanned = module.clone(config=module.config.replace(scan_layers=True))
    tokens, mask = padded_batch()
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)

    def run(p, sp):
        a = module.apply({"params": p}, tokens, input_mask=mask)
        b = scanned.apply({"params": sp}, tokens, input_mask=mask)
        c = module.apply({"params": p}, tokens, input_mask=mask, mask_ar=jnp.ones_like(tokens))
        return a, b, c

    a, b, c = jax.jit(run)(params, stack_layer_params(params))
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(b)[m], np.asarray(a)[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(c)[m], np.asarray(a)[m], atol=1e-6)


def test_export_round_trip_is_bit_exact(saved, tmp_path):
    for name in CASES:
        _, path, module, params = saved(name)
        out = tmp_path / name
        to_hf(module, params, str(out))
        original = load_file(os.path.join(path, "model.safetensors"))
        exported = load_file(str(out / "model.safetensors"))
        assert sorted(exported) == sorted(original), name
        for key, value in original.items():
            assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
        cfg_in = json.loads(open(os.path.join(path, "config.json")).read())
        cfg_out = json.loads((out / "config.json").read_text())
        assert cfg_out == cfg_in, name
        module2, _ = from_hf(str(out))
        assert module2.config == module.config


def test_compare_runner_passes(saved):
    _, path, _, _ = saved("pre_proj")
    report = compare(path, batch=2, seq_len=10)
    assert report["passed"] and report["max_abs_diff"] <= TOL, report


def test_opt_model_checkpoint_reads_as_tied_lm(saved, tmp_path):
    """An `OPTModel` directory (tensors `decoder.*`, no head) converts when tied."""
    model, _, module, params = saved("pre_proj")
    base = transformers.OPTModel(model.config)
    base.load_state_dict(model.model.state_dict())
    base.save_pretrained(str(tmp_path / "base"))
    module2, params2 = from_hf(str(tmp_path / "base"))
    assert module2.config == module.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    with pytest.raises(UnsupportedModelError, match="OPTModel .* no LM head"):
        config_from_hf(cfg)


def test_lm_task_loss_on_packed_batch(saved):
    """What the "lm" task calls: packed documents with their positions; finite loss and grads."""
    from mmjax.tasks.lm import lm_loss_terms

    _, _, model, params = saved("pre_proj")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, BASE["vocab_size"], (2, 12)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))], jnp.int32)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, 1), segment_ids=seg, positions=pos,
                 loss_mask=jnp.ones((2, 12), jnp.int32))
    def run(p):
        loss, grads = jax.value_and_grad(lambda p: lm_loss_terms(model, p, batch)[0])(p)
        alone = model.apply({"params": p}, tokens[:1, 5:])
        packed = model.apply({"params": p}, tokens, positions=pos, segment_ids=seg)
        return loss, grads, alone, packed

    loss, grads, alone, packed = jax.jit(run)(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    # the second document restarts its positions: its logits equal those of it alone
    np.testing.assert_allclose(np.asarray(packed)[0, 5:], np.asarray(alone)[0], atol=1e-5)


def test_every_param_has_logical_axis_names():
    for kw in (dict(embed_dim=32, tie_embeddings=False), dict(norm_position="post")):
        model = OPT(OPTConfig.from_variant("tiny", **kw))
        tokens = jnp.zeros((1, 2), jnp.int32)
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                              for x in leaves)
        assert model.config.num_params() == sum(x.value.size for x in leaves)


# --- bad input --------------------------------------------------------------------------------

def test_bad_inputs_name_the_limit(saved):
    _, _, module, params = saved("pre_proj")
    c = module.config
    with pytest.raises(InputError, match=f"token id {c.vocab_size} is outside the vocabulary"):
        module.apply({"params": params}, jnp.asarray([[3, c.vocab_size]], jnp.int32))
    with pytest.raises(InputError, match="exceeds max_len=40 .max_position_embeddings"):
        module.apply({"params": params}, jnp.full((1, 41), 3, jnp.int32))
    with pytest.raises(InputError, match="position 40 is outside the learned position table"):
        module.apply({"params": params}, jnp.full((1, 2), 3, jnp.int32),
                     positions=jnp.asarray([[0, 40]], jnp.int32))
    with pytest.raises(InputError, match="embed_width=32"):
        module.apply({"params": params}, embeddings=jnp.zeros((1, 3, 64)))
    with pytest.raises(InputError, match="max_len=40"):
        generate(module, params, [[3] * 35], GenerationConfig(max_new_tokens=10))


def test_bad_configs_say_what_to_change(saved):
    with pytest.raises(ConfigError, match="dim=66 is not divisible by num_heads=4"):
        OPTConfig(dim=66, num_heads=4)
    with pytest.raises(ConfigError, match="norm_position 'middle'"):
        OPTConfig(norm_position="middle")
    with pytest.raises(ConfigError, match="did you mean 'relu'"):
        OPTConfig(activation="reluu")
    _, path, _, _ = saved("post")
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    with pytest.raises(UnsupportedModelError, match="did you mean 'ffn_dim'"):
        config_from_hf({**cfg, "ffn_dims": 8})
    with pytest.raises(UnsupportedModelError, match="activation_function 'swiglu'"):
        config_from_hf({**cfg, "activation_function": "swiglu"})
