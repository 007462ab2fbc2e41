"""Hugging Face LLaMA / Mistral <-> mmjax: parity with the PyTorch reference, greedy decoding,
round trips, strict config handling, and model directories.

Each case builds a random-weight `LlamaForCausalLM` / `MistralForCausalLM` (every tensor
randomised, norms and biases included, so a swapped or dropped tensor shows), saves it with
`save_pretrained` and converts it with `from_hf`. The reference outputs come from the
PyTorch model object itself, never from mmjax code.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from mmjax import checkpoint  # noqa: E402
from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.errors import InputError, UnsupportedModelError  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)

CASES = {
    "mha": ("llama", dict(num_key_value_heads=4)),
    "gqa": ("llama", dict(num_key_value_heads=2)),
    "mqa": ("llama", dict(num_key_value_heads=1, vocab_size=131)),
    "tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "bias": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "rope_linear": ("llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "rope_llama3": ("llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0})),
    # window (8) shorter than the sequence (21); head_dim (32) != hidden / heads (16)
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=8, head_dim=32)),
}


def build_hf_model(kind, overrides, seed):
    torch.manual_seed(seed)
    kwargs = {**BASE, **overrides}
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs))
    randomise_torch(model, 0.08)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (hf model, hf dir, mmjax module, params); built once per case."""
    return hf_model_cache(tmp_path_factory, lambda name, seed: build_hf_model(*CASES[name], seed=seed))


def padded_batch(vocab, seq=21, pad=5, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(2, seq))
    mask = np.ones((2, seq), bool)
    mask[1, :pad] = False
    tokens[1, :pad] = 0
    return tokens, mask


def hf_forward(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # as generate() builds them
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(positions), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_hidden_states_match_transformers(saved, name):
    model, _, module, params = saved(name)
    tokens, mask = padded_batch(model.config.vocab_size)
    ref_logits, ref_hidden = hf_forward(model, tokens, mask)
    logits, inter = jax.jit(
        lambda p, t, m: module.apply({"params": p}, t, input_mask=m, return_intermediates=True)
    )(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    logits = np.asarray(logits)
    assert logits.shape == ref_logits.shape
    assert np.abs(ref_logits[mask]).max() > 0.1  # the comparison is not between near-zeros
    diff = np.abs(logits - ref_logits)[mask].max()
    assert diff <= TOL, f"{name}: logits max |diff| {diff:.3e}"
    # HF's last hidden state is after the final norm
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]
    for i, (a, b) in enumerate(zip(ours, ref_hidden, strict=True)):
        d = np.abs(np.asarray(a) - b)[mask].max()
        assert d <= TOL, f"{name}: hidden state {i} max |diff| {d:.3e}"


def test_sliding_window_is_active(saved):
    """The Mistral case must depend on the window: without it the logits move (not a vacuous pass)."""
    model, _, module, params = saved("mistral_window")
    tokens, mask = padded_batch(model.config.vocab_size)
    ref_logits, _ = hf_forward(model, tokens, mask)
    full = module.clone(config=module.config.replace(sliding_window=None))
    logits = np.asarray(jax.jit(lambda p, t, m: full.apply({"params": p}, t, input_mask=m))(
        params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))
    assert np.abs(logits - ref_logits)[mask].max() > 1e-3


def greedy_mmjax(module, params, tokens, mask, new_tokens):
    """Greedy decoding with mmjax's own KV cache: one prefill, then one token per step."""
    b, t = tokens.shape
    step = jax.jit(lambda p, x, m, c: module.apply({"params": p}, x, input_mask=m, cache=c))
    cache = module.init_cache(b, t + new_tokens)
    logits, cache = step(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), cache)
    out = []
    for _ in range(new_tokens):
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(np.asarray(nxt))
        logits, cache = step(params, nxt[:, None], jnp.ones((b, 1), bool), cache)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("name", ["gqa", "bias", "rope_llama3", "mistral_window"])
def test_greedy_decoding_matches_generate(saved, name):
    model, _, module, params = saved(name)
    new = 12
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, model.config.vocab_size, size=(2, 7))
    mask = np.ones_like(tokens, bool)
    mask[1, :3] = False  # second prompt is 4 tokens, left-padded
    tokens[1, :3] = 0
    model.generation_config.eos_token_id = None  # always produce `new` tokens
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             do_sample=False, max_new_tokens=new, pad_token_id=0)
    ref_new = ref[:, tokens.shape[1]:].numpy()
    assert ref_new.shape == (2, new)
    ours = greedy_mmjax(module, params, tokens, mask, new)
    np.testing.assert_array_equal(ours, ref_new)


