"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one pass.

    from mmjax.generate import GenerationConfig, speculative_generate
    out = speculative_generate(target, target_params, draft, draft_params, [[1, 5, 9], [1, 7]],
                               GenerationConfig(max_new_tokens=64), num_draft_tokens=4)
    out.tokens, out.lengths, out.scores   # as `generate` returns them
    out.acceptance_rate                   # accepted / proposed draft tokens
    # adaptive k: at most 8 a round, moved by transformers' heuristic, drafting cut when unsure
    out = speculative_generate(..., num_draft_tokens=8, draft_schedule="heuristic",
                               draft_confidence=0.4)
    out.draft_k, out.mean_draft_tokens, out.draft_calls

Each round the draft decodes k tokens one at a time over its own KV cache; the target then runs
ONE forward pass over `[last token, d_1 .. d_k]` (k + 1 tokens) over its KV cache, which gives
its distribution p_j at every proposed position.

- Greedy (temperature 0): d_j is kept while it equals the target's argmax; at the first mismatch
  the target's argmax is appended (and when all k match, the target's next token as a bonus), so
  the output is plain greedy decoding of the target, token for token (up to float rounding of a
  (k+1)-token pass vs 1-token passes deciding a near-tie).
- Sampling: d_j ~ q_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first
  rejection a token is drawn from norm(max(0, p_j - q_j)); when all k are accepted a bonus token
  is drawn from p_{k+1}. Every emitted token is then distributed as the target's own sampling
  distribution. p and q are both the *processed* distributions (temperature, then top-k, then
  top-p: `processors.process_logits`), so the output follows the target's processed sampling
  distribution, as `generate` with the same config would.

