"""Hugging Face ViT / CLIP <-> mmjax: float32 parity with the PyTorch reference, round trips,
strict configs, and `mmjax compare` on ViT and CLIP directories.

Each case builds a random-weight transformers model (every tensor randomised, norms and biases
included, so a swapped or dropped tensor shows), saves it with `save_pretrained` and converts
it with `from_hf`. Reference outputs come from the PyTorch model object, never from mmjax.
Images are NCHW for transformers and NHWC for mmjax.

Architectures: ViTModel, ViTForImageClassification, CLIPModel, CLIPVisionModel, CLIPTextModel,
SiglipVisionModel, SiglipModel; patch sizes 6, 7, 8; image sizes 24, 28, 30, 32 and 24x40 (grids
3x3 to 5x5, most not powers of two); exact GELU, tanh GELU and QuickGELU.

Tolerance TOL = 1e-4 absolute in float32 (mmjax.convert.compare explains it): both sides compute
the same function and differ only in summation order; on these 2-layer width-64 models with
every tensor randomised the measured differences are 1e-7 .. 3e-6, so 1e-4 leaves > 30x headroom,
while a transposed projection, a wrong pooling position or activation, a missing norm or
a position table off by one row moves outputs by 1e-2 or more.
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
from mmjax.errors import InputError, UnsupportedModelError  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
VIT_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
VIT_CASES = {
    # ViTModel with its pooler, exact GELU, 32px / patch 8
    "vit_model": ("ViTModel", dict(image_size=32, patch_size=8)),
    # classifier, non-square image whose sides are not powers of two, QuickGELU, no qkv bias
    "vit_classifier": ("ViTForImageClassification", dict(
        image_size=[24, 40], patch_size=8, hidden_act="quick_gelu", qkv_bias=False, num_labels=7)),
}
CLIP_TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=98, pad_token_id=0)
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CLIP_CASES = {
    # pooled at the first eos id (99), QuickGELU, 32px / patch 8
    "clip_eos": (dict(eos_token_id=99), dict(image_size=32, patch_size=8)),
    # legacy eos_token_id 2: pooled at the largest id; GELU; 30px / patch 6 (a 5x5 grid)
    "clip_legacy": (dict(eos_token_id=2, hidden_act="gelu"),
                    dict(image_size=30, patch_size=6, hidden_act="gelu")),
}


# stand-alone towers and SigLIP: (class, config class, config kwargs)
TOWER_CASES = {
    # CLIPVisionModel, exact GELU, 28px / patch 7 (a 4x4 grid)
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(CLIP_VISION, image_size=28, patch_size=7,
                                                               hidden_act="gelu")),
    # CLIPTextModel, QuickGELU, pooled at the first eos id
    "clip_text": ("CLIPTextModel", "CLIPTextConfig", dict(CLIP_TEXT, eos_token_id=99)),
    # SiglipVisionModel (attention-pooling head), exact GELU, 24px / patch 8 (3x3)
    "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", dict(CLIP_VISION, image_size=24, patch_size=8,
                                                                     hidden_act="gelu")),
}
# SiglipModel: tanh-GELU (its default), 30px / patch 6 (5x5), text head 64 -> 64
SIGLIP_TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16)
SIGLIP_VISION = dict(CLIP_VISION, image_size=30, patch_size=6)


def randomise(model, seed):
    torch.manual_seed(seed)
    return randomise_torch(model, 0.1, fixed={"logit_scale": 2.9, "logit_bias": -2.5})


def build_hf(name, seed):
    if name in VIT_CASES:
        arch, over = VIT_CASES[name]
        return randomise(getattr(transformers, arch)(transformers.ViTConfig(**VIT_BASE, **over)), seed)
    if name in TOWER_CASES:
        arch, config_cls, kw = TOWER_CASES[name]
        return randomise(getattr(transformers, arch)(getattr(transformers, config_cls)(**kw)), seed)
    if name == "siglip":
        config = transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config=SIGLIP_VISION)
        return randomise(transformers.SiglipModel(config), seed)
    text, vision = CLIP_CASES[name]
    config = transformers.CLIPConfig(text_config={**CLIP_TEXT, **text},
                                     vision_config={**CLIP_VISION, **vision}, projection_dim=32)
    return randomise(transformers.CLIPModel(config), seed)


# Each case's torch seed, fixed (the order the whole file builds them in), not the number of cases
# built before it (hf_model_cache's default): a test run alone or on another xdist worker gets the
# same weights as the full file (clip_legacy drawn with seed 1 has |logits| < 1 and fails the
# "not near-zero" check).
SEEDS = {name: i for i, name in enumerate(["vit_model", "vit_classifier", "clip_eos", "clip_legacy",
                                           "clip_vision", "clip_text", "siglip_vision", "siglip"])}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (hf model, hf dir, mmjax module, params); built once per case."""
    return hf_model_cache(tmp_path_factory, lambda name, seed: build_hf(name, SEEDS[name]))


