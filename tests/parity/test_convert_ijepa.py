"""Hugging Face I-JEPA encoder <-> mmjax ViT in I-JEPA's layout (`mmjax.convert.ijepa`): float32
parity with the PyTorch reference, `mmjax compare` / `convert` / `export`, strictness.

Random-weight transformers models with every tensor randomised (the position table, norms and
biases included); a non-square 24x40 image with 8 px patches (a 3x5 grid, so a transposed grid
shows) and a square one. Tolerance 1e-4 in fp32: both sides compute the same function; measured
differences are ~1e-6, while a position row off by one, a missing final norm or mean pooling over
the wrong tokens move outputs by 1e-2 or more.
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax import cli  # noqa: E402
from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.errors import InputError, UnsupportedModelError  # noqa: E402

from support import randomise_torch  # noqa: E402

TOL = 1e-4
BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijepa")
    out = {}
    torch.manual_seed(0)
    for name, cls, kw in (
        ("model", transformers.IJepaModel, dict(image_size=[24, 40], patch_size=8)),
        ("classifier", transformers.IJepaForImageClassification,
         dict(image_size=16, patch_size=4, num_labels=5, hidden_act="gelu_pytorch_tanh")),
    ):
        model = randomise_torch(cls(transformers.IJepaConfig(**BASE, **kw)))
        path = str(root / name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def _compare_json(path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["compare", path, "--json"])
    return code, json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["model", "classifier"])
def test_ijepa_matches_transformers(saved, name):
    import jax.numpy as jnp

    path, ref_model = saved[name]
    module, params = from_hf(path)
    c = module.config
    assert (c.class_token, c.pool) == (False, "gap")
    images = np.random.default_rng(1).normal(size=(2, 3, *c.image_hw)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.from_numpy(images), output_hidden_states=True)
    out, inter = module.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)),
                              return_intermediates=True)
    if name == "classifier":
        np.testing.assert_allclose(np.asarray(out), ref.logits.numpy(), atol=TOL, rtol=0)
    else:
        np.testing.assert_allclose(np.asarray(inter["final_hidden"]), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
        # the pooled output is the mean of the final-normed patch tokens (what the classifier reads)
        np.testing.assert_allclose(np.asarray(out), ref.last_hidden_state.numpy().mean(1), atol=TOL, rtol=0)
    assert len(inter["hidden_states"]) == len(ref.hidden_states)
    code, report = _compare_json(path)
    assert code == 0 and report["passed"] and report["model_type"] == "ijepa"
    assert report["max_abs_diff"] < TOL


def test_export_round_trip_and_transformers_loads_it(saved, tmp_path):
    path, ref_model = saved["model"]
    module, params = from_hf(path)
    to_hf(module, params, str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["model_type"] == "ijepa" and cfg["architectures"] == ["IJepaModel"]
    again = transformers.IJepaModel.from_pretrained(str(tmp_path / "out")).eval()
    for (k, a), (k2, b) in zip(sorted(ref_model.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    # convert -> export through the CLI too
    assert cli.main(["convert", path, str(tmp_path / "mm")]) == 0
    assert cli.main(["export", str(tmp_path / "mm"), str(tmp_path / "hf2")]) == 0
    assert os.path.isfile(tmp_path / "hf2" / "config.json")


def test_pooler_checkpoint_and_unknown_keys_are_refused(saved, tmp_path):
    path, _ = saved["model"]
    model = transformers.IJepaModel(transformers.IJepaConfig(**BASE, image_size=16, patch_size=4),
                                    add_pooling_layer=True)
    model.save_pretrained(str(tmp_path / "pooler"))
    with pytest.raises(InputError, match="pooler.dense"):
        from_hf(str(tmp_path / "pooler"))
    assert cli.main(["compare", str(tmp_path / "pooler")]) == 2
    cfg = json.load(open(os.path.join(path, "config.json")))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(path):
        if f != "config.json":
            os.symlink(os.path.join(path, f), bad / f)
    (bad / "config.json").write_text(json.dumps({**cfg, "use_mask_tokens": True}))
    with pytest.raises(UnsupportedModelError, match="use_mask_tokens"):
        from_hf(str(bad))


def test_in_memory_module_names_are_accepted():
    from mmjax.convert.ijepa import _legacy_name

    assert _legacy_name("layers.3.attention.q_proj.weight") == "encoder.layer.3.attention.attention.query.weight"
    assert _legacy_name("ijepa.layers.0.mlp.fc2.bias") == "ijepa.encoder.layer.0.output.dense.bias"
    assert _legacy_name("layers.1.layernorm_before.weight") == "encoder.layer.1.layernorm_before.weight"
    assert _legacy_name("embeddings.position_embeddings") == "embeddings.position_embeddings"