Batches: rows accept different numbers of tokens. Both caches share one write index per batch
(`nn.cache.KVCache`), so a round writes the same slots for every row and each row's rejected
slots are masked out (`valid` False) and its `lengths` (the next RoPE position) moved back to
what it kept: stale entries are never attended and positions stay those of the kept tokens. The
index moves on by the largest count kept by a live row; rows that kept fewer leave masked holes.
The cache holds `prompt + max_new_tokens + 2(k+1) + cache_slack` slots (default slack 0 for one
row, `max_new_tokens` for a batch); when the holes would run out of room, the round keeps
fewer tokens in the rows ahead (a valid choice: a prefix of accepted tokens followed by the
row's own next token is still an exact sample), so it never overflows.

The draft's cache must also end up holding exactly the kept tokens. It has processed
`[last, d_1 .. d_{k-1}]`; when all k were accepted, d_k is still missing, and the next round's
first draft call feeds it in front of the new last token (a 2-token call, the first slot masked
when nothing is pending), so every round costs k draft calls and one target call.

Adaptive k. `num_draft_tokens` is then k_max: the first round's k and its cap. The target pass
always has k_max + 1 tokens (one static shape); the k of a round is a traced scalar in the loop
carry, and the draft runs in a `lax.while_loop` of m <= k calls, so skipped draft calls cost
nothing. Draft positions past a row's m are never accepted (the verify rule treats them as not
proposed: greedy stops matching there, sampling draws the bonus token from p_{m+1} after m
accepted drafts, an exact sample as before) and their target slots are rolled back like rejected
ones; the draft's window is [pending, cur, d_1 .. d_{m-1}] and d_m is pending when all m were
kept. `draft_schedule="heuristic"` is the rule of transformers' `num_assistant_tokens_schedule=
"heuristic"` (`transformers/generation/candidate_generator.py`, 5.23: `num_assistant_tokens += 2`
when the number of matches equals the number of candidates, else `max(1, n - 1)`), here capped
at k_max. `draft_confidence` (in (0, 1)) is transformers' `assistant_confidence_threshold` rule
(`ConfidenceCriteria`: stop after a drafted token whose probability is below the threshold; here
the processed q(d), the max probability in greedy) without transformers' re-tuning of the
threshold between rounds. In a batch, k is shared: the draft calls are batched, so a round costs
as many calls as its longest row drafts whatever each row's k, and one k keeps the loop simple;
k goes up only when every live row kept all its drafts. The confidence stop is per row (a row
that stopped proposes no more; the calls go on while some live row is still sure).

Everything (prefills and the `lax.while_loop` of rounds) is one jitted program per (target,
draft, config, k, slack, schedule, threshold) and prompt shape, however k moves at run time;
`TRACE_COUNT["speculative"]` counts its traces.
Not supported: beam search, `no_repeat_ngram_size`, prefix embeddings / prefill inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.configs import closest_name
from mmjax.errors import ConfigError, InputError
from mmjax.generate.common import is_eos
from mmjax.generate.loop import GenerationConfig, GenerationOutput, prepare_prompts
from mmjax.generate.processors import process_logits

# Incremented each time the speculative program is traced (tests check it stays put).
TRACE_COUNT = {"speculative": 0}
SCHEDULES = ("constant", "heuristic")


@dataclasses.dataclass
class SpeculativeOutput(GenerationOutput):
    """`GenerationOutput` plus how the draft did: per row, the draft tokens `proposed`
    (the round's k while the row was live, fewer where the confidence stop cut drafting) and
    `accepted` (before truncation at EOS / max_new_tokens); `rounds`: draft + verify rounds run
    (one target pass each); `draft_k`: the schedule's k per round; `draft_calls`: draft passes."""

    accepted: np.ndarray = None  # int32 [batch]
    proposed: np.ndarray = None  # int32 [batch]
    rounds: int = 0
    draft_k: np.ndarray = None  # int32 [rounds]: the schedule's k in each round
    draft_calls: int = 0  # draft forward calls made in the rounds (prefill not counted)

    @property
    def mean_draft_tokens(self) -> float:
        """The schedule's k averaged over the rounds (k itself for `"constant"`)."""
        return float(np.mean(self.draft_k)) if self.draft_k is not None and len(self.draft_k) \
            else 0.0

    @property
    def acceptance_rate(self) -> float:
        total = int(np.sum(self.proposed))
        return float(np.sum(self.accepted)) / total if total else 0.0


def speculative_generate(
    target, target_params: Any, draft, draft_params: Any, prompts, config: GenerationConfig,
    rng: jax.Array | None = None, *, num_draft_tokens: int = 4, draft_schedule: str = "constant",
    draft_confidence: float | None = None, cache_slack: int | None = None,
) -> SpeculativeOutput:
    """Decode `prompts` with `target`, `draft` proposing `num_draft_tokens` (k) tokens a round.

    target / draft: modules with the `Llama` calling convention (`generate`'s contract) and the
    same vocabulary. prompts: as for `generate` (ragged lists, or left-padded (tokens, mask)).
    config: greedy or sampling (`temperature`, `top_k`, `top_p`), `max_new_tokens`, EOS, pad;
    beam search and `no_repeat_ngram_size` are refused. num_draft_tokens: k, or with an
    adaptive schedule the first round's k and its cap k_max. draft_schedule: `"constant"` or
    `"heuristic"` (k + 2 after a round whose drafts were all accepted, else k - 1; within
    [1, k_max]). draft_confidence: None, or a threshold in (0, 1): a row stops drafting after a
    token the draft gave less than this probability. cache_slack: extra cache slots for the
    masked holes of batched rows (None: 0 for one row, max_new_tokens for a batch).
    Returns a `SpeculativeOutput` (tokens / lengths / scores as `generate`, plus acceptance).
    """
    k = num_draft_tokens
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
    k = int(k)
    if draft_schedule not in SCHEDULES:
        raise ConfigError(f"unknown draft_schedule {draft_schedule!r}"
                          f"{closest_name(draft_schedule, SCHEDULES)}; use one of "
                          f"{', '.join(SCHEDULES)}")
    if draft_confidence is not None:
        if isinstance(draft_confidence, bool) or not isinstance(
                draft_confidence, (int, float, np.floating, np.integer)) \
                or not 0.0 < float(draft_confidence) < 1.0:
            raise ConfigError("draft_confidence must be None or a probability in (0, 1) "
                              f"(exclusive), got {draft_confidence!r}")
        draft_confidence = float(draft_confidence)
    if config.num_beams > 1:
        raise ConfigError("speculative decoding is greedy or sampling: use num_beams=1 "
                          f"(got num_beams={config.num_beams})")
    if config.no_repeat_ngram_size:
        raise ConfigError("speculative decoding does not support no_repeat_ngram_size "
                          f"(got {config.no_repeat_ngram_size}); use generate for it")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise InputError(f"draft and target must share one vocabulary: draft vocab_size={dv}, "
                         f"target vocab_size={tv}")
    tokens, mask = prepare_prompts(prompts, config, tv)
    lengths = mask.sum(axis=1)
    if lengths.min() == 0:
        raise InputError(f"prompt {int(np.argmin(lengths))} is empty: give at least one token "
                         "(e.g. BOS)")
    longest = int(lengths.max())
    for name, m in (("target", target), ("draft", draft)):
        # the target scores up to k tokens past the last kept one; their positions must exist
        if longest + config.max_new_tokens + k > m.config.max_len:
            raise InputError(
                f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} + "
                f"num_draft_tokens={k} exceeds the {name}'s max_len={m.config.max_len}")
    if cache_slack is None:
        cache_slack = 0 if tokens.shape[0] == 1 else config.max_new_tokens
    if cache_slack < 0:
        raise ConfigError(f"cache_slack must be >= 0, got {cache_slack}")
    eos = config.eos_token_id
    if eos is None:
        eos = target.config.eos_ids
    eos = (int(eos),) if isinstance(eos, (int, np.integer)) else tuple(int(e) for e in eos)
    rng = jax.random.key(0) if rng is None else rng
    fn = _speculative_fn(target, draft, config, eos, k, int(cache_slack), draft_schedule,
                         draft_confidence)
    out, n_out, scores, accepted, proposed, rounds, k_hist, calls = fn(
        target_params, draft_params, jnp.asarray(tokens), jnp.asarray(mask), rng)
    rounds = int(rounds)
    return SpeculativeOutput(np.asarray(out), np.asarray(n_out), np.asarray(scores),
                             accepted=np.asarray(accepted), proposed=np.asarray(proposed),
                             rounds=rounds, draft_k=np.asarray(k_hist)[:rounds],
                             draft_calls=int(calls))


def speculative_accept(p: jax.Array, q: jax.Array, drafts: jax.Array, rng: jax.Array,
                       num: jax.Array | None = None):
    """The sampling rule on one round: (accepted count n [B], emitted tokens y [B, k+1]).

    p: [B, k+1, V] target probabilities (the last row for the bonus token); q: [B, k, V] draft
    probabilities; drafts: [B, k] tokens drawn from q. d_j is accepted with probability
    min(1, p_j(d_j) / q_j(d_j)); n counts the leading accepted ones; y_j = d_j for j < n and
    y_n ~ norm(max(0, p_n - q_n)) (p_{k+1} when n = k). Rows of y past n are meaningless.
    num: None, or [B] how many of the k drafts each row really proposed (m <= k): the others are
    never accepted, and y_m ~ p_{m+1} (the bonus token after m accepted drafts).
    """
    b, k = drafts.shape
    num = jnp.full((b,), k, jnp.int32) if num is None else num
    proposed = jnp.arange(k)[None] < num[:, None]  # [B, k]
    r_acc, r_res = jax.random.split(rng)
    pd = jnp.take_along_axis(p[:, :k], drafts[..., None], -1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    u = jax.random.uniform(r_acc, (b, k))
    accept = (u * qd < pd) & proposed  # u < p/q without dividing (q(d) > 0: drawn from q)
    n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
    resid = jnp.where(proposed[..., None], jnp.maximum(p[:, :k] - q, 0.0), p[:, :k])
    resid = jnp.concatenate([resid, p[:, k:]], axis=1)
    # p == q leaves no residual mass; then the position is never rejected, but keep it finite
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p)
    z = jax.random.categorical(r_res, jnp.log(resid), axis=-1).astype(jnp.int32)  # [B, k+1]
    d_ext = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    j = jnp.arange(k + 1)
    return n, jnp.where(j[None] < n[:, None], d_ext, z)


def _window_keep(cache, keep: jax.Array, start: jax.Array | None = None):
    """AND the cache's `valid` over the window [start, start + T) with keep [B, T] (start None:
    the slots the last call wrote, [index - T, index)); returns the cache with its index moved
    back to `start`. Slots of the window past the index were never written: already invalid."""
    t = keep.shape[1]
    start = cache.index - t if start is None else start
    old = jax.lax.dynamic_slice(cache.valid, (0, start), (cache.batch, t))
    valid = jax.lax.dynamic_update_slice(cache.valid, old & keep, (0, start))
    return cache.replace(valid=valid, index=start)


@functools.lru_cache(maxsize=32)
def _speculative_fn(target, draft, config: GenerationConfig, eos: tuple[int, ...], k: int,
                    slack: int, schedule: str = "constant", threshold: float | None = None):
    n_new = config.max_new_tokens
    pad = config.pad_token_id
    greedy = config.temperature == 0.0
    f32 = jnp.float32
    vocab = target.config.vocab_size
    # a run-time number of draft calls a round (a while_loop); constant k: a fixed scan
    variable = schedule != "constant" or threshold is not None

    def processed(logits):  # [..., V] -> processed probabilities
        shape = logits.shape
        x = process_logits(logits.reshape(-1, shape[-1]).astype(f32),
                           temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
        return jax.nn.softmax(x, -1).reshape(shape)

    def pick(logits, key):  # [B, V] -> (token [B], processed probs [B, V] or None)
        if greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32), None
        probs = processed(logits)
        return jax.random.categorical(key, jnp.log(probs), -1).astype(jnp.int32), probs

    def unsure(logits, tok, probs):  # [B]: the draft gave its token less than `threshold`
        if threshold is None:
            return jnp.zeros(tok.shape, bool)
        if probs is None:  # greedy: the draft's max probability
            probs = jax.nn.softmax(logits, -1)
        return jnp.take_along_axis(probs, tok[:, None], -1)[:, 0] < threshold

    def run(tparams, dparams, tokens, mask, rng):
        TRACE_COUNT["speculative"] += 1
        b, t = tokens.shape
        size_t = t + n_new + 2 * (k + 1) + slack
        size_d = size_t + n_new  # the draft's pending slot: at most one more per round
        tcache = target.init_cache(b, size_t)
        dcache = draft.init_cache(b, size_d)
        logits, tcache = target.apply({"params": tparams}, tokens, input_mask=mask, cache=tcache)
        _, dcache = draft.apply({"params": dparams}, tokens, input_mask=mask, cache=dcache)
        last = logits[:, -1].astype(f32)
        rng, sub = jax.random.split(rng)
        tok0, _ = pick(last, sub)
        scores = jnp.take_along_axis(jax.nn.log_softmax(last, -1), tok0[:, None], -1)[:, 0]
        out = jnp.full((b, n_new), pad, jnp.int32).at[:, 0].set(tok0)
        emitted = jnp.ones((b,), jnp.int32)
        done = is_eos(tok0, eos) | (n_new <= 1)
        zeros = jnp.zeros((b,), jnp.int32)
        carry = (rng, tcache, dcache, tok0, zeros, jnp.zeros((b,), bool), out, emitted, done,
                 scores, zeros, zeros, jnp.int32(0), jnp.int32(k),
                 jnp.zeros((max(n_new, 1),), jnp.int32), jnp.int32(0))

        def cond(c):
            return ~jnp.all(c[8]) & (c[12] < n_new)

        def body(c):
            (rng, tcache, dcache, cur, pending, has_pending, out, emitted, done, scores,
             accepted, proposed, rounds, kk, k_hist, calls) = c
            live = ~done
            rng, r_draft, r_acc = jax.random.split(rng, 3)
            dkeys = jax.random.split(r_draft, k)
            # --- draft: kk <= k tokens; the first call also feeds the token left pending
            d_len0, d_index0 = dcache.lengths, dcache.index
            two = jnp.stack([pending, cur], 1)
            two_mask = jnp.stack([has_pending, jnp.ones((b,), bool)], 1)
            dlog, dcache = draft.apply({"params": dparams}, two, input_mask=two_mask, cache=dcache)
            d0, q0 = pick(dlog[:, -1].astype(f32), dkeys[0])

            def draft_step(carry, key):
                dcache, prev = carry
                lg, dcache = draft.apply({"params": dparams}, prev[:, None], cache=dcache)
                d, q = pick(lg[:, -1].astype(f32), key)
                return (dcache, d), (d, q)

            if variable:
                # draft m <= kk tokens: a row stops after a token its draft was unsure of; the
                # calls stop when every live row has stopped. drafts / q past m: never accepted
                def more(s):
                    return (s[0] < kk) & jnp.any(live & ~s[5])

                def draft_more(s):
                    i, dcache, prev, drafts, q, stop, m_row = s
                    lg, dcache = draft.apply({"params": dparams}, prev[:, None], cache=dcache)
                    lg = lg[:, -1].astype(f32)
                    d, qi = pick(lg, dkeys[i])
                    drafts = drafts.at[:, i].set(d)
                    q = None if greedy else q.at[:, i].set(qi)
                    m_row = jnp.where(stop, m_row, i + 1)
                    return (i + 1, dcache, d, drafts, q, stop | unsure(lg, d, qi), m_row)

                drafts = jnp.zeros((b, k), jnp.int32).at[:, 0].set(d0)
                q = None if greedy else jnp.zeros((b, k, vocab), f32).at[:, 0].set(q0)
                stop0 = unsure(dlog[:, -1].astype(f32), d0, q0)
                m, dcache, _, drafts, q, _, m_row = jax.lax.while_loop(
                    more, draft_more, (jnp.int32(1), dcache, d0, drafts, q, stop0,
                                       jnp.ones((b,), jnp.int32)))
            elif k > 1:
                (dcache, _), (ds, qs) = jax.lax.scan(draft_step, (dcache, d0), dkeys[1:])
                drafts = jnp.concatenate([d0[:, None], ds.T], axis=1)  # [B, k]
                q = None if greedy else jnp.concatenate([q0[:, None], qs.transpose(1, 0, 2)], 1)
                m, m_row = jnp.int32(k), jnp.full((b,), k, jnp.int32)
            else:
                drafts, q = d0[:, None], (None if greedy else q0[:, None])
                m, m_row = jnp.int32(k), jnp.full((b,), k, jnp.int32)
            # --- target: one pass over [cur, d_1 .. d_k] (always k + 1 tokens: one shape)
            t_len0 = tcache.lengths
            vin = jnp.concatenate([cur[:, None], drafts], axis=1)
            tlog, tcache = target.apply({"params": tparams}, vin, cache=tcache)
            tlog = tlog.astype(f32)  # [B, k+1, V]
            if greedy:
                best = jnp.argmax(tlog, -1).astype(jnp.int32)
                match = ((drafts == best[:, :k]) & (jnp.arange(k)[None] < m_row[:, None]))
                match = match.astype(jnp.int32)
                n = jnp.sum(jnp.cumprod(match, axis=1), axis=1)
                y = best  # accepted drafts equal the target's argmax
            else:
                n, y = speculative_accept(processed(tlog), q, drafts, r_acc,
                                          m_row if variable else None)
            # --- how many tokens each row keeps this round (c <= n + 1)
            want = n + 1
            a_star = jnp.max(jnp.where(live, want, 1))
            index0 = tcache.index - (k + 1)
            min_e = jnp.min(jnp.where(live, emitted, n_new))
            min_e_after = jnp.min(jnp.where(live, jnp.minimum(
                emitted + jnp.minimum(want, a_star), n_new), n_new))
            # room for k+1 slots next round and one slot a round for the slowest live row
            fits = index0 + a_star + k + 1 + (n_new - min_e_after - 1) <= size_t
            a_safe = size_t - (k + 1) - index0 - (n_new - min_e - 1)
            a = jnp.where(fits, a_star, jnp.clip(jnp.minimum(a_star, a_safe), 1, k + 1))
            c_keep = jnp.minimum(want, a)  # [B]
            # --- emit: y[:c_keep], cut after EOS and at max_new_tokens
            j = jnp.arange(k + 1)
            eos_y = is_eos(y, eos)
            eos_before = jnp.cumsum(eos_y.astype(jnp.int32), axis=1) - eos_y.astype(jnp.int32)
            keep = ((j[None] < c_keep[:, None]) & (emitted[:, None] + j[None] < n_new)
                    & (eos_before == 0) & live[:, None])
            idx = jnp.where(keep, emitted[:, None] + j[None], n_new)  # n_new: dropped
            out = out.at[jnp.arange(b)[:, None], idx].set(y, mode="drop")
            logp = jnp.take_along_axis(jax.nn.log_softmax(tlog, -1), y[..., None], -1)[..., 0]
            scores = scores + jnp.sum(jnp.where(keep, logp, 0.0), axis=1)
            emitted = emitted + jnp.sum(keep, axis=1, dtype=jnp.int32)
            done = done | (live & (jnp.any(keep & eos_y, axis=1) | (emitted >= n_new)))
            accepted = accepted + jnp.where(live, n, 0)
            proposed = proposed + jnp.where(live, m_row, 0)
            # --- roll both caches back to the kept tokens
            # target slots: [cur, d_1 .. d_k]; keep cur and d_1 .. d_{c-1}
            tcache = _window_keep(tcache, j[None] < c_keep[:, None])
            tcache = tcache.replace(index=tcache.index + a, lengths=t_len0 + c_keep)
            # draft slots: [pending, cur, d_1 .. d_{m-1}] (m draft calls); keep pending (if it
            # was real), cur, d_1 .. d_{c-1}; with c = m+1 (all m kept) d_m is missing: pending
            # next round. The k+1-slot window from the round's start covers the m+1 written
            # slots; those past them are unwritten (invalid) and stay so.
            dkeep = (j[None] == 0) | (j[None] <= c_keep[:, None])
            dcache = _window_keep(dcache, dkeep, d_index0)
            dcache = dcache.replace(
                index=d_index0 + jnp.minimum(a, m) + 1,
                lengths=d_len0 + has_pending.astype(jnp.int32) + jnp.minimum(c_keep, m))
            new_cur = jnp.take_along_axis(y, (c_keep - 1)[:, None], 1)[:, 0]
            has_pending = c_keep == m + 1
            pending = jnp.take(drafts, m - 1, axis=1)
            k_hist = k_hist.at[rounds].set(kk)
            if schedule == "heuristic":  # transformers' rule, capped at k
                all_kept = jnp.all(jnp.where(live, n == m_row, True))
                kk = jnp.where(all_kept, jnp.minimum(kk + 2, k), jnp.maximum(kk - 1, 1))
            return (rng, tcache, dcache, new_cur, pending, has_pending, out, emitted, done,
                    scores, accepted, proposed, rounds + 1, kk, k_hist, calls + m)

        c = jax.lax.while_loop(cond, body, carry)
        out, emitted, scores, accepted, proposed, rounds = c[6], c[7], c[9], c[10], c[11], c[12]
        return out, emitted, scores, accepted, proposed, rounds, c[14], c[15]

    return jax.jit(run)