def nchw_images(model_config, batch=3, seed=0):
    size = model_config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).normal(size=(batch, 3, h, w)).astype(np.float32)


def maxdiff(a, b, mask=None):
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(d[mask].max() if mask is not None else d.max())


@pytest.mark.parametrize("name", list(VIT_CASES))
def test_vit_matches_transformers(saved, name):
    model, _, module, params = saved(name)
    x = nchw_images(model.config)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(lambda p, im: module.apply({"params": p}, im, return_intermediates=True))(
            params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    if name == "vit_classifier":
        assert module.config.num_classes == 7 and module.config.image_hw == (24, 40)
        ref_out = ref.logits.numpy()
    else:
        ref_out = ref.pooler_output.numpy()
        assert maxdiff(inter["final_hidden"], ref.last_hidden_state.numpy()) <= TOL
    assert out.shape == ref_out.shape
    assert np.abs(ref_out).max() > 0.1  # not a comparison between near-zeros
    assert maxdiff(out, ref_out) <= TOL, f"{name}: output max |diff| {maxdiff(out, ref_out):.3e}"
    assert len(inter["hidden_states"]) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(inter["hidden_states"], ref.hidden_states)):
        assert maxdiff(a, b.numpy()) <= TOL, f"{name}: hidden state {i}"


def clip_text(config, batch=3, seq=14, seed=1):
    """Right-padded ids (rows of different lengths), the end-of-text token last in each row."""
    t = config.text_config
    rng = np.random.default_rng(seed)
    legacy = t.eos_token_id == 2
    end_id = t.vocab_size - 1 if legacy else t.eos_token_id
    tokens = rng.integers(3, 97, size=(batch, seq))
    if legacy:  # a 2 early in the row: argmax pooling must not stop there
        tokens[:, 1] = 2
    mask = np.ones((batch, seq), bool)
    for i in range(batch):
        end = seq - 1 - 4 * i
        tokens[i, end] = end_id
        tokens[i, end + 1:] = t.pad_token_id
        mask[i, end + 1:] = False
    return tokens, mask


@pytest.mark.parametrize("name", list(CLIP_CASES))
def test_clip_matches_transformers(saved, name):
    model, _, module, params = saved(name)
    x = nchw_images(model.config.vision_config)
    tokens, mask = clip_text(model.config)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(x),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(lambda p, im, t, m: module.apply(
            {"params": p}, im, t, input_mask=m, return_intermediates=True))(
            params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    expected_pooling = "argmax" if name == "clip_legacy" else "first_eos"
    assert module.config.text.eos_pooling == expected_pooling
    np.testing.assert_array_equal(inter["text"]["eos_index"], mask.sum(1) - 1)
    assert np.abs(ref.logits_per_image.numpy()).max() > 1.0
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        ref_value = getattr(ref, key).numpy()
        assert out[key].shape == ref_value.shape
        assert maxdiff(out[key], ref_value) <= TOL, f"{name}: {key} max |diff| {maxdiff(out[key], ref_value):.3e}"
    vref, tref = ref.vision_model_output, ref.text_model_output
    assert len(inter["vision"]["hidden_states"]) == len(vref.hidden_states)
    for i, (a, b) in enumerate(zip(inter["vision"]["hidden_states"], vref.hidden_states)):
        assert maxdiff(a, b.numpy()) <= TOL, f"{name}: vision hidden state {i}"
    assert len(inter["text"]["hidden_states"]) == len(tref.hidden_states)
    for i, (a, b) in enumerate(zip(inter["text"]["hidden_states"], tref.hidden_states)):
        assert maxdiff(a, b.numpy(), mask) <= TOL, f"{name}: text hidden state {i}"
    assert maxdiff(inter["text"]["final_hidden"], tref.last_hidden_state.numpy(), mask) <= TOL
    # before normalisation: CLIPModel's tower outputs carry the projected pooled features
    with jax.default_matmul_precision("highest"):
        raw_img = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), normalize=False,
                               method=type(module).encode_image)
    assert maxdiff(raw_img, vref.pooler_output.numpy()) <= TOL


