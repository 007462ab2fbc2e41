"""Autoregressive generation: one jit-compiled loop over a preallocated KV cache.

    from mmjax.generate import GenerationConfig, generate
    out = generate(model, params, [[1, 5, 9], [1, 7]], GenerationConfig(max_new_tokens=32))
    out.tokens   # int32 [batch, max_new_tokens]: new tokens; pad_token_id after a row's EOS
    out.lengths  # int32 [batch]: new tokens per row, EOS included
    out.scores   # float32 [batch]: sum of the chosen tokens' log-probs under the model (before
                 # temperature / top-k / top-p / n-gram bans); beam: the normalised beam score

Prompts are left-padded to a multiple of `prompt_bucket`, so prompts of different lengths
in one bucket reuse the compiled program; the cache holds `bucket + max_new_tokens` slots.
The prompt is prefilled in one call, then a `jax.lax.while_loop` emits one token per
iteration and stops early once every row has produced an EOS. The model is any Flax module with
the `Llama` calling convention (`tokens, input_mask=, cache=` -> `(logits, cache)`) and
`init_cache(batch, max_len)`; `model.config` supplies `vocab_size`, `max_len` and `eos_ids`.

`prefill_inputs` are extra keyword inputs of the prompt's prefill call only (LLaVA's images:
`generate(llava, params, prompts, gen, prefill_inputs={"images": pixels})`, the prompts holding
the image tokens); the decoding steps call the model without them. Beam search takes them too. A model with a
`check_prefill_inputs(tokens, input_mask, **prefill_inputs)` method has it run on the concrete,
left-padded prompt before the jitted program (checks that need concrete values, such as
LLaVA's image-token count).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError, InputError
from mmjax.generate.common import TRACE_COUNT, is_eos  # shared with beam_search; re-exported
from mmjax.generate.processors import choose_next, no_repeat_ngram_mask


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode. temperature 0 = greedy; num_beams > 1 = beam search (deterministic).

    eos_token_id: None = the model config's EOS ids; an int or a sequence of ints (stored as a
      tuple); () = never stop.
    length_penalty: beam scores are sum(log p) / (generated length ** length_penalty).
    no_repeat_ngram_size: 0 = off; n > 0 bans any token completing an n-gram seen before
      (prompt included), for greedy, sampling and beam search alike.
    prompt_bucket: prompts are left-padded to a multiple of this length (fewer recompiles).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int = 0
    prompt_bucket: int = 16

    def __post_init__(self):
        eos = self.eos_token_id
        if eos is not None and not isinstance(eos, (int, np.integer)):
            # any sequence of ids -> a tuple, so the config stays hashable (it keys the jit cache)
            object.__setattr__(self, "eos_token_id", tuple(int(e) for e in eos))
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"top_k must be positive (or None), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ConfigError("beam search is deterministic: use temperature=0 with num_beams > 1")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.prompt_bucket <= 0:
            raise ConfigError(f"prompt_bucket must be positive, got {self.prompt_bucket}")

    def replace(self, **kw) -> "GenerationConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # int32 [batch, max_new_tokens]
    lengths: np.ndarray  # int32 [batch]
    scores: np.ndarray  # float32 [batch]


def generate(
    model, params: Any, prompts, config: GenerationConfig, rng: jax.Array | None = None, *,
    prefix_embeddings: Any = None, prefix_bidirectional: bool = True,
    prefill_inputs: dict[str, Any] | None = None,
) -> GenerationOutput:
    """Continue each prompt; see the module docstring. `prompts`: list of token-id lists
    (ragged), or `(tokens [B,T], mask [B,T])` already left-padded.

    prefix_embeddings: [B, N, dim] input embeddings placed before each row's prompt (a soft
      prompt, projected image features): prefilled with the prompt in one call through the
      model's `embeddings=` / `mask_ar=` inputs (the model needs an `embed_tokens` method, as
      `Llama` has). prefix_bidirectional: the prefix attends within itself both ways (prefix-LM,
      `mask_ar` zeros; PaliGemma-style) or, False, causally (BLIP-2 / LLaVA feed their image
      tokens causally). Greedy and sampling; beam search takes no prefix yet.
    prefill_inputs: extra keyword inputs of the model's prefill call (e.g. `{"images": pixels}`
      for LLaVA), not passed to the decoding steps. Greedy, sampling and beam search (each
      row's prefill is repeated per beam); not with a prefix.
    """
    tokens, mask = prepare_prompts(prompts, config, model.config.vocab_size)
    n_prefix = 0
    if prefix_embeddings is not None:
        shape = tuple(getattr(prefix_embeddings, "shape", ()))
        # the width `embeddings=` takes: OPT's token embeddings may be narrower than its stack
        dim = getattr(model.config, "embed_width", getattr(model.config, "dim", None))
        if len(shape) != 3 or shape[0] != tokens.shape[0] or (dim is not None and shape[2] != dim):
            raise InputError(f"prefix_embeddings must be [batch={tokens.shape[0]}, N, dim={dim}], "
                             f"got shape {shape}")
        if config.num_beams > 1:
            raise InputError("prefix_embeddings: beam search takes no prefix yet; use "
                             "num_beams=1 (greedy or sampling)")
        n_prefix = shape[1]
    extra = dict(prefill_inputs or {})
    if extra:
        if prefix_embeddings is not None:
            raise InputError("pass prefix_embeddings or prefill_inputs, not both")
        check = getattr(model, "check_prefill_inputs", None)
        if check is not None:
            check(tokens, mask, **extra)
    lengths = mask.sum(axis=1)
    if lengths.min() == 0:
        raise InputError(f"prompt {int(np.argmin(lengths))} is empty: give at least one token "
                         "(e.g. BOS)")
    longest = int(lengths.max())
    if n_prefix + longest + config.max_new_tokens > model.config.max_len:
        raise InputError(
            (f"prefix of {n_prefix} embeddings + " if n_prefix else "")
            + f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} exceeds the "
            f"model's max_len={model.config.max_len}"
        )
    eos = _eos_ids(config, model)
    rng = jax.random.key(0) if rng is None else rng
    if config.num_beams > 1:
        from mmjax.generate.beam_search import beam_search_fn

        fn = beam_search_fn(model, config, eos)
    else:
        fn = _decode_fn(model, config, eos, bool(prefix_bidirectional))
    args = (params, jnp.asarray(tokens), jnp.asarray(mask), rng)
    if prefix_embeddings is not None:
        args += (jnp.asarray(prefix_embeddings),)
    kwargs = {"extra": jax.tree_util.tree_map(jnp.asarray, extra)} if extra else {}
    out_tokens, out_lengths, scores = fn(*args, **kwargs)
    return GenerationOutput(np.asarray(out_tokens), np.asarray(out_lengths), np.asarray(scores))


def prepare_prompts(prompts, config: GenerationConfig, vocab_size: int):
    """(tokens int32 [B, T], mask bool [B, T]) left-padded to a multiple of prompt_bucket."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and not isinstance(prompts[0], (int,)):
        tokens, mask = (np.asarray(x) for x in prompts)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise InputError(f"prompt tokens and mask must both be [batch, seq], got "
                             f"{tokens.shape} and {mask.shape}")
        mask = mask.astype(bool)
        if mask.any() and not np.all(np.diff(mask.astype(np.int8), axis=1) >= 0):
            raise InputError("prompt mask must be left-padded (False then True in each row)")
        rows = [list(r[m]) for r, m in zip(tokens, mask)]
        width = tokens.shape[1]
    else:
        rows = [list(p) for p in prompts]
        if not rows:
            raise InputError("no prompts given")
        width = max(len(r) for r in rows)
    bucket = config.prompt_bucket
    width = max(-(-width // bucket) * bucket, bucket)
    tokens = np.full((len(rows), width), config.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        if len(r):
            arr = np.asarray(r)
            if not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"prompt {i} holds non-integer tokens ({arr.dtype})")
            bad = arr[(arr < 0) | (arr >= vocab_size)]
            if bad.size:
                raise InputError(f"prompt {i}: token id {int(bad[0])} is outside the vocabulary "
                                 f"[0, {vocab_size})")
            tokens[i, width - len(r):] = arr
            mask[i, width - len(r):] = True
    return tokens, mask


def _eos_ids(config: GenerationConfig, model) -> tuple[int, ...]:
    eos = config.eos_token_id
    if eos is None:
        eos = model.config.eos_ids
    return (int(eos),) if isinstance(eos, (int, np.integer)) else tuple(int(e) for e in eos)


@functools.lru_cache(maxsize=64)
def _decode_fn(model, config: GenerationConfig, eos: tuple[int, ...],
               prefix_bidirectional: bool = True):
    """The jitted greedy/sampling program for (model, config, eos); shapes key jit's own cache."""
    n_new = config.max_new_tokens
    ngram = config.no_repeat_ngram_size
    pad = config.pad_token_id
    pick = functools.partial(choose_next, temperature=config.temperature, top_k=config.top_k,
                             top_p=config.top_p)

    def run(params, tokens, mask, rng, prefix=None, extra=None):
        TRACE_COUNT["decode"] += 1
        b, t = tokens.shape
        total = t + n_new
        if prefix is None:  # extra: the prefill-only inputs (generate's prefill_inputs)
            cache = model.init_cache(b, total)
            logits, cache = model.apply({"params": params}, tokens, input_mask=mask, cache=cache,
                                        **(extra or {}))
        else:  # [prefix; prompt] in one prefill; the prompt (and what follows) is causal
            n = prefix.shape[1]
            cache = model.init_cache(b, n + total)
            emb = model.apply({"params": params}, tokens, method="embed_tokens")
            x = jnp.concatenate([prefix.astype(emb.dtype), emb], axis=1)
            m = jnp.concatenate([jnp.ones((b, n), bool), mask], axis=1)
            ar = jnp.concatenate([jnp.full((b, n), 0 if prefix_bidirectional else 1, jnp.int32),
                                  jnp.ones((b, t), jnp.int32)], axis=1)
            logits, cache = model.apply({"params": params}, embeddings=x, input_mask=m,
                                        mask_ar=ar, cache=cache)
        history = jnp.zeros((b, total), jnp.int32).at[:, :t].set(tokens)
        valid = jnp.zeros((b, total), bool).at[:, :t].set(mask)

        def choose(logits, rng, history, valid, filled):
            logits = logits.astype(jnp.float32)
            model_logp = jax.nn.log_softmax(logits, -1)  # scores: the model's own log-probs
            if ngram:
                logits = no_repeat_ngram_mask(logits, history, valid, filled, ngram)
            tok = pick(logits, rng)
            logp = jnp.take_along_axis(model_logp, tok[:, None], -1)[:, 0]
            return tok, logp

        rng, sub = jax.random.split(rng)
        tok, logp = choose(logits[:, -1], sub, history, valid, t)
        out = jnp.full((b, n_new), pad, jnp.int32).at[:, 0].set(tok)
        history = history.at[:, t].set(tok)
        valid = valid.at[:, t].set(True)
        done = is_eos(tok, eos)
        lengths = jnp.ones((b,), jnp.int32)
        scores = logp

        def cond(carry):
            i, _, _, _, _, done, *_ = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, tok, cache, out, rng, done, lengths, scores, history, valid = carry
            logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
            rng, sub = jax.random.split(rng)
            nxt, logp = choose(logits[:, -1], sub, history, valid, t + i)
            live = ~done
            nxt = jnp.where(live, nxt, pad)
            out = out.at[:, i].set(nxt)
            history = history.at[:, t + i].set(nxt)
            valid = valid.at[:, t + i].set(live)
            lengths = lengths + live.astype(jnp.int32)
            scores = scores + jnp.where(live, logp, 0.0)
            done = done | (live & is_eos(nxt, eos))
            return i + 1, nxt, cache, out, rng, done, lengths, scores, history, valid

        carry = (jnp.int32(1), tok, cache, out, rng, done, lengths, scores, history, valid)
        _, _, _, out, _, _, lengths, scores, _, _ = jax.lax.while_loop(cond, body, carry)
        return out, lengths, scores

    return jax.jit(run)
