"""ViT and the CLIP / SigLIP text tower on the shared transformer stack (`mmjax.nn.transformer`):
`scan_layers=True` against the loop stack, remat policies, and a Hugging Face CLIP checkpoint in a
scanned CLIP.

Loop mode being the old behaviour (same params, same init values, bit-identical outputs) is what
tests/models/test_vit_clip.py and tests/parity/test_convert_vit_clip.py keep checking.

Tolerance SCAN_TOL = 1e-5 in float32 (absolute on activations of order 1, relative to the largest
gradient on gradients): a scanned stack computes the same function with the same params, but XLA
compiles one block body inside a while loop instead of unrolling the layers, so it may fuse and
order the matmul / LayerNorm / softmax reductions differently, and the backward pass accumulates
the per-layer parameter gradients through the scan's stacked buffers. Measured on these 3-layer
width-64 models with every tensor randomised, on CPU: forward outputs and every hidden state
bit-identical, gradients within 1.2e-7 (ViT) and 2.4e-6 (CLIP, gradients up to 11, so 2e-7
relative) -- float32 rounding; 1e-5 leaves headroom for other backends, while a real difference
moves outputs far more (on the ViT below: two layers' params swapped 0.26, a layer applied twice
0.61). Remat recomputes the same ops: measured bit-identical, REMAT_TOL 1e-6.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.clip import CLIP, CLIPConfig, CLIPTextConfig, TextTransformer
from mmjax.models.vit import ViT, ViTConfig
from mmjax.nn.transformer import (LAYERS_AXIS, is_scanned, match_layer_layout, stack_layer_params,
                                  unstack_layer_params)

SCAN_TOL = 1e-5
REMAT_TOL = 1e-6  # remat recomputes the same ops; only fusion across the checkpoint can differ
RNG = jax.random.PRNGKey(0)
LAYERS = 3


def images(batch=2, h=32, w=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, h, w, 3)), jnp.float32)


def text(config: CLIPTextConfig, batch=3, seq=12, seed=1):
    """Right-padded ids, the end-of-text token last in each row, and the matching mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, config.eos_token_id, size=(batch, seq))
    mask = np.ones((batch, seq), bool)
    for i in range(batch):
        end = seq - 1 - 3 * i
        ids[i, end] = config.eos_token_id
        ids[i, end + 1:] = config.pad_token_id
        mask[i, end + 1:] = False
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def maxdiff(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max((float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
                for x, y in pairs), default=0.0)


def randomise(params, seed):
    """Every tensor random (norm scales around 1, everything else ~0.1): activations of order 1
    in every layer, as in the Hugging Face parity tests, instead of the near-zero outputs of the
    default 0.02 init, so the tolerances below mean something."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for (path, x), key in zip(leaves, keys):
        noise = jax.random.normal(key, x.shape, x.dtype)
        names = [k.key for k in path]
        if names[-1] == "logit_scale":
            out.append(x)
        elif names[-1] == "scale" and any("norm" in n for n in names):
            out.append(1.0 + 0.2 * noise)
        else:
            out.append(0.1 * noise)
    return jax.tree_util.tree_unflatten(tree, out)


def value_and_grad(model, *args, **kw):
    """params -> ((loss, (output, intermediates)), grads), jitted, in full float32 matmul
    precision, for a fixed random projection of the output (every output element gets its own
    weight, so the gradients see all of it)."""
    def loss(params):
        out, inter = model.apply({"params": params}, *args, return_intermediates=True, **kw)
        main = out["logits_per_image"] if isinstance(out, dict) else out
        w = jax.random.normal(jax.random.PRNGKey(7), main.shape)
        return jnp.sum(main * w), (out, inter)
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(params):
        with jax.default_matmul_precision("highest"):
            return fn(params)
    return run


def grad_diff(a, b):
    """max |a - b| over two gradient trees, relative to the largest |a| (at least 1)."""
    scale = max(1.0, max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(a)))
    return maxdiff(a, b) / scale


def scanned(config):
    """The config (ViT, CLIP text or CLIP) with every stack scanned."""
    if isinstance(config, CLIPConfig):
        return config.replace(vision=config.vision.replace(scan_layers=True),
                              text=config.text.replace(scan_layers=True))
    return config.replace(scan_layers=True)


def logical_axes(tree):
    """{param path: logical axis names} of a boxed param tree."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
    return {tuple(k.key for k in path): tuple(p.names) for path, p in leaves}


def check_layout(loop_model, scan_model, loop_params, *args):
    """The scanned model's own params are the loop params stacked on a leading "layers" axis
    (same names, shapes [num_layers, ...] and logical axes ("layers", ...)), and the layouts
    convert into each other exactly."""
    loop_abs = jax.eval_shape(loop_model.init, RNG, *args)["params"]
    scan_abs = jax.eval_shape(scan_model.init, RNG, *args)["params"]
    stacked = stack_layer_params(loop_params)
    assert is_scanned(stacked) and not is_scanned(loop_params)
    shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.unbox(t))  # noqa: E731
    assert shapes(scan_abs) == shapes(stacked)
    expected = {}
    for path, axes in logical_axes(loop_abs).items():
        new = sum((("layers", "block") if re.fullmatch(r"layers_\d+", part) else (part,)
                   for part in path), ())
        expected[new] = (LAYERS_AXIS,) + axes if new != path else axes
    assert logical_axes(scan_abs) == expected
    assert maxdiff(unstack_layer_params(stacked), loop_params) == 0.0
    assert maxdiff(match_layer_layout(stacked, nn.unbox(loop_abs)), loop_params) == 0.0


