"""The BLIP pretraining task through the real training loop: a tiny run whose three losses
decrease, the shared param tree, the injected caption noise and the CapFilt helpers."""

import json
import os

import numpy as np
import pytest

from mmjax.errors import ConfigError

from support import ROOT  # noqa: E402
BLIP_CAPFILT = os.path.join(ROOT, "experiments", "blip_capfilt.py")
TINY = ["model.vision.dim=32", "model.vision.mlp_dim=64", "model.vision.num_layers=1",
        "model.text.dim=32", "model.text.mlp_dim=64", "model.text.num_layers=1",
        "model.text.encoder_width=32", "data.batch_size=16", "optimizer.warmup_steps=2",
        "optimizer.learning_rate=3e-3", "checkpoint_every=0"]
EVAL_LIMIT = "data.eval_limit=64"  # the module run evaluates on 64 of the 559 held-out images


@pytest.fixture(scope="module")
def capfilt_run(tmp_path_factory):
    """The whole CapFilt pipeline through `mmjax train --json` at tiny sizes: phase 1 (30 steps,
    evaluated at the start too), the filter and captioner fine-tunes, the CapFilt pass and the
    retrain (2 steps each)."""
    import contextlib
    import io

    from mmjax.cli import main

    root = str(tmp_path_factory.mktemp("blip") / "capfilt")
    sets = [*TINY, EVAL_LIMIT, "noisy.log_every=1", "noisy.eval_at_start=True", "noisy.steps=30", "filter.steps=2",
            "filter.log_every=1", "captioner.steps=2", "capfilt.steps=2"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", BLIP_CAPFILT, "--workdir", root, "--json", *[f"--set={s}" for s in sets]]) == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    return root, summary


@pytest.fixture(scope="module")
def blip_run(capfilt_run):
    root, _ = capfilt_run
    record = json.load(open(os.path.join(root, "pipeline.json")))["stages"]
    return os.path.join(root, "noisy"), record["noisy"]["metrics"]


def test_capfilt_pipeline_reports_the_interface_keys(capfilt_run):
    root, out = capfilt_run
    for key in ("filter_precision", "filter_recall", "recall_at_1_noisy", "recall_at_1_capfilt"):
        assert 0.0 <= out[key] <= 1.0, (key, out[key])
    assert out["step"] == 30 + 2 + 2 + 2 and np.isfinite(out["train_loss"])
    assert out["noisy_pairs"] == round(0.3 * out["web_pairs"]) and out["clean_pairs"] > 0
    pairs = json.load(open(os.path.join(root, "capfilt_pairs.json")))
    assert len(pairs["text"]) == out["cleaned_pairs"] == len(pairs["image"])
    # the retrain read the cleaned set, the fine-tunes started from phase 1
    retrain = json.load(open(os.path.join(root, "capfilt", "experiment.json")))
    assert retrain["data"]["pairs_file"] == os.path.join(root, "capfilt_pairs.json")
    assert json.load(open(os.path.join(root, "filter", "experiment.json")))["data"]["start_from"] == \
        os.path.join(root, "noisy")


def test_blip_task_losses_decrease(blip_run):
    wd, m = blip_run
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "itc_loss" in r]
    assert len(train) >= 20
    for key in ("train_loss", "itc_loss", "lm_loss"):
        first = np.mean([r[key] for r in train[:5]])
        last = np.mean([r[key] for r in train[-5:]])
        assert last < first, (key, first, last)
    # ITM starts at ln 2 (balanced 1:2) and must not diverge
    assert np.mean([r["itm_loss"] for r in train[-5:]]) < 0.75
    for key in ("i2t_r@1", "t2i_r@1", "itm_accuracy", "caption_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert np.isfinite(m["val_loss"]) and m["val_loss"] < m["start_val_loss"]
    assert "captions of test images" in m["sample"]


def test_blip_task_shares_params_and_injects_noise(blip_run):
    import jax

    from mmjax.tasks.blip import caption_digit, load_params
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    wd, _ = blip_run
    cfg = load_experiment(BLIP_CAPFILT, TINY)
    task = build_task(cfg, wd, lambda s: None)
    params = load_params(task, wd)
    assert set(params["decoder"]["layers_0"]) == {"attn", "attn_norm"}
    rp, cp = task._split(params)
    # the decoder reads the encoder's cross-attention and FFN, its own self-attention
    assert cp["text_decoder"]["layers_0"]["cross_attn"] is rp["text_encoder"]["layers_0"]["cross_attn"]
    assert cp["text_decoder"]["layers_0"]["attn"] is params["decoder"]["layers_0"]["attn"]
    assert cp["vision"] is rp["vision"]
    # digits + photos; 15% of the training images are the clean subset, 30% of the others (web)
    # name another class, the rest the image's own
    assert task.data.num_classes == 20
    labels = np.asarray(task.data.train.labels)[task.pair_rows]
    named = np.asarray([task.data.caption_class(t) for t in task.pair_texts])
    web = ~task.pair_clean
    assert task.pair_noisy.sum() == round(0.3 * web.sum()) and not np.any(task.pair_noisy & task.pair_clean)
    np.testing.assert_array_equal(named != labels, task.pair_noisy)
    assert caption_digit("a handwritten seven") == 7
    # the CapFilt helpers: scores in [0, 1], captions decoded to words of the vocabulary
    scores = task.match_scores(params, task.data.test.images[:5], task.test_captions()[:5])
    assert scores.shape == (5,) and np.all((scores >= 0) & (scores <= 1))
    caps = task.captions(params, task.data.test.images[:3])
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    task.data.tokenizer.encode(caps, cfg.data.max_text_len)  # round-trips through the tokenizer
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: np.all(np.isfinite(x)), params))


