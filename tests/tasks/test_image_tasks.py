"""The image tasks through the real training loop: CLIP (contrastive) on the digits with every
evaluation metric, then a ViT classifier initialised from that CLIP's image tower."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.train import run
from mmjax.train.pretrained import overlay

from support import ROOT  # noqa: E402
CLIP_DIGITS = os.path.join(ROOT, "experiments", "clip_digits.py")
VIT_DIGITS = os.path.join(ROOT, "experiments", "vit_digits.py")
TINY_TOWER = {"dim": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}


def _tiny(prefix):
    return [f"{prefix}.{k}={v}" for k, v in TINY_TOWER.items()]


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("clip") / "wd")
    metrics = run(CLIP_DIGITS, workdir=wd, steps=6, overrides=[
        *_tiny("model.vision"), *_tiny("model.text"), "model.projection_dim=16",
        "data.batch_size=32", "log_every=2", "eval_every=3", "checkpoint_every=3",
        "optimizer.warmup_steps=1"])
    return wd, metrics


def test_contrastive_task_reports_every_metric(clip_workdir):
    wd, m = clip_workdir
    for key in ("zero_shot_accuracy", "zero_shot_top5", "i2t_r@1", "i2t_r@5", "i2t_r@10",
                "t2i_r@1", "t2i_r@5", "t2i_r@10", "linear_probe_accuracy", "val_loss"):
        assert 0.0 <= m[key] <= (1.0 if key != "val_loss" else 100.0), (key, m[key])
    assert m["step"] == 6 and np.isfinite(m["train_loss"])
    assert "zero-shot top-3" in m["sample"]
    # the text tower's vocabulary came from the caption tokenizer, not the config's placeholder
    spec = json.load(open(os.path.join(wd, "mmjax_model.json")))
    assert spec["family"] == "clip" and spec["config"]["text"]["vocab_size"] > 10
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert any("images_per_sec" in r for r in rows)


def test_vit_initialised_from_clip_image_tower(clip_workdir, tmp_path):
    wd, _ = clip_workdir
    out = str(tmp_path / "vit")
    m = run(VIT_DIGITS, workdir=out, steps=2, overrides=[
        *_tiny("model"), f"init_from={wd!r}", "data.batch_size=32", "log_every=1",
        "checkpoint_every=0", "optimizer.learning_rate=1e-9", "optimizer.warmup_steps=0"])
    assert 0.0 <= m["test_accuracy"] <= 1.0
    report = json.load(open(os.path.join(out, "init_from.json")))
    assert sorted(report["kept"]) == ["head/bias", "head/kernel"]
    # with a negligible learning rate the tower still equals the CLIP one after 2 steps
    from mmjax.train.inference import load_for_inference

    _, clip_params, _ = load_for_inference(wd)
    _, vit_params, _ = load_for_inference(out)
    np.testing.assert_allclose(vit_params["patch_embed"]["kernel"],
                               clip_params["vision"]["patch_embed"]["kernel"], atol=1e-6)


def test_overlay_rules():
    target = {"a": {"w": jax.numpy.zeros((2, 3))}, "head": {"w": jax.numpy.zeros((3,))}}
    source = {"vision": {"a": {"w": np.ones((2, 3))}}, "other": {}}
    params, report = overlay(target, source, "vision")
    assert float(params["a"]["w"].sum()) == 6 and report["kept"] == ["head/w"]
    with pytest.raises(InputError, match="no 'text'"):
        overlay(target, source, "text")
    with pytest.raises(InputError, match="differ in shape"):
        overlay(target, {"a": {"w": np.ones((3, 3))}})
    with pytest.raises(InputError, match="no param of the model"):
        overlay(target, {"b": {"w": np.ones((2, 3))}})
