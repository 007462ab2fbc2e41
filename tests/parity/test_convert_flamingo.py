"""Hugging Face `IdeficsForVisionText2Text` (Idefics v1) <-> mmjax `Flamingo`: parity with the
PyTorch reference on interleaved rows, greedy generation with images, round trips, strict
config handling and `mmjax compare`.

Each case is a random-weight transformers model saved with `save_pretrained` and converted with
`from_hf`. Every tensor is randomised (norms around 1, the rest N(0, 0.08^2)) and the gates are
set far from zero (tanh(alpha) ~ 0.6), because with Idefics' default zero gates the
cross-attention path contributes nothing and a broken one would pass. The inputs hold several
images per row, a zero padding image slot, text before each row's first image and a
left-padded row (`mmjax.convert.flamingo.idefics_inputs`). Tolerance TOL = 1e-4 absolute in
float32 (the reasoning is in mmjax.convert.compare); the measured diffs are ~1e-7 to 1e-6.
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

from safetensors.numpy import load_file  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.convert.compare import convert_dir, export_dir  # noqa: E402
from mmjax.convert.flamingo import compare_idefics, idefics_inputs  # noqa: E402
from mmjax.errors import UnsupportedModelError  # noqa: E402
from mmjax.generate import GenerationConfig, generate  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
VISION = dict(embed_dim=16, image_size=8, patch_size=4, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2)
BASE = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5)
CASES = {
    # resampler with q/k LayerNorms, cross-attention q/k RMSNorms, a block before every layer,
    # per-channel gates, two additional rows (<fake_token_around_image>, <image>)
    "resampler_qk": dict(num_hidden_layers=2, cross_layer_interval=1, qk_layer_norms=True,
                         alpha_type="vector", additional_vocab_size=2, use_resampler=True,
                         perceiver_config=dict(use_resampler=True, resampler_n_latents=3,
                                               resampler_depth=2, resampler_n_heads=2,
                                               resampler_head_dim=8, qk_layer_norms_perceiver=True)),
    # no resampler (the tower's 5 tokens per image go straight in), blocks before layers 0 and
    # 2 of 4, scalar gates, no additional rows, a tied head
    "plain_interval2": dict(num_hidden_layers=4, cross_layer_interval=2, qk_layer_norms=False,
                            alpha_type="float", alpha_initializer="ones", additional_vocab_size=0,
                            use_resampler=False, tie_word_embeddings=True),
}


def build_hf_model(case, seed):
    torch.manual_seed(seed)
    config = transformers.IdeficsConfig(**BASE, **CASES[case], vision_config=VISION)
    model = randomise_torch(transformers.IdeficsForVisionText2Text(config), 0.08)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_(0.7 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_model_cache(tmp_path_factory, build_hf_model)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_media_and_vision_features_match_transformers(saved, name):
    model, path, module, params = saved(name)
    c = module.config
    assert c.use_resampler == CASES[name]["use_resampler"]
    assert c.num_cross_layers == CASES[name]["num_hidden_layers"] // CASES[name]["cross_layer_interval"]
    diffs, extra = compare_idefics(path, module, c, params, 2, 16, 0, torch, transformers)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{name}: {worst} max |diff| {diffs[worst]:.3e}"
    assert extra["reference_logits_max_abs"] > 0.1  # not a comparison between near-zeros
    inputs = extra["inputs"]
    assert inputs["images_per_row"] == [2, 3] and inputs["tokens_before_any_image"] > 0
    # the images matter: other pixels move the logits (the cross-attention path is live)
    tokens, mask, pixels, valid = idefics_inputs(np.random.default_rng(0), 2, 16, c)
    run = jax.jit(lambda p, px: module.apply({"params": p}, jnp.asarray(tokens, jnp.int32), px,
                                             image_valid=jnp.asarray(valid), input_mask=jnp.asarray(mask)))
    a = run(params, jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)))
    b = run(params, jnp.asarray(-pixels.transpose(0, 1, 3, 4, 2)))
    assert float(jnp.abs(a - b).max()) > 1e-2


def test_greedy_generation_with_images_matches_transformers(saved):
    model, _, module, params = saved("resampler_qk")
    c = module.config
    tokens, mask, pixels, valid = idefics_inputs(np.random.default_rng(1), 2, 8, c)
    from mmjax.convert.flamingo import processor_image_mask

    image_mask = processor_image_mask(tokens, c.image_token_index, pixels.shape[1], mask)
    new = 6
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             image_attention_mask=torch.from_numpy(image_mask),
                             do_sample=False, max_new_tokens=new, pad_token_id=0)
    ref_new = ref[:, tokens.shape[1]:].numpy()
    images = {"images": pixels.transpose(0, 1, 3, 4, 2), "image_valid": valid}
    out = generate(module, params, (tokens, mask), GenerationConfig(max_new_tokens=new, eos_token_id=()),
                   prefill_inputs=images)
    np.testing.assert_array_equal(out.tokens, ref_new)
    # beam search: each beam carries its row's media (FlamingoCache.map_rows)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             image_attention_mask=torch.from_numpy(image_mask), do_sample=False,
                             num_beams=3, max_new_tokens=new, pad_token_id=0, length_penalty=1.0,
                             early_stopping=False)
    out = generate(module, params, (tokens, mask),
                   GenerationConfig(max_new_tokens=new, eos_token_id=(), num_beams=3), prefill_inputs=images)
    np.testing.assert_array_equal(out.tokens, ref[:, tokens.shape[1]:].numpy())


def test_round_trip_gives_identical_tensors_and_a_loadable_config(saved, tmp_path):
    for name in CASES:
        model, path, module, params = saved(name)
        out = str(tmp_path / name)
        to_hf(module, params, out)
        a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (path, out))
        assert sorted(a) == sorted(b)
        for key, value in a.items():
            assert np.array_equal(b[key], value), key
        reloaded = transformers.IdeficsForVisionText2Text.from_pretrained(out).eval()
        for key in ("use_resampler", "cross_layer_interval", "qk_layer_norms", "alpha_type",
                    "additional_vocab_size", "tie_word_embeddings"):
            assert getattr(reloaded.config, key) == getattr(model.config, key), key
        _, again = from_hf(out)
        jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    # mmjax convert / export: HF dir -> mmjax model dir (Orbax + config) -> HF dir
    _, path, _, _ = saved("resampler_qk")
    convert_dir(path, str(tmp_path / "ckpt"))
    export_dir(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (path, str(tmp_path / "back")))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _edit_config(src, dst, fn):
    shutil.copytree(src, dst)
    cfg = json.loads(open(os.path.join(dst, "config.json")).read())
    fn(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_strict_config_errors(saved, tmp_path):
    _, path, _, _ = saved("resampler_qk")
    cases = [
        (lambda c: c.update(foo_bar=1), "foo_bar"),
        (lambda c: c.update(cross_layer_interval=3), "cross_layer_interval 3"),
        (lambda c: c.update(alpha_initializer="xavier"), "alpha_initializer 'xavier'"),
        (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "siglip_vision_model"),
        (lambda c: c["perceiver_config"].update(resampler_bogus=2), "resampler_bogus"),
        (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings with additional"),
        (lambda c: c.update(architectures=["IdeficsModel"]), "IdeficsModel"),
    ]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(UnsupportedModelError, match=match):
            from_hf(_edit_config(path, tmp_path / str(i), edit))
    _, _, module, params = saved("resampler_qk")
    with pytest.raises(UnsupportedModelError, match="layout='openflamingo'"):
        to_hf(module.config.replace(layout="openflamingo", cross_heads=4, cross_head_dim=8), params,
              str(tmp_path / "of"))


def test_compare_cli(saved, tmp_path, capsys):
    _, path, _, _ = saved("plain_interval2")
    assert cli.main(["compare", path, "--json", "--seq-len", "12"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_type"] == "idefics" and report["passed"] is True
    assert report["max_abs_diff"] <= TOL
    assert {"logits", "media", "vision_features", "media_mask"} <= set(report["diffs"])
    assert report["diffs"]["media_mask"] == 0.0
    bad = _edit_config(path, tmp_path / "bad", lambda c: c.update(cross_layer_interval=3))
    assert cli.main(["compare", bad, "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cross_layer_interval" in err
