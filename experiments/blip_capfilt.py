"""BLIP on the real digits with 30% wrong captions, then CapFilt (filter + captioner) and a retrain.

Command (a script: CapFilt is three phases, more than one ExperimentConfig; `get_config()` below
is the phase-1 config, runnable alone with `mmjax train experiments/blip_capfilt.py`):

    .venv/bin/python experiments/blip_capfilt.py --json | tail -1
    # {"filter_precision": ..., "filter_recall": ..., "recall_at_1_noisy": ..., "recall_at_1_capfilt": ...}

Data: scikit-learn's 1,797 8x8 digit scans at 16x16 (`mmjax.data.digits`), stratified 80/20
split (1,438 train / 359 held-out images). Each training image gets one fixed template caption;
30% of them (seeded) name another digit instead (`BlipDataConfig.noise_fraction`).

Phases:
  1. noisy: BLIP (task "blip": ITC + ITM with hard negatives + LM, vision and text trunk shared)
     trained on the noisy pairs.
  2. CapFilt with that model: the filter drops a training pair when its ITM p(match) is below
     the threshold (the mean p(match) over the training pairs: the short run's ITM head is not
     calibrated at 0.5); the captioner writes one greedy caption per training image, kept when
     the filter accepts it. Cleaned set = kept web pairs + kept synthetic pairs.
  3. capfilt: the same model trained from scratch on the cleaned set (`data.pairs_file`).
Reported: `filter_precision` (dropped pairs that were noisy), `filter_recall` (noisy pairs
dropped), `recall_at_1_noisy` / `recall_at_1_capfilt`: class-level image->text R@1 (ITC) on the
held-out images against one clean caption each (t2i beside them), plus the synthetic captions'
digit accuracy and how many were kept.

Measured (2-core CPU, shared; defaults: 0.22M params, 600 steps x batch 64 per phase, seed 0),
2 min 32 s in all (each training phase ~60 s, CapFilt 3.5 s):

    filter_precision      0.331   (977 pairs dropped; base rate of noise 0.30: near chance)
    filter_recall         0.749   (of the 431 noisy pairs)
    recall_at_1_noisy     0.362   (i2t, class-level, 359 held-out images; t2i 0.446)
    recall_at_1_capfilt   0.398   (t2i 0.387)
    synthetic captions    47.6% name the right digit; 527 kept by the filter (61.9% right)
    cleaned set           988 pairs, 31.3% wrong -- no cleaner than the 30% it started from
    itm_accuracy          0.500 noisy / 0.589 capfilt; caption_accuracy 0.451 / 0.337

Reading: at this size and length the ITM head barely separates pairs (held-out ITM accuracy 0.5
after phase 1, every p(match) < 0.5, hence the mean-score threshold), so the filter is close to
chance and CapFilt does not clean the data; the +3.6 points of i2t R@1 are within what a reseed
moves and t2i drops. A working filter needs a longer phase 1 (or, as in the paper, fine-tuning
the filter on clean pairs) -- not done within this issue's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mmjax.models.bert import BertConfig
from mmjax.models.blip import BLIP_VISION_LAYOUT, BlipConfig
from mmjax.models.vit import ViTConfig
from mmjax.tasks.blip import BlipDataConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig

NO_DECAY = (r"(^|/)bias$", r"norm/scale$", r"(^|/)itc_temp$", r"(^|/)lm_bias$", r"embedding$", r"(^|/)cls$",
            r"pos_embedding")


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="blip_capfilt",
        task="blip",
        model=BlipConfig(
            vision=ViTConfig(**BLIP_VISION_LAYOUT, image_size=16, patch_size=4, dim=64, num_layers=2,
                             num_heads=4, mlp_dim=128, norm_eps=1e-5),
            # the vocabulary and special ids are filled in from the caption tokenizer
            text=BertConfig(vocab_size=64, dim=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=16,
                            type_vocab_size=0, pooler=False, causal=False, cross_attention=True,
                            encoder_width=64),
            task="retrieval", embed_dim=32, bos_token_id=1, sep_token_id=2),
        data=BlipDataConfig(dataset="digits", image_size=16, batch_size=64, max_text_len=16,
                            noise_fraction=0.3),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=50, end_lr_ratio=0.05,
                                  weight_decay=0.05, no_decay=NO_DECAY),
        steps=600,
        log_every=50,
        eval_every=0,
        checkpoint_every=0,
    )


def capfilt(task, params, threshold: float | None = None) -> dict:
    """(the cleaned pairs as a pairs_file dict, filter / captioner statistics). threshold None =
    the mean ITM p(match) over the training pairs (the short run's ITM head is not calibrated at
    0.5: it scores every pair below it)."""
    import numpy as np

    from mmjax.tasks.blip import caption_digit

    images = task.data.train.images[task.pair_rows]
    p_web = task.match_scores(params, images, task.pair_texts)
    threshold = float(p_web.mean()) if threshold is None else threshold
    drop = p_web < threshold
    noisy = task.pair_noisy
    tp = int(np.sum(drop & noisy))
    synth = task.captions(params, task.data.train.images)
    ok = [caption_digit(c) >= 0 and len(c) > 0 for c in synth]
    texts_ok = [c if k else task.pair_texts[0] for c, k in zip(synth, ok)]
    p_syn = task.match_scores(params, task.data.train.images, texts_ok)
    keep_syn = np.asarray(ok) & (p_syn >= threshold)
    labels = np.asarray(task.data.train.labels)
    syn_correct = np.asarray([caption_digit(c) == y for c, y in zip(synth, labels)])
    rows = [int(r) for r in task.pair_rows[~drop]] + [int(i) for i in np.flatnonzero(keep_syn)]
    texts = [t for t, d in zip(task.pair_texts, drop) if not d] + [synth[i] for i in np.flatnonzero(keep_syn)]
    is_noisy = [bool(n) for n in noisy[~drop]] + [bool(not syn_correct[i]) for i in np.flatnonzero(keep_syn)]
    stats = {"filter_precision": tp / max(int(drop.sum()), 1), "filter_recall": tp / max(int(noisy.sum()), 1),
             "pairs_dropped": int(drop.sum()), "noisy_pairs": int(noisy.sum()),
             "synthetic_caption_accuracy": float(syn_correct.mean()),
             "synthetic_kept": int(keep_syn.sum()),
             "synthetic_kept_accuracy": float(syn_correct[keep_syn].mean()) if keep_syn.any() else float("nan"),
             "cleaned_pairs": len(rows), "threshold": threshold, "cleaned_noise_fraction": float(np.mean(is_noisy)),
             "example_synthetic": synth[:4]}
    return {"image": rows, "text": texts, "noisy": is_noisy}, stats


def main(argv=None) -> dict:
    from mmjax.tasks.blip import load_params
    from mmjax.train import run
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="workdirs/blip_capfilt")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="config overrides (key=value)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    here = os.path.abspath(__file__)
    quiet = (lambda s: None) if args.json else print
    noisy_wd = os.path.join(args.workdir, "noisy")
    common = ["checkpoint_every=0", *args.set]
    m_noisy = run(here, workdir=noisy_wd, steps=args.steps, overrides=common)
    cfg = load_experiment(here, common)
    if args.steps:
        cfg = cfg.replace(steps=args.steps)
    task = build_task(cfg, noisy_wd, quiet)
    params = load_params(task, noisy_wd)
    t_filter = time.time()
    pairs, stats = capfilt(task, params)
    t_filter = time.time() - t_filter
    os.makedirs(args.workdir, exist_ok=True)
    pairs_path = os.path.abspath(os.path.join(args.workdir, "capfilt_pairs.json"))
    with open(pairs_path, "w") as f:
        json.dump(pairs, f)
    m_clean = run(here, workdir=os.path.join(args.workdir, "capfilt"), steps=args.steps,
                  overrides=[*common, f"data.pairs_file={pairs_path!r}", "data.noise_fraction=0.0"])
    out = {"filter_precision": stats["filter_precision"], "filter_recall": stats["filter_recall"],
           "recall_at_1_noisy": m_noisy["i2t_r@1"], "recall_at_1_capfilt": m_clean["i2t_r@1"],
           "t2i_recall_at_1_noisy": m_noisy["t2i_r@1"], "t2i_recall_at_1_capfilt": m_clean["t2i_r@1"],
           "itm_accuracy_noisy": m_noisy["itm_accuracy"], "itm_accuracy_capfilt": m_clean["itm_accuracy"],
           "caption_accuracy_noisy": m_noisy["caption_accuracy"],
           "caption_accuracy_capfilt": m_clean["caption_accuracy"],
           **{k: v for k, v in stats.items() if k not in ("filter_precision", "filter_recall")},
           "capfilt_seconds": round(t_filter, 1), "seconds": round(time.time() - t0, 1)}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