@pytest.fixture(scope="module")
def vit_map():
    """A 3-layer ViT with MAP pooling (SigLIP's image tower) and a classifier head, loop layout."""
    config = ViTConfig.from_variant("tiny", num_layers=LAYERS, pool="map", class_token=False,
                                    num_classes=5, activation="gelu_tanh")
    model = ViT(config)
    params = randomise(nn.unbox(jax.jit(model.init)(RNG, images()))["params"], seed=1)
    return model, params


@pytest.fixture(scope="module")
def clip_tiny():
    base = CLIPConfig.from_variant("tiny")
    config = base.replace(vision=base.vision.replace(num_layers=LAYERS),
                          text=base.text.replace(num_layers=LAYERS))
    model = CLIP(config)
    ids, mask = text(config.text)
    params = randomise(nn.unbox(jax.jit(model.init)(RNG, images(), ids))["params"], seed=2)
    return model, params, ids, mask


@pytest.fixture(scope="module")
def vit_runs(vit_map):
    """((loss, (output, intermediates)), grads) of the ViT, loop and scanned (stacked params)."""
    model, params = vit_map
    scan_model = ViT(scanned(model.config))
    return {"loop": value_and_grad(model, images())(params),
            "scan": value_and_grad(scan_model, images())(stack_layer_params(params))}


def test_vit_scan_matches_loop(vit_map, vit_runs):
    model, params = vit_map
    check_layout(model, ViT(scanned(model.config)), params, images())
    (_, (out, inter)), grads = vit_runs["loop"]
    (_, (out_s, inter_s)), grads_s = vit_runs["scan"]
    assert out.shape == (2, 5) and float(jnp.abs(out).max()) > 0.1
    assert len(inter_s["hidden_states"]) == LAYERS + 1 == len(inter["hidden_states"])
    assert set(inter_s) == set(inter)
    for key in inter:
        assert maxdiff(inter[key], inter_s[key]) <= SCAN_TOL, key
    assert maxdiff(out, out_s) <= SCAN_TOL
    assert grad_diff(grads, unstack_layer_params(grads_s)) <= SCAN_TOL


def test_clip_scan_matches_loop(clip_tiny):
    model, params, ids, mask = clip_tiny
    scan_model = CLIP(scanned(model.config))
    check_layout(model, scan_model, params, images(), ids)
    (_, (out, inter)), grads = value_and_grad(model, images(), ids, input_mask=mask)(params)
    (_, (out_s, inter_s)), grads_s = value_and_grad(scan_model, images(), ids, input_mask=mask)(
        stack_layer_params(params))
    assert float(jnp.abs(out["logits_per_image"]).max()) > 0.1
    for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        assert maxdiff(out[key], out_s[key]) <= SCAN_TOL, key
    for tower in ("vision", "text"):
        assert len(inter_s[tower]["hidden_states"]) == LAYERS + 1
        pairs = zip(inter[tower]["hidden_states"], inter_s[tower]["hidden_states"])
        for i, (a, b) in enumerate(pairs):
            assert maxdiff(a, b) <= SCAN_TOL, f"{tower} hidden state {i}"
        assert maxdiff(inter[tower]["final_hidden"], inter_s[tower]["final_hidden"]) <= SCAN_TOL
    np.testing.assert_array_equal(inter_s["text"]["eos_index"], np.asarray(mask).sum(1) - 1)
    assert grad_diff(grads, unstack_layer_params(grads_s)) <= SCAN_TOL


def test_scanned_text_tower_is_still_causal(clip_tiny):
    """Changing a later token leaves earlier positions' hidden states alone (causal=True
    reaches the scanned block as a static argument)."""
    model, params, ids, _ = clip_tiny
    tower = TextTransformer(scanned(model.config.text))
    p = stack_layer_params(params["text"])
    run = jax.jit(lambda p, t: tower.apply({"params": p}, t,
                                           return_intermediates=True)[1]["final_hidden"])
    h1, h2 = run(p, ids), run(p, ids.at[:, 6].set(5))
    assert maxdiff(h1[:, :6], h2[:, :6]) == 0.0
    assert maxdiff(h1[:, 6:], h2[:, 6:]) > 1e-3


