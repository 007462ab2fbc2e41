"""Shared test helpers (tests/ is on sys.path through conftest.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLM_TEXT = os.path.join(ROOT, "experiments", "llm_text.py")


def tiny_overrides(corpus, **extra):
    items = {
        "data.corpus": corpus, "data.vocab_size": 512, "data.seq_len": 32, "data.batch_size": 8,
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 64, "model.max_len": 64, "model.dtype": "float32",
        "optimizer.warmup_steps": 2, "log_every": 1, "eval_every": 0, "checkpoint_every": 0,
        "sample.max_new_tokens": 8, "max_eval_batches": 4,
    }
    items.update(extra)
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in items.items()]
