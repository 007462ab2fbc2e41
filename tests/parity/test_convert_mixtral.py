"""Hugging Face Mixtral <-> mmjax MoE LLaMA: `mmjax compare` parity with transformers'
MixtralForCausalLM (mmjax's dropless path), greedy decoding, round-trip export, the fused
transformers-5 tensor layout, strict config keys.

Random-weight models (every tensor randomised, norm scales included) built offline and saved
with `save_pretrained`. Tolerance 1e-4 in float32, as for LLaMA (`mmjax.convert.compare`): both
sides compute the same function and differ in summation order only; the MoE adds a router
softmax and a weighted sum of two experts per token, which adds rounding of the same order
(measured ~1e-6). A routing mistake (wrong top-k, missing renormalisation, swapped w1/w3) moves
logits by 1e-2 or more.
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

from mmjax.cli import main  # noqa: E402
from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.convert.compare import compare  # noqa: E402
from mmjax.errors import UnsupportedModelError  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2)
CASES = {
    "top2": dict(),
    # k=1 (the weight renormalises to 1), a window (6) shorter than the sequence, head_dim != h/n
    "top1_window": dict(num_experts_per_tok=1, sliding_window=6, head_dim=16,
                        router_aux_loss_coef=0.02),
}


def build(name, seed):
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**BASE, **CASES[name]}))
    return randomise_torch(model, 0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_model_cache(tmp_path_factory, build)


@pytest.mark.parametrize("name", list(CASES))
def test_compare_parity_with_transformers(saved, name):
    _, path, module, _ = saved(name)
    c = module.config
    assert (c.num_experts, c.moe_dispatch, c.router_z_loss_weight) == (4, "dropless", 0.0)
    assert c.experts_per_token == (2 if name == "top2" else 1)
    report = compare(path, batch=2, seq_len=16, seed=0)
    assert report["model_type"] == "mixtral" and report["architecture"] == "MixtralForCausalLM"
    assert report["reference_logits_max_abs"] > 0.1
    assert report["passed"] and report["max_abs_diff"] <= 1e-4, report["diffs"]


def test_cli_compare_json(saved, capsys):
    _, path, _, _ = saved("top2")
    code = main(["compare", path, "--json", "--seq-len", "12"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(out)
    assert code == 0 and report["passed"] and report["model_type"] == "mixtral"


def test_window_and_routing_matter(saved):
    """Not a vacuous pass: with the window removed, or top-2 instead of top-1, logits move."""
    model, _, module, params = saved("top1_window")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (1, 16))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    run = lambda m: np.asarray(jax.jit(lambda p, t: m.apply({"params": p}, t))(  # noqa: E731
        params, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(run(module) - ref).max() <= 1e-4
    for change in (dict(sliding_window=None), dict(experts_per_token=2)):
        other = module.clone(config=module.config.replace(**change))
        assert np.abs(run(other) - ref).max() > 1e-3, change


def test_greedy_decoding_matches_generate(saved):
    model, _, module, params = saved("top2")
    tokens = np.random.default_rng(1).integers(3, 128, size=(1, 6))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(tokens), do_sample=False, max_new_tokens=8,
                             pad_token_id=0)[:, 6:].numpy()
    step = jax.jit(lambda p, x, c: module.apply({"params": p}, x, cache=c))
    logits, cache = step(params, jnp.asarray(tokens, jnp.int32), module.init_cache(1, 14))
    ours = []
    for _ in range(8):
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        ours.append(int(nxt[0]))
        logits, cache = step(params, nxt[:, None], cache)
    assert ours == ref[0].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_export_gives_identical_tensors(saved, name, tmp_path):
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
    again, _ = from_hf(str(tmp_path / "out"))
    assert again.config == module.config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(reloaded).__name__ == "MixtralForCausalLM"


def test_fused_transformers5_layout_is_read(saved, tmp_path):
    """transformers 5 keeps experts fused in memory (`mlp.experts.gate_up_proj`); a checkpoint
    written from that state_dict converts to the same params."""
    model, path, _, params = saved("top2")
    fused = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(_config_text(path))
    _, fused_params = from_hf(str(out))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), fused_params, params)


def _config_text(path):
    with open(os.path.join(path, "config.json")) as f:
        return f.read()


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("change, needle", [
    ({"num_local_expert": 4}, "'num_local_expert' (did you mean 'num_local_experts'?)"),
    ({"attention_bias": True}, "'attention_bias'"),
    ({"num_local_experts": 0}, "num_local_experts must be a positive int"),
    ({"num_experts_per_tok": 9}, "experts_per_token=9 must be in [1, num_experts=4]"),
])
def test_strict_config_keys(saved, change, needle):
    _, path, _, _ = saved("top2")
    from mmjax.convert.mixtral import config_from_hf

    with pytest.raises(UnsupportedModelError) as e:
        config_from_hf({**_config(path), **change})
    assert needle in str(e.value)


def test_a_capacity_moe_does_not_export_as_mixtral(saved, tmp_path):
    _, _, module, params = saved("top2")
    capped = module.config.replace(moe_dispatch="capacity")
    with pytest.raises(UnsupportedModelError, match="drops tokens; MixtralForCausalLM is dropless"):
        to_hf(capped, params, str(tmp_path / "x"))
    with pytest.raises(UnsupportedModelError, match="exports only as model_type 'mixtral'"):
        to_hf(module, params, str(tmp_path / "y"), model_type="mistral")