def test_blip_task_config_errors():
    from mmjax.tasks.blip import BlipDataConfig
    from mmjax.train.experiment import load_experiment

    with pytest.raises(ConfigError, match="noise_fraction"):
        BlipDataConfig(noise_fraction=1.0)
    with pytest.raises(ConfigError, match="image_size"):
        load_experiment(BLIP_CAPFILT, ["data.image_size=32"])
    with pytest.raises(ConfigError, match="clean subset"):
        BlipDataConfig(train_on="clean")
    with pytest.raises(ConfigError, match="train_on"):
        BlipDataConfig(train_on="noisy")
    with pytest.raises(ConfigError, match="not all 0"):
        BlipDataConfig(itc_weight=0.0, itm_weight=0.0, lm_weight=0.0)
    with pytest.raises(ConfigError, match="itm_negatives"):
        BlipDataConfig(itm_negatives="easy")


def test_blip_fine_tune_starts_from_a_workdir_and_trains_on_the_clean_pairs(blip_run, tmp_path):
    """The CapFilt fine-tunes: data.start_from loads phase 1's params, train_on='clean' feeds only
    the clean subset, a zero loss weight skips that objective (filter: no LM)."""
    import jax

    from mmjax.tasks.blip import load_params
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    wd, _ = blip_run
    ft = [*TINY, f"data.start_from={wd!r}", "data.train_on='clean'", "data.lm_weight=0.0",
          "data.itm_negatives='uniform'"]
    cfg = load_experiment(BLIP_CAPFILT, ft)
    task = build_task(cfg, str(tmp_path / "x"), lambda s: None)
    start = jax.tree_util.tree_map(np.asarray, __import__("flax").linen.unbox(task.init_params(jax.random.PRNGKey(3))))
    saved = load_params(task, wd)
    jax.tree_util.tree_map(np.testing.assert_array_equal, start, jax.tree_util.tree_map(np.asarray, saved))
    assert len(task.train_pairs) == task.pair_clean.sum() > 0
    assert np.all(task.pair_clean[task.train_pairs]) and not np.any(task.pair_noisy[task.train_pairs])
    batch = jax.tree_util.tree_map(jax.numpy.asarray, next(task.train_iterator()))
    # which objectives a loss computes is its structure: traced, not run (eager BLIP is slow)
    _, _, aux = jax.eval_shape(task.loss, start, batch, jax.random.PRNGKey(0))
    assert {"itc_loss", "itm_loss"} <= set(aux) and "lm_loss" not in aux
    cap = build_task(load_experiment(BLIP_CAPFILT, [*TINY, "data.itc_weight=0.0", "data.itm_weight=0.0"]),
                     str(tmp_path / "y"), lambda s: None)
    _, _, aux = jax.eval_shape(cap.loss, start, batch, jax.random.PRNGKey(0))
    assert set(aux) == {"lm_loss", "temperature"}
    # and through the training loop (the pipeline's filter phase): ITC + ITM logged, no LM
    root = os.path.dirname(wd)
    rows = [json.loads(line) for line in open(os.path.join(root, "filter", "metrics.jsonl"))]
    assert any("itm_loss" in r for r in rows) and not any("lm_loss" in r for r in rows)
    m = json.load(open(os.path.join(root, "pipeline.json")))["stages"]["filter"]["metrics"]
    assert 0.0 <= m["itm_pair_accuracy"] <= 1.0


def test_blip_workdir_captions_as_one_blip_with_mmjax_generate(blip_run, tmp_path, capsys):
    """load_for_inference / `mmjax generate --image` on a blip task workdir: the shared tree
    rearranged into one caption Blip, whose greedy caption is the task's own; a prompt is the
    caption's prefix; beam search runs on it too."""
    from PIL import Image

    from mmjax.cli import main
    from mmjax.data.digits_vqa import load_digits_vqa
    from mmjax.tasks.blip import load_params
    from mmjax.textgen import _load_images
    from mmjax.train import load_for_inference
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    wd, _ = blip_run
    model, params, tok = load_for_inference(wd)
    assert type(model).__name__ == "Blip" and model.config.task == "caption"
    assert set(params) == {"vision", "text_decoder", "lm_transform", "lm_norm", "lm_bias"}
    raw = load_digits_vqa(32).test.raw
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(raw[i]).save(paths[-1])
    task = build_task(load_experiment(BLIP_CAPFILT, TINY), str(tmp_path / "t"), lambda s: None)
    want = task.captions(load_params(task, wd), _load_images(paths, model.config))

    def generate(*extra):
        args = ["generate", "--workdir", wd, "--image", paths[0], "--image", paths[1], "--json", *extra]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)["completions"]

    assert generate("--prompt", "") == want
    assert all(want) and {w for c in want for w in c.split()} <= set(tok.words)
    prefix = " ".join(want[0].split()[:2])  # the caption's own first words as the prefix: the same caption
    assert generate("--prompt", prefix)[0] == want[0]
    beams = generate("--prompt", "a photo of", "--num-beams", "3")
    assert len(beams) == 2 and all(b.startswith("a photo of") for b in beams)
    assert main(["generate", "--workdir", wd, "--prompt", ""]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["generate", "--workdir", wd, "--prompt", "a zebra", "--image", paths[0]]) == 2
    assert "zebra" in capsys.readouterr().err
