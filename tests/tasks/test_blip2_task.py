"""BLIP-2's two stages through the real training loop on the digits, with the experiment files
themselves at tiny sizes: stage 1 (task "blip2": ITC + ITM + ITG) keeps the image tower frozen,
reports the retrieval / ITM / ITG metrics and leaves a workdir that loads as one Blip2; stage 2
(task "visual_sft" on the same family) starts from it, trains only the queries, the Q-Former and
the projection, and reports the caption metrics."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax.train import load_for_inference, run
from mmjax.train.experiment import load_experiment
from mmjax.train.task import build_task

from support import ROOT  # noqa: E402

STAGE1 = os.path.join(ROOT, "experiments", "blip2_digits_stage1.py")
STAGE2 = os.path.join(ROOT, "experiments", "blip2_digits.py")
VISION = ["model.vision.dim=32", "model.vision.num_layers=1", "model.vision.num_heads=2", "model.vision.mlp_dim=64",
          "model.qformer.encoder_width=32", "model.qformer.dim=32", "model.qformer.num_layers=1",
          "model.qformer.num_heads=2", "model.qformer.mlp_dim=64", "model.num_query_tokens=4", "model.embed_dim=16"]
COMMON = ["log_every=2", "checkpoint_every=0", "optimizer.warmup_steps=1", "data.batch_size=8"]


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("blip2") / "stage1")
    over = VISION + COMMON + ["init_from=None", "optimizer.learning_rate=3e-3", "data.eval_batch_size=64",
                              "data.eval_limit=64", "eval_at_start=False"]
    return wd, over, run(STAGE1, workdir=wd, steps=6, overrides=over)


def test_stage1_metrics_frozen_tower_and_workdir_loads(stage1, tmp_path):
    wd, over, m = stage1
    assert m["step"] == 6 and np.isfinite(m["train_loss"])
    for key in ("retrieval_recall_at_1", "t2i_r@1", "itm_accuracy", "itg_caption_accuracy"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["retrieval_recall_at_1"] == m["i2t_r@1"]
    module, params, _ = load_for_inference(wd)
    assert type(module).__name__ == "Blip2" and "itc_temp" in params
    task = build_task(load_experiment(STAGE1, over), str(tmp_path), log=lambda s: None)
    fresh = _flat(nn.meta.unbox(jax.jit(task.init_params)(jax.random.split(jax.random.PRNGKey(0))[0])))
    trained = _flat(params)
    assert trained.keys() == fresh.keys()
    changed = {k for k in fresh if not np.array_equal(fresh[k], trained[k])}
    assert not any(k.startswith("vision/") for k in changed)  # the image encoder is frozen
    assert any(k.startswith("qformer/layers_0/cross_attn") for k in changed)
    assert {"itc_temp", "query_tokens", "itm_head/kernel", "qformer/lm_bias"} <= changed


def test_stage2_trains_the_qformer_and_projection_only(stage1, tmp_path, capsys):
    wd1, _, _ = stage1
    wd2 = str(tmp_path / "stage2")
    text = ["model.text.dim=32", "model.text.num_layers=1", "model.text.num_heads=2", "model.text.num_kv_heads=1",
            "model.text.mlp_dim=64", "model.text.dtype='float32'"]
    m = run(STAGE2, workdir=wd2, steps=4, phase="stage2", overrides=VISION + text + COMMON + [
        f"init_from={wd1!r}", "data.tokenizer=None", "data.vocab_size=400", "data.eval_per_type=2",
        "data.eval_batch_size=16", "data.eval_captions=8", "data.caption_max_new_tokens=4",
        "data.max_new_tokens=2", "optimizer.learning_rate=3e-3", "eval_at_start=False"])
    assert 0.0 <= m["caption_bleu4"] <= 1.0 and 0.0 <= m["caption_cider"] <= 10.0
    assert 0.0 <= m["caption_accuracy"] <= 1.0
    p1, p2 = _flat(load_for_inference(wd1)[1]), _flat(load_for_inference(wd2)[1])
    for k, v in p2.items():
        if k.startswith("vision/"):
            assert np.array_equal(v, p1[k]), k  # from stage 1, frozen
    moved = [k for k in p2 if k.startswith(("qformer/", "query_tokens")) and not np.array_equal(p2[k], p1[k])]
    assert moved and "language_projection/kernel" in p2
    # `mmjax generate --image` on the stage-2 workdir; a prompt without <image>: exit 2
    from PIL import Image

    from mmjax.cli import main
    from mmjax.data.digits_vqa import load_digits_vqa

    path = str(tmp_path / "digit.png")
    Image.fromarray(load_digits_vqa(32).test.raw[0]).save(path)
    assert main(["generate", "--workdir", wd2, "--prompt", "<image>", "--image", path, "--max-new-tokens", "3",
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", "--workdir", wd2, "--prompt", "a digit", "--image", path]) == 2
    assert "Image features and image tokens do not match" in capsys.readouterr().err
