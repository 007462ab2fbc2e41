"""LLaVA's two training stages through the real training loop (task "visual_sft") on the digits,
with the experiment files themselves at tiny sizes: stage 1 trains only the projector (the tower
and the LLM stay bit-identical to their initial values), stage 2 starts from stage 1, keeps the
tower frozen, lowers the answer loss and reports the VQA metrics beside stage 1's."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax.train import load_for_inference, run
from mmjax.train.experiment import load_experiment
from mmjax.train.task import build_task

from support import ROOT  # noqa: E402

STAGE1 = os.path.join(ROOT, "experiments", "llava_digits_stage1.py")
STAGE2 = os.path.join(ROOT, "experiments", "llava_digits.py")
TINY = ["model.vision.dim=32", "model.vision.num_layers=2", "model.vision.num_heads=2",
        "model.vision.mlp_dim=64", "model.text.dim=32", "model.text.num_layers=1",
        "model.text.num_heads=2", "model.text.num_kv_heads=1", "model.text.mlp_dim=64",
        "model.text.dtype='float32'", "data.vocab_size=400", "data.batch_size=8",
        "data.eval_per_type=4", "data.eval_batch_size=16", "log_every=2", "checkpoint_every=0",
        "optimizer.warmup_steps=1", "data.max_new_tokens=3"]


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("llava") / "stage1")
    over = TINY + ["init_from=None", "data.tokenizer=None", "optimizer.learning_rate=1e-2",
                   "eval_at_start=False"]
    metrics = run(STAGE1, workdir=wd, steps=4, overrides=over)
    return wd, over, metrics


def test_stage1_trains_only_the_projector(stage1, tmp_path):
    wd, over, metrics = stage1
    assert metrics["step"] == 4 and np.isfinite(metrics["train_loss"])
    _, params, _ = load_for_inference(wd)
    task = build_task(load_experiment(STAGE1, over), str(tmp_path), log=lambda s: None)
    params_rng = jax.random.split(jax.random.PRNGKey(0))[0]  # what create_train_state uses
    fresh = _flat(nn.meta.unbox(jax.jit(task.init_params)(params_rng)))
    trained = _flat(params)
    assert trained.keys() == fresh.keys()
    changed = {k for k in fresh if not np.array_equal(fresh[k], trained[k])}
    assert changed and all(k.startswith("projector/") for k in changed), sorted(changed)[:5]
    assert {k for k in fresh if k.startswith("projector/")} == changed  # every projector param moved


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory):
    wd1, _, _ = stage1
    wd2 = str(tmp_path_factory.mktemp("llava") / "stage2")
    m = run(STAGE2, workdir=wd2, steps=30, overrides=TINY + [
        f"init_from={wd1!r}", f"data.tokenizer={wd1!r}", "optimizer.learning_rate=3e-3",
        "eval_every=0", "data.system_prompt=''"])
    return wd2, m


def test_stage2_learns_answers_from_stage1(stage1, stage2):
    wd1, _, _ = stage1
    wd2, m = stage2
    assert m["val_loss"] < m["start_val_loss"] - 0.5, (m["start_val_loss"], m["val_loss"])
    for key in ("vqa_accuracy", "vqa_accuracy_digit", "vqa_accuracy_parity",
                "vqa_accuracy_plus_one", "vqa_accuracy_count", "stopped_fraction",
                "start_vqa_accuracy"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    # the tower stayed frozen in stage 2 (stage 1's values), the LLM and projector trained
    p1, p2 = _flat(load_for_inference(wd1)[1]), _flat(load_for_inference(wd2)[1])
    for k in p1:
        same = np.array_equal(p1[k], p2[k])
        assert same == k.startswith("vision/"), k
    assert "->" in m["sample"] and "want" in m["sample"]


def test_cli_generate_answers_about_an_image_file(stage2, tmp_path, capsys):
    """`mmjax generate --image`: the prompt becomes the user turn of the workdir's template, the
    answer stops at its end of turn; a prompt whose <image>s do not match the images: exit 2."""
    from PIL import Image

    from mmjax.cli import main
    from mmjax.data.digits_vqa import load_digits_vqa

    wd2, _ = stage2
    path = str(tmp_path / "digit.png")
    Image.fromarray(load_digits_vqa(32).test.raw[0]).save(path)
    assert main(["generate", "--workdir", wd2, "--prompt", "<image>\nIs the digit even or odd?",
                 "--image", path, "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(out["completions"][0], str) and "USER" not in out["completions"][0]
    assert main(["generate", "--workdir", wd2, "--prompt", "Is it even?", "--image", path]) == 2
    assert "Image features and image tokens do not match" in capsys.readouterr().err
