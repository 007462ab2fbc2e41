"""Hugging Face `LlavaForConditionalGeneration` <-> mmjax `Llava`: parity with the PyTorch
reference (logits, image features, decoder and image-tower hidden states), greedy generation
with an image, both vision-tower key layouts, round trips, strict config handling, and
`mmjax compare`.

Each case is a random-weight transformers model (every tensor randomised, norms and biases
included, so a swapped or dropped tensor shows) saved with `save_pretrained` and converted
with `from_hf`; the batch holds real image tokens (image_seq_length per image, one image per
row) and a left-padded row. Tolerance TOL = 1e-4 absolute in float32 (the reasoning is in
mmjax.convert.compare); the measured diffs of these 2-layer models are ~1e-6.
"""

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

from mmjax import cli  # noqa: E402
from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.convert.compare import convert_dir, export_dir  # noqa: E402
from mmjax.convert.llava import llava_inputs  # noqa: E402
from mmjax.errors import UnsupportedModelError  # noqa: E402
from mmjax.generate import GenerationConfig, generate  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, layer_norm_eps=1e-5)
TEXT = dict(vocab_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CASES = {
    # LLaVA-1.5 defaults: layer -2 without [CLS], biased projector; a GQA decoder
    "default": dict(text=dict(hidden_size=64, num_key_value_heads=2), image_token_index=95,
                    image_seq_length=16),
    # two layers concatenated (embeddings + last block), [CLS] kept, no projector bias; an MHA
    # decoder of another width (the projector is [48, 64] then [48, 48]) with a tied head
    "concat_full": dict(text=dict(hidden_size=48, num_key_value_heads=4, tie_word_embeddings=True),
                        image_token_index=3, tie_word_embeddings=True,
                        image_seq_length=17, vision_feature_layer=[-3, -1],
                        vision_feature_select_strategy="full", multimodal_projector_bias=False),
}


def build_hf_model(case, seed):
    torch.manual_seed(seed)
    spec = dict(CASES[case])
    text = transformers.LlamaConfig(**TEXT, **spec.pop("text"))
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION),
                                      text_config=text, **spec)
    model = transformers.LlavaForConditionalGeneration(config)
    return randomise_torch(model, 0.08)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (hf model, hf dir, mmjax module, params); built once per case."""
    return hf_model_cache(tmp_path_factory, build_hf_model)


def hf_forward(model, tokens, mask, images):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # as generate() builds them
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        out = model(input_ids=torch.from_numpy(tokens), pixel_values=pixels,
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(positions), output_hidden_states=True)
        vision = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return out, [h.numpy() for h in vision]


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_hidden_states_match_transformers(saved, name):
    model, _, module, params = saved(name)
    config = module.config
    assert config.image_seq_length == CASES[name]["image_seq_length"]
    tokens, mask, images, num_pad = llava_inputs(np.random.default_rng(0), 2, 12, config)
    assert num_pad > 0 and (tokens == config.image_token_index).sum() == 2 * config.image_seq_length
    ref, ref_vision = hf_forward(model, tokens, mask, images)
    logits, inter = jax.jit(lambda p, t, i, m: module.apply(
        {"params": p}, t, i, input_mask=m, return_intermediates=True))(
        params, jnp.asarray(tokens, jnp.int32), jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    ref_logits = ref.logits.numpy()
    assert np.abs(ref_logits[mask]).max() > 0.1  # not a comparison between near-zeros
    diffs = {"logits": np.abs(np.asarray(logits) - ref_logits)[mask].max(),
             "image_features": np.abs(np.asarray(inter["image_features"]).reshape(-1, config.dim)
                                      - ref.image_hidden_states.numpy()).max()}
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]  # HF's last is after the norm
    for i, (a, b) in enumerate(zip(ours, ref.hidden_states, strict=True)):
        diffs[f"hidden_{i}"] = np.abs(np.asarray(a) - b.numpy())[mask].max()
    for i, (a, b) in enumerate(zip(inter["vision_hidden_states"], ref_vision, strict=True)):
        diffs[f"vision_hidden_{i}"] = np.abs(np.asarray(a) - b).max()
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{name}: {worst} max |diff| {diffs[worst]:.3e}"
    # the images matter: other pixels move the logits
    other = jax.jit(lambda p, t, i, m: module.apply({"params": p}, t, i, input_mask=m))(
        params, jnp.asarray(tokens, jnp.int32), jnp.asarray(images[::-1].transpose(0, 2, 3, 1)),
        jnp.asarray(mask))
    assert np.abs(np.asarray(other) - ref_logits)[mask].max() > 1e-2


def test_greedy_generation_with_an_image_matches_transformers(saved):
    model, _, module, params = saved("default")
    config = module.config
    tokens, mask, images, _ = llava_inputs(np.random.default_rng(1), 2, 6, config)
    new = 8
    model.generation_config.eos_token_id = None  # always produce `new` tokens
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             do_sample=False, max_new_tokens=new, pad_token_id=0)
    ref_new = ref[:, tokens.shape[1]:].numpy()
    assert ref_new.shape == (2, new)
    out = generate(module, params, (tokens, mask), GenerationConfig(max_new_tokens=new, eos_token_id=()),
                   prefill_inputs={"images": images.transpose(0, 2, 3, 1)})
    np.testing.assert_array_equal(out.tokens, ref_new)


def _rewrite(src, dst, rename):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    return str(dst)


def test_hub_and_older_key_layouts_read_the_same(saved, tmp_path):
    _, path, _, params = saved("default")
    original = load_file(os.path.join(path, "model.safetensors"))
    assert any(k.startswith("vision_tower.embeddings.") for k in original)  # 5.23 writes this
    assert "language_model.lm_head.weight" in original
    assert any(k.startswith("language_model.model.layers.") for k in original)

    def hub(k):  # llava-hf checkpoints nest the tower under vision_model.
        return k.replace("vision_tower.", "vision_tower.vision_model.", 1)

    def v45(k):  # transformers 4.5x save_pretrained
        if k == "language_model.lm_head.weight":
            return "lm_head.weight"
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        return "model." + hub(k) if k.startswith("vision_tower.") else "model." + k

    for rename in (hub, v45):
        _, other = from_hf(_rewrite(path, tmp_path / rename.__name__, rename))
        jax.tree_util.tree_map(np.testing.assert_array_equal, other, params)
    # and transformers itself reads the Hub layout into the same model
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hub"))
    np.testing.assert_array_equal(
        reloaded.model.vision_tower.embeddings.patch_embedding.weight.detach().numpy(),
        original["vision_tower.embeddings.patch_embedding.weight"])


def _same_dir(a, b):
    ta, tb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert sorted(ta) == sorted(tb)
    for key, value in ta.items():
        assert tb[key].dtype == value.dtype and np.array_equal(tb[key], value), key
    ca, cb = (json.loads(open(os.path.join(d, "config.json")).read()) for d in (a, b))
    assert ca == cb


def test_round_trips_give_identical_tensors_and_config(saved, tmp_path):
    _, path, module, params = saved("default")
    to_hf(module, params, str(tmp_path / "out"))
    _same_dir(path, str(tmp_path / "out"))
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
    assert reloaded.config.vision_feature_layer == -2
    # mmjax convert / export: HF dir -> mmjax model dir -> HF dir (a tied head: not stored)
    _, path, module, _ = saved("concat_full")
    assert module.config.text.tie_embeddings
    assert "language_model.lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    convert_dir(path, str(tmp_path / "ckpt"))
    export_dir(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    _same_dir(path, str(tmp_path / "back"))


def test_export_refuses_connectors_without_an_hf_class(saved, tmp_path):
    _, _, module, params = saved("default")
    linear = module.config.replace(connector="linear")
    plain = {**params, "projector": {"linear": params["projector"]["linear_1"]}}
    with pytest.raises(UnsupportedModelError, match="connector='linear'.*Linear-act-Linear"):
        to_hf(linear, plain, str(tmp_path / "x"))


def _edit_config(src, dst, fn):
    shutil.copytree(src, dst)
    cfg = json.loads(open(os.path.join(dst, "config.json")).read())
    fn(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_strict_config_errors(saved, tmp_path):
    _, path, _, _ = saved("default")
    cases = [
        (lambda c: c.update(foo_bar=1), "foo_bar"),
        (lambda c: c["text_config"].update(rope_bogus=1.0), "rope_bogus"),
        (lambda c: c["vision_config"].update(hidden_act="mish"), "mish"),
        (lambda c: c["text_config"].update(model_type="qwen2"),
         "text_config.model_type 'qwen2'.*llama, mistral"),
        (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "siglip_vision_model"),
        (lambda c: c.update(vision_feature_select_strategy="mean"), "'mean'"),
        (lambda c: c.update(vision_feature_layer=7), "out of range"),
        (lambda c: c.update(image_token_index=96), "image_token_index=96"),
        (lambda c: c.update(architectures=["LlavaModel"]), "LlavaModel"),
    ]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(UnsupportedModelError, match=match):
            from_hf(_edit_config(path, tmp_path / str(i), edit))


def test_compare_cli(saved, tmp_path, capsys):
    _, path, _, _ = saved("default")
    assert cli.main(["compare", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"] is True and report["max_abs_diff"] <= TOL
    assert {"logits", "image_features", "inputs_embeds", "hidden_states",
            "vision_hidden_states"} <= set(report["diffs"])
    assert report["inputs"]["image_seq_length"] == 16 and report["inputs"]["left_padding_last_row"] > 0
    bad = _edit_config(path, tmp_path / "qwen", lambda c: c["text_config"].update(model_type="qwen2"))
    assert cli.main(["compare", bad, "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qwen2" in err
