"""Perplexity of a causal LM over a long token sequence, with a sliding window.

    result = perplexity(model, params, tokens, window=256, stride=128)
    result["ppl"], result["nll_sum"], result["num_tokens"]
    bits_per_byte(result["nll_sum"], num_utf8_bytes)

Strided evaluation as in Hugging Face's perplexity guide: windows of `window` tokens, each
ending `stride` tokens after the previous one and scoring only the tokens no earlier window
scored, so every token after the first is predicted exactly once, with at least
`window - stride` tokens of context once past the first window. stride = window - 1 (the
default) gives chunks that share one boundary token; a window as long as the text gives the
direct one-pass computation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import InputError


def window_plan(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """[(start, end, first_scored)]: the window's input is tokens[start:end] and it scores the
    tokens first_scored..end-1. The first window scores tokens 1..window-1; each later one ends
    `stride` tokens further and scores those `stride` new tokens with the `window - stride`
    tokens before them as extra context."""
    if window < 2:
        raise InputError(f"perplexity window must be >= 2 tokens, got {window}")
    if not 0 < stride < window:
        raise InputError(f"perplexity stride must be in [1, window - 1 = {window - 1}] so each "
                         f"scored token has context, got {stride}")
    end = min(n, window)
    plan = [(0, end, 1)]
    while end < n:
        new_end = min(n, end + stride)
        plan.append((max(0, new_end - window), new_end, end))
        end = new_end
    return plan


def perplexity(
    model, params: Any, tokens, *, window: int | None = None, stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Sum of next-token NLL (nats), number of predicted tokens, mean NLL and perplexity."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise InputError(f"perplexity expects a 1-D token sequence, got shape {tokens.shape}")
    if len(tokens) < 2:
        raise InputError("perplexity needs at least 2 tokens")
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise InputError(f"token ids must be in [0, {vocab}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    window = window or model.config.max_len
    if window > model.config.max_len:
        raise InputError(f"window={window} exceeds the model's max_len={model.config.max_len}")
    stride = stride or window - 1
    plan = window_plan(len(tokens), window, stride)
    width = max(e - s for s, e, _ in plan)

    nll_sums = _weighted_nll_fn(model)
    total, count = 0.0, 0
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        inputs = np.zeros((batch_size, width - 1), np.int32)
        targets = np.zeros((batch_size, width - 1), np.int32)
        weights = np.zeros((batch_size, width - 1), np.float32)
        for r, (s, e, first) in enumerate(chunk):
            seg = tokens[s:e]
            inputs[r, : len(seg) - 1] = seg[:-1]
            targets[r, : len(seg) - 1] = seg[1:]
            weights[r, first - s - 1: e - s - 1] = 1.0  # target index j predicts token s + j + 1
            count += e - first
        total += float(nll_sums(params, jnp.asarray(inputs), jnp.asarray(targets),
                                jnp.asarray(weights)))
    mean = total / count
    return {"nll_sum": total, "num_tokens": count, "nll_mean": mean,
            "ppl": math.exp(min(mean, 700.0)), "num_windows": len(plan)}


@functools.lru_cache(maxsize=16)
def _weighted_nll_fn(model):
    """Jitted sum of weighted next-token NLLs for `model`, kept so repeated calls (and every
    batch of one call) reuse the compiled program instead of re-tracing a fresh closure."""

    @jax.jit
    def nll_sums(params, inputs, targets, weights):
        logits = model.apply({"params": params}, inputs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights)

    return nll_sums


def bits_per_byte(nll_sum: float, num_bytes: int) -> float:
    """Tokenizer-independent: total NLL in bits divided by the text's UTF-8 bytes."""
    if num_bytes <= 0:
        raise InputError(f"num_bytes must be positive, got {num_bytes}")
    return nll_sum / math.log(2) / num_bytes