@pytest.mark.parametrize("policy", ["dots"])
def test_remat_policies_keep_outputs_and_grads(vit_map, vit_runs, clip_tiny, policy):
    """remat=True: the scanned ViT and the loop text tower compute the same outputs and
    gradients as without remat (and really are rematerialised). One policy here: all three,
    loop and scan, are pinned on the shared stack itself (tests/nn/test_transformer.py), which
    these towers run; the others cost ~25 s more of the family's budget for no new code path."""
    model, params = vit_map
    p = stack_layer_params(params)
    (_, (out, _)), grads = vit_runs["scan"]
    remat_vit = ViT(scanned(model.config).replace(remat=True, remat_policy=policy))
    (_, (out_r, _)), grads_r = value_and_grad(remat_vit, images())(p)
    assert maxdiff(out, out_r) <= REMAT_TOL and grad_diff(grads, grads_r) <= REMAT_TOL

    clip_model, clip_params, ids, mask = clip_tiny
    tcfg, tp = clip_model.config.text, clip_params["text"]
    (_, (tout, _)), tgrads = text_reference(tcfg, tp, ids, mask)
    remat_text = TextTransformer(tcfg.replace(remat=True, remat_policy=policy))
    (_, (tout_r, _)), tgrads_r = value_and_grad(remat_text, ids, input_mask=mask)(tp)
    assert maxdiff(tout, tout_r) <= REMAT_TOL and grad_diff(tgrads, tgrads_r) <= REMAT_TOL

    for m, v, args in ((remat_vit, p, (images(),)), (remat_text, tp, (ids,))):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: m.apply({"params": v}, *args).sum()))(v))
        assert "checkpoint" in jaxpr or "remat" in jaxpr


_TEXT_REFERENCE = {}


def text_reference(config, params, ids, mask):
    """The loop text tower without remat, computed once for all policies."""
    if "run" not in _TEXT_REFERENCE:
        run = value_and_grad(TextTransformer(config), ids, input_mask=mask)
        _TEXT_REFERENCE["run"] = run(params)
    return _TEXT_REFERENCE["run"]


def test_stack_options_are_validated_and_serialised():
    for cls, kw in ((ViTConfig, {}), (CLIPTextConfig, {})):
        for bad in ("bogus", "none", None):
            with pytest.raises(ConfigError, match="remat_policy"):
                cls(remat=True, remat_policy=bad, **kw)
        c = cls(scan_layers=True, remat=True, remat_policy="dots_no_batch", **kw)
        back = cls.from_dict(c.to_dict())
        assert back == c and back.scan_layers and back.remat_policy == "dots_no_batch"
    # configs saved before these fields existed still load, as the loop stack
    old = {k: v for k, v in ViTConfig().to_dict().items()
           if k not in ("scan_layers", "remat_policy")}
    assert ViTConfig.from_dict(old).scan_layers is False


def test_hf_clip_loads_into_a_scanned_clip(tmp_path):
    """A transformers CLIPModel (tiny random config) -> from_hf (loop layout) ->
    match_layer_layout -> a CLIP with both stacks scanned: still the transformers outputs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mmjax.convert import from_hf

    tol = 1e-4  # tests/parity/test_convert_vit_clip.py's TOL (summation order only)
    text_cfg = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                    num_attention_heads=4, max_position_embeddings=16, bos_token_id=98,
                    pad_token_id=0, eos_token_id=99)
    vision_cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, image_size=32, patch_size=8)
    hf = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text_cfg, vision_config=vision_cfg, projection_dim=32))
    torch.manual_seed(0)
    with torch.no_grad():  # every tensor random, so a swapped or dropped one shows
        for name, p in hf.named_parameters():
            if name == "logit_scale":
                p.fill_(2.9)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    hf.eval().save_pretrained(str(tmp_path))

    module, params = from_hf(str(tmp_path))
    assert not is_scanned(params)
    config = scanned(module.config)
    model = CLIP(config)
    x = images(batch=2)
    ids, mask = text(config.text, batch=3, seq=12)
    target = nn.unbox(jax.eval_shape(model.init, RNG, x, ids)["params"])
    p = match_layer_layout(params, target)
    assert is_scanned(p)
    assert (jax.tree_util.tree_map(lambda a: a.shape, p)
            == jax.tree_util.tree_map(lambda a: a.shape, target))
    assert maxdiff(match_layer_layout(p, params), params) == 0.0  # back to loop (HF export)

    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                 pixel_values=torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                 attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
                 output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(lambda p, x, t, m: model.apply(
            {"params": p}, x, t, input_mask=m, return_intermediates=True))(p, x, ids, mask)
    assert np.abs(ref.logits_per_image.numpy()).max() > 1.0
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert maxdiff(out[key], getattr(ref, key).numpy()) <= tol, key
    vis = inter["vision"]["hidden_states"]
    assert len(vis) == LAYERS + 1 == len(ref.vision_model_output.hidden_states)
    for i, (a, b) in enumerate(zip(vis, ref.vision_model_output.hidden_states)):
        assert maxdiff(a, b.numpy()) <= tol, f"vision hidden state {i}"
    real = np.asarray(mask)[..., None]
    text_hidden = zip(inter["text"]["hidden_states"], ref.text_model_output.hidden_states)
    for i, (a, b) in enumerate(text_hidden):
        diff = maxdiff(np.where(real, a, 0), np.where(real, b.numpy(), 0))
        assert diff <= tol, f"text hidden state {i}"
