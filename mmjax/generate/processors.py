"""Logit processors and the next-token choice: temperature, top-k, top-p, no-repeat n-grams.

All functions are pure jnp and work on `logits [batch, vocab]` (float32); masked-out tokens get
`-inf`. The order when sampling follows Hugging Face: temperature, then top-k, then top-p.

    tok = choose_next(logits, rng, temperature=0.8, top_k=40, top_p=0.95)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """logits / temperature (temperature > 0; 0 means greedy and is handled by `choose_next`)."""
    return logits / jnp.asarray(temperature, logits.dtype)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row (ties with the k-th are kept too)."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose total probability reaches `p`.

    A token is kept when the probability of the tokens ranked strictly above it is below `p`,
    so the token that crosses `p` is kept and the most likely token always is.
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, NEG_INF)


def no_repeat_ngram_mask(
    logits: jax.Array, history: jax.Array, valid: jax.Array, length: jax.Array, n: int
) -> jax.Array:
    """Ban tokens that would complete an n-gram already present in `history`.

    history: int32 [batch, L] tokens so far (prompt and generated), `valid` [batch, L] marks real
    tokens (left padding False), `length` int32 [] how many slots of `history` are filled.
    The last n-1 filled tokens are the current prefix; every earlier window whose first n-1
    tokens equal it bans its n-th token.
    """
    if n <= 0:
        return logits
    b, total = history.shape
    starts = jnp.arange(total)
    if n == 1:
        banned_tok = history
        ok = valid & (starts[None, :] < length)
    else:
        prefix_pos = length - (n - 1) + jnp.arange(n - 1)  # [n-1]
        prefix = jnp.take(history, jnp.clip(prefix_pos, 0, total - 1), axis=1)  # [b, n-1]
        prefix_ok = (length >= n - 1) & jnp.all(
            jnp.take(valid, jnp.clip(prefix_pos, 0, total - 1), axis=1), axis=1)
        ok = prefix_ok[:, None] & (starts[None, :] + n - 1 < length)
        for j in range(n - 1):
            idx = jnp.clip(starts + j, 0, total - 1)
            ok = ok & (history[:, idx] == prefix[:, j:j + 1]) & valid[:, idx]
        last = jnp.clip(starts + n - 1, 0, total - 1)
        ok = ok & valid[:, last]
        banned_tok = history[:, last]
    banned = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], banned_tok].max(ok)
    return jnp.where(banned, NEG_INF, logits)


def process_logits(
    logits: jax.Array, *, temperature: float, top_k: int | None, top_p: float | None
) -> jax.Array:
    """Temperature, then top-k, then top-p (sampling only; greedy ignores them)."""
    x = apply_temperature(logits, temperature)
    if top_k:
        x = top_k_mask(x, top_k)
    if top_p is not None and top_p < 1.0:
        x = top_p_mask(x, top_p)
    return x


def choose_next(
    logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Next token per row: argmax when temperature == 0, else a sample after processing."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