def test_clip_pooling_rule_matters(saved):
    """Pooling at the wrong position moves the text embeddings (the parity test is not vacuous)."""
    model, _, module, params = saved("clip_legacy")
    tokens, _ = clip_text(model.config)
    c = module.config
    wrong = module.clone(config=c.replace(text=c.text.replace(eos_pooling="first_eos")))

    def encode(m):
        return np.asarray(m.apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                  method=type(module).encode_text))

    assert maxdiff(encode(module), encode(wrong)) > 1e-2


@pytest.mark.parametrize("name", ["vit_model", "vit_classifier", "clip_eos", "clip_legacy", "clip_vision",
                                  "clip_text", "siglip_vision", "siglip"])
def test_round_trip_gives_identical_tensors(saved, name, tmp_path):
    model, path, module, params = saved(name)
    to_hf(module, params, str(tmp_path))
    original, exported = load_file(os.path.join(path, "model.safetensors")), load_file(
        str(tmp_path / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    # transformers reads the exported config back as the same architecture and shapes
    with open(os.path.join(path, "config.json")) as f:
        src = json.load(f)
    back = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert back.architectures == src["architectures"]
    if name in ("clip_eos", "clip_legacy"):
        assert back.text_config.eos_token_id == src["text_config"]["eos_token_id"]
        assert back.vision_config.image_size == src["vision_config"]["image_size"]
    elif name.startswith("vit"):
        assert back.num_labels == model.config.num_labels or name == "vit_model"
    module2, params2 = from_hf(str(tmp_path))
    assert module2.config == module.config


def _edit_config(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_unknown_config_keys_are_named(saved, tmp_path):
    _, vit_path, _, _ = saved("vit_model")
    _, clip_path, _, _ = saved("clip_eos")
    bad = _edit_config(vit_path, str(tmp_path / "a"), lambda c: c.update(use_mask_tokn=True))
    with pytest.raises(UnsupportedModelError, match="use_mask_tokn"):
        from_hf(bad)
    bad = _edit_config(vit_path, str(tmp_path / "b"), lambda c: c.update(pooler_act="relu"))
    with pytest.raises(UnsupportedModelError, match="pooler_act"):
        from_hf(bad)
    bad = _edit_config(clip_path, str(tmp_path / "c"), lambda c: c["text_config"].update(rope_theta=1.0))
    with pytest.raises(UnsupportedModelError, match="text_config.*rope_theta"):
        from_hf(bad)
    bad = _edit_config(clip_path, str(tmp_path / "d"), lambda c: c["vision_config"].update(hidden_act="mish"))
    with pytest.raises(UnsupportedModelError, match="vision_config.hidden_act 'mish'"):
        from_hf(bad)
    bad = _edit_config(clip_path, str(tmp_path / "e"), lambda c: c.update(architectures=["CLIPSegModel"]))
    with pytest.raises(UnsupportedModelError, match="CLIPSegModel"):
        from_hf(bad)
    bad = _edit_config(vit_path, str(tmp_path / "f"), lambda c: c.update(image_size=30))
    with pytest.raises(UnsupportedModelError, match="not divisible by patch_size"):
        from_hf(bad)


def test_missing_and_misshaped_tensors_are_named(saved, tmp_path):
    _, path, _, _ = saved("clip_eos")
    import shutil

    for case in ("missing", "shape"):
        dst = tmp_path / case
        shutil.copytree(path, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        if case == "missing":
            del tensors["vision_model.pre_layrnorm.bias"]
            match = "lacks 1 tensor.*vision_model.pre_layrnorm.bias"
        else:
            tensors["text_projection.weight"] = np.zeros((16, 64), np.float32)
            match = "text_projection.weight: shape \\(16, 64\\)"
        save_file(tensors, str(dst / "model.safetensors"))
        with pytest.raises(InputError, match=match):
            from_hf(str(dst))


def test_features_only_vit_without_pooler_is_not_exported(saved, tmp_path):
    _, _, module, params = saved("vit_model")
    config = module.config.replace(representation=None)
    plain = {k: v for k, v in params.items() if k != "pre_logits"}
    with pytest.raises(UnsupportedModelError, match="pooler"):
        to_hf(config, plain, str(tmp_path))


def test_compare_cli_on_vit_and_clip_dirs(saved, capsys):
    """`mmjax compare DIR --json` in-process (the subprocess entry point is tests/cli's): exit 0,
    the JSON report's keys."""
    from mmjax import cli

    _, vit_path, _, _ = saved("vit_classifier")
    _, clip_path, _, _ = saved("clip_eos")
    for path, keys in ((vit_path, {"logits", "hidden_states"}),
                       (clip_path, {"image_embeds", "text_embeds", "logits_per_image",
                                    "vision_hidden_states", "text_hidden_states"})):
        code = cli.main(["compare", path, "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err[-2000:]
        report = json.loads(captured.out.strip().splitlines()[-1])
        assert report["passed"] is True and report["max_abs_diff"] <= TOL
        assert keys <= set(report["diffs"])


# --- CLIPVisionModel, CLIPTextModel, SiglipVisionModel, SiglipModel -------------------------------

@pytest.mark.parametrize("name", ["clip_vision", "siglip_vision"])
def test_vision_towers_match_transformers(saved, name):
    model, _, module, params = saved(name)
    x = nchw_images(model.config)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(lambda p, im: module.apply({"params": p}, im, return_intermediates=True))(
            params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    expected_pool = "cls" if name == "clip_vision" else "map"
    assert module.config.pool == expected_pool and module.config.activation == "gelu"
    assert np.abs(ref.pooler_output.numpy()).max() > 0.1
    assert maxdiff(out, ref.pooler_output.numpy()) <= TOL, f"{name}: pooler {maxdiff(out, ref.pooler_output.numpy()):.2e}"
    assert len(inter["hidden_states"]) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(inter["hidden_states"], ref.hidden_states)):
        assert maxdiff(a, b.numpy()) <= TOL, f"{name}: hidden state {i}"
    # HF's last_hidden_state: before post_layernorm for CLIP, after it for SigLIP
    last = inter["hidden_states"][-1] if name == "clip_vision" else inter["final_hidden"]
    assert maxdiff(last, ref.last_hidden_state.numpy()) <= TOL


def test_clip_text_model_matches_transformers(saved):
    model, _, module, params = saved("clip_text")
    tokens, mask = clip_text(transformers.CLIPConfig(text_config=model.config.to_dict()))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        pooled, inter = jax.jit(lambda p, t, m: module.apply({"params": p}, t, input_mask=m,
                                                             return_intermediates=True))(
            params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    assert type(module).__name__ == "TextTransformer" and module.config.activation == "quick_gelu"
    assert maxdiff(pooled, ref.pooler_output.numpy()) <= TOL
    assert maxdiff(inter["final_hidden"], ref.last_hidden_state.numpy(), mask) <= TOL
    for i, (a, b) in enumerate(zip(inter["hidden_states"], ref.hidden_states)):
        assert maxdiff(a, b.numpy(), mask) <= TOL, f"hidden state {i}"


@pytest.mark.parametrize("padded", [False, True])
def test_siglip_matches_transformers(saved, padded):
    """Full-length text without a mask (how SigLIP is trained) and right-padded text with one."""
    model, _, module, params = saved("siglip")
    x = nchw_images(model.config.vision_config)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 100, size=(3, 16))
    mask = np.ones((3, 16), bool)
    if padded:
        mask[1, 10:] = mask[2, 5:] = False
    kw = {"attention_mask": torch.from_numpy(mask.astype(np.int64))} if padded else {}
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(x), output_hidden_states=True,
                    **kw)
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(lambda p, im, t, m: module.apply({"params": p}, im, t, input_mask=m,
                                                              return_intermediates=True))(
            params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(tokens, jnp.int32),
            jnp.asarray(mask) if padded else None)
    c = module.config
    assert c.vision.pool == "map" and not c.vision.class_token and not c.text.causal
    assert c.text.eos_pooling == "last" and c.text.activation == "gelu_tanh"
    assert np.abs(ref.logits_per_image.numpy()).max() > 1.0
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        ref_value = getattr(ref, key).numpy()
        assert maxdiff(out[key], ref_value) <= TOL, f"{key} {maxdiff(out[key], ref_value):.2e}"
    vref, tref = ref.vision_model_output, ref.text_model_output
    assert maxdiff(inter["vision"]["pooled"], vref.pooler_output.numpy()) <= TOL
    for a, b in zip(inter["vision"]["hidden_states"], vref.hidden_states):
        assert maxdiff(a, b.numpy()) <= TOL
    for a, b in zip(inter["text"]["hidden_states"], tref.hidden_states):
        assert maxdiff(a, b.numpy(), mask) <= TOL


@pytest.mark.parametrize("name, size", [("vit_model", (48, 40)), ("clip_eos", (40, 56)), ("siglip", (42, 36))])
def test_position_interpolation_matches_transformers(saved, name, size):
    """Images at a resolution the checkpoint was not trained at: mmjax's
    `interpolate_pos_encoding=True` (bicubic, [CLS] position kept) against transformers' flag
    of the same name, and `set_image_size` against both."""
    from mmjax.models.vit import set_image_size

    model, _, module, params = saved(name)
    x = np.random.default_rng(4).normal(size=(2, 3) + size).astype(np.float32)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    with torch.no_grad():
        if name == "vit_model":
            ref = model(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True).pooler_output.numpy()
        else:
            ref = model.get_image_features(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True)
            ref = ref.pooler_output.numpy()
            ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    method = None if name == "vit_model" else type(module).encode_image
    with jax.default_matmul_precision("highest"):
        ours = module.apply({"params": params}, nhwc, interpolate_pos_encoding=True, method=method)
        resized, new_params = set_image_size(module, params, size)
        again = resized.apply({"params": new_params}, nhwc, method=method)
    assert maxdiff(ours, ref) <= TOL, f"{name}: {maxdiff(ours, ref):.2e}"
    assert maxdiff(again, ref) <= TOL
    # the test tells resampling rules apart: bilinear instead of bicubic misses transformers
    linear, linear_params = set_image_size(module, params, size, method="bilinear")
    with jax.default_matmul_precision("highest"):
        other = linear.apply({"params": linear_params}, nhwc, method=method)
    assert maxdiff(other, ref) > 2 * TOL
    # without the flag a resolution the checkpoint was not built for is refused
    with pytest.raises(InputError, match="interpolate_pos_encoding"):
        module.apply({"params": params}, nhwc, method=method)


def test_compare_on_tower_and_siglip_dirs(saved):
    """What `mmjax compare` reports for the new architectures (the CLI wraps this function)."""
    from mmjax.convert.compare import compare

    expected = {"clip_vision": {"pooler_output", "last_hidden_state", "hidden_states"},
                "clip_text": {"pooler_output", "last_hidden_state", "hidden_states"},
                "siglip_vision": {"pooler_output", "hidden_states"},
                "siglip": {"image_embeds", "text_embeds", "logits_per_image", "vision_pooler_output"}}
    for name, keys in expected.items():
        report = compare(saved(name)[1], batch=2, seq_len=12)
        assert report["passed"] is True and report["max_abs_diff"] <= TOL, (name, report["diffs"])
        assert keys <= set(report["diffs"]), (name, report["diffs"])


def test_siglip_and_tower_configs_are_strict(saved, tmp_path):
    _, siglip_path, _, _ = saved("siglip")
    _, text_path, _, _ = saved("clip_text")
    bad = _edit_config(siglip_path, str(tmp_path / "a"), lambda c: c["vision_config"].update(vision_use_head=False))
    with pytest.raises(UnsupportedModelError, match="vision_use_head"):
        from_hf(bad)
    bad = _edit_config(siglip_path, str(tmp_path / "b"), lambda c: c["text_config"].update(rope_scaling=None))
    with pytest.raises(UnsupportedModelError, match="text_config.*rope_scaling"):
        from_hf(bad)
    bad = _edit_config(siglip_path, str(tmp_path / "c"), lambda c: c["vision_config"].update(image_size=[30, 36]))
    with pytest.raises(UnsupportedModelError, match="image_size must be one int"):
        from_hf(bad)
    bad = _edit_config(text_path, str(tmp_path / "d"), lambda c: c.update(architectures=["CLIPTextModelWithProjection"]))
    with pytest.raises(UnsupportedModelError, match="CLIPTextModelWithProjection"):
        from_hf(bad)
    bad = _edit_config(text_path, str(tmp_path / "e"), lambda c: c.update(use_cache=True, flash=1))
    with pytest.raises(UnsupportedModelError, match="'flash'"):
        from_hf(bad)


def test_towers_that_hf_cannot_hold_are_not_exported(saved, tmp_path):
    _, _, module, params = saved("siglip")
    text = module.config.text
    with pytest.raises(UnsupportedModelError, match="causal=False"):
        to_hf(text, params["text"], str(tmp_path / "t"), family="clip_text")
    _, _, cmodule, cparams = saved("clip_eos")
    biased = cmodule.config.replace(logit_bias_init=-10.0)
    with pytest.raises(UnsupportedModelError, match="logit bias"):
        to_hf(biased, {**cparams, "logit_bias": np.float32(-10.0)}, str(tmp_path / "c"))


@pytest.mark.parametrize("name", ["clip_eos", "clip_text", "clip_vision", "siglip"])
def test_convert_then_export_model_dirs(saved, name, tmp_path):
    """`mmjax convert` then `mmjax export` (their library functions): identical tensors and the
    same architecture come back (the model dir records the HF model type)."""
    from mmjax.convert.compare import convert_dir, export_dir

    _, path, _, _ = saved(name)
    convert_dir(path, str(tmp_path / "mmjax"))
    export_dir(str(tmp_path / "mmjax"), str(tmp_path / "hf"))
    original, exported = load_file(os.path.join(path, "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    with open(os.path.join(path, "config.json")) as f, open(tmp_path / "hf" / "config.json") as g:
        assert json.load(f)["architectures"] == json.load(g)["architectures"]


def test_clip_text_with_eos_outside_the_vocabulary_pools_at_position_0_like_transformers(tmp_path):
    """transformers' small CLIP test configs keep eos_token_id 49407 beside a tiny vocab: no
    row can hold it, transformers pools at position 0, and so must mmjax (eagerly, and in
    `mmjax compare`), instead of refusing the model."""
    from mmjax.convert.compare import compare

    config = transformers.CLIPTextConfig(**{**CLIP_TEXT, "eos_token_id": 49407})
    model = randomise(transformers.CLIPTextModel(config), seed=5)
    model.save_pretrained(str(tmp_path))
    module, params = from_hf(str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, CLIP_TEXT["vocab_size"], size=(3, 9))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens)).pooler_output.numpy()
    with jax.default_matmul_precision("highest"):
        ours = module.apply({"params": params}, jnp.asarray(tokens, jnp.int32))  # concrete ids
    assert maxdiff(ours, ref) <= TOL
    result = compare(str(tmp_path), batch=2, seq_len=8)
    assert result["passed"] and result["max_abs_diff"] <= TOL
