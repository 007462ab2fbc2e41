"""Shared test helpers (tests/ is on sys.path through conftest.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLM_TEXT = os.path.join(ROOT, "experiments", "llm_text.py")


def xla_flags(devices=None):
    """XLA_FLAGS for a subprocess: the test run's flags (conftest's -O0 backend, docs/testing.md)
    without its 8-device simulation, plus `devices` simulated CPU devices when given."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


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


def randomise_torch(model, scale=0.08, fixed=None):
    """Every parameter of a torch module drawn anew from the current torch seed, so a parity
    test can fail on any of them: names containing "norm" (any case: BERT's "LayerNorm") around
    1 (1 + 0.2 N(0, 1)), the rest
    N(0, scale^2) (biases included), `fixed` name -> constant (e.g. CLIP's logit_scale).
    Returns `model.eval()`."""
    import torch

    fixed = fixed or {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in fixed:
                p.fill_(fixed[name])
            elif "norm" in name.lower():
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def hf_model_cache(tmp_path_factory, build):
    """A getter `case -> (hf model, hf dir, mmjax module, params)`: `build(case, seed)` makes the
    transformers model (seed = how many were built before), which is saved with
    `save_pretrained` and converted with `mmjax.convert.from_hf`, once per case."""
    from mmjax.convert import from_hf

    cache = {}

    def get(name):
        if name not in cache:
            model = build(name, seed=len(cache))
            path = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(path)
            module, params = from_hf(path)
            cache[name] = (model, path, module, params)
        return cache[name]

    return get