@pytest.mark.parametrize("name", ["tied", "bias", "mistral_window", "rope_llama3"])
def test_round_trip_gives_identical_tensors_and_config(saved, name, tmp_path):
    _, path, module, params = saved(name)
    to_hf(module, params, str(tmp_path / "out"))
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    with open(os.path.join(path, "config.json")) as f:
        cfg_in = json.load(f)
    with open(tmp_path / "out" / "config.json") as f:
        cfg_out = json.load(f)
    assert sorted(cfg_out) == sorted(cfg_in)
    assert cfg_out == cfg_in
    # and transformers loads the export into the same model
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(reloaded).__name__ == cfg_in["architectures"][0]


def test_legacy_rope_layout_is_read(saved, tmp_path):
    """transformers 4 wrote `rope_theta` + `rope_scaling` (with "type"); same model either way."""
    _, path, module, _ = saved("rope_llama3")
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (legacy / "config.json").write_text(json.dumps(cfg))
    legacy_module, _ = from_hf(str(legacy))
    assert legacy_module.config == module.config
    assert module.config.rope_scaling.rope_type == "llama3" and module.config.rope_theta == 500000.0


# --- errors ---------------------------------------------------------------------------------

@pytest.fixture
def editable(saved, tmp_path):
    """A private copy of the GQA checkpoint to corrupt."""
    _, path, _, _ = saved("gqa")
    out = tmp_path / "edit"
    shutil.copytree(path, out)
    return out


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unknown_config_key_is_named(editable):
    edit_config(editable, foo_bar=1)
    with pytest.raises(UnsupportedModelError, match="foo_bar"):
        from_hf(str(editable))


def test_unsupported_rope_type_is_named(editable):
    edit_config(editable, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        from_hf(str(editable))


def test_unsupported_activation_and_quantization_are_named(editable):
    edit_config(editable, hidden_act="xielu")
    with pytest.raises(UnsupportedModelError, match="xielu"):
        from_hf(str(editable))
    edit_config(editable, hidden_act="silu", quantization_config={"quant_method": "gptq"})
    with pytest.raises(UnsupportedModelError, match="quantization_config"):
        from_hf(str(editable))


def test_unsupported_architecture_lists_supported(editable):
    edit_config(editable, architectures=["LlamaForTokenClassification"])
    with pytest.raises(UnsupportedModelError, match="LlamaForTokenClassification.*LlamaForCausalLM"):
        from_hf(str(editable))
    edit_config(editable, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama"):
        from_hf(str(editable))


def test_missing_weight_is_named(editable):
    edit_tensors(editable, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf(str(editable))


def test_unexpected_weight_is_named(editable):
    edit_tensors(editable, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(InputError, match=r"unexpected.*model\.layers\.0\.extra\.weight"):
        from_hf(str(editable))


def test_wrong_shape_names_tensor_and_both_shapes(editable):
    edit_tensors(editable, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)}))
    with pytest.raises(InputError, match=r"k_proj\.weight.*\(48, 64\).*\(32, 64\)"):
        from_hf(str(editable))


def test_unreadable_directories(tmp_path, editable):
    with pytest.raises(InputError, match="does not exist"):
        from_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        from_hf(str(tmp_path / "empty"))
    (editable / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        from_hf(str(editable))


def test_pickle_only_checkpoint_says_safetensors(editable):
    os.rename(editable / "model.safetensors", editable / "pytorch_model.bin")
    with pytest.raises(InputError, match="safetensors"):
        from_hf(str(editable))


# --- storage formats ------------------------------------------------------------------------

def test_bfloat16_and_sharded_checkpoints(saved, tmp_path):
    model, _, _, params = saved("gqa")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    _, sharded_params = from_hf(str(sharded))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), sharded_params, params)

    bf16 = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16)
    module, bf_params = from_hf(str(bf16))
    ref = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    expected = ref.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [heads*hd, dim]
    got = np.asarray(bf_params["layers_1"]["attn"]["query"]["kernel"])  # [dim, heads, hd]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(64, -1).T, expected)


def test_model_dir_save_load_and_atomic_replace(saved, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    _, _, module, params = saved("tied")
    out = tmp_path / "ckpt"
    checkpoint.save_model_dir(str(out), "llama", module.config, params)
    loaded_module, config, loaded = checkpoint.load_model_dir(str(out))
    assert config == module.config and loaded_module.config == module.config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, params)

    # a save that fails half-way leaves the previous directory intact and no temporaries
    def boom(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    changed = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_model_dir(str(out), "llama", module.config, changed)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    _, _, again = checkpoint.load_model_dir(str(out))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)

    with pytest.raises(InputError, match="not an mmjax model directory"):
        checkpoint.load_model_dir(str(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    monkeypatch.undo()
    with pytest.raises(InputError, match="refusing"):
        checkpoint.save_model_dir(str(tmp_path / "other"), "llama", module.config, params)
