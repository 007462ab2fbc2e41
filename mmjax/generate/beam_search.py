"""Beam search over the KV cache, one jit-compiled `while_loop`.

Each prompt keeps `num_beams` live beams. The prompt is prefilled once per row and its cache
repeated per beam; every step scores all `num_beams x vocab` continuations by their summed
log-probability and keeps the best `(1 + max(1, #eos ids)) x num_beams` candidates (enough that
`num_beams` of them do not end in EOS). As in Hugging Face `generate` (and fairseq), a candidate
ending in EOS finishes a hypothesis only if it ranks among the best `num_beams` candidates of
its step; it is scored `sum log p / length ** length_penalty`, length = generated tokens
including the EOS, and the row keeps its best `num_beams` finished hypotheses. The search
continues with the best `num_beams` candidates that do not end in EOS, gathering their
parents' cache rows. A row stops once it has `num_beams` finished hypotheses and its best live
beam, scored at its current length, does not beat the worst of them (Hugging Face's default
`early_stopping=False` heuristic); all stop at `max_new_tokens`, where live beams compete as if
finished. The best hypothesis per row is returned.

`extra` (the `prefill_inputs` of `mmjax.generate.generate`, e.g. BLIP's / LLaVA's images) goes
to the prompt's prefill call only, once per row; whatever the prefill stores in the cache
(BLIP's image embeddings, LLaVA's image keys/values) is repeated per beam with the rest of the
cache and gathered with its beam, so the decoding steps read their own row's image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.generate.common import TRACE_COUNT, is_eos
from mmjax.generate.processors import no_repeat_ngram_mask

NEG = -1e30  # "minus infinity" that keeps arithmetic finite


def _map_rows(cache, fn):
    """`fn(array, batch_axis)` over a cache's per-row arrays: `KVCache.map_rows` (which knows a
    layer-stacked cache's batch axis), else every array of rank >= 1 along axis 0."""
    if hasattr(cache, "map_rows"):
        return cache.map_rows(fn)
    return jax.tree_util.tree_map(lambda x: fn(x, 0) if x.ndim >= 1 else x, cache)


@functools.lru_cache(maxsize=64)
def beam_search_fn(model, config, eos: tuple[int, ...]):
    k = config.num_beams
    n_new = config.max_new_tokens
    lp = config.length_penalty
    ngram = config.no_repeat_ngram_size
    pad = config.pad_token_id
    n_cand = (1 + max(1, len(eos))) * k  # candidates per step: k of them never end in EOS

    def norm(score, length):
        return score / (length.astype(jnp.float32) ** lp)

    def run(params, tokens, mask, rng, extra=None):
        del rng
        TRACE_COUNT["beam"] += 1
        b, t = tokens.shape
        total = t + n_new
        cache = model.init_cache(b, total)
        logits, cache = model.apply({"params": params}, tokens, input_mask=mask, cache=cache,
                                    **(extra or {}))
        cache = _map_rows(cache, lambda x, axis: jnp.repeat(x, k, axis=axis))
        logits = jnp.repeat(logits[:, -1], k, axis=0)  # [b*k, V]
        vocab = logits.shape[-1]
        n_top = min(n_cand, k * vocab)
        history = jnp.repeat(jnp.zeros((b, total), jnp.int32).at[:, :t].set(tokens), k, axis=0)
        valid = jnp.repeat(jnp.zeros((b, total), bool).at[:, :t].set(mask), k, axis=0)

        state = dict(
            i=jnp.int32(0), logits=logits, cache=cache, history=history, valid=valid,
            seqs=jnp.full((b, k, n_new), pad, jnp.int32),
            scores=jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1)),
            fin_seqs=jnp.full((b, k, n_new), pad, jnp.int32),
            fin_scores=jnp.full((b, k), NEG, jnp.float32),
            fin_lens=jnp.ones((b, k), jnp.int32),
            done=jnp.zeros((b,), bool),
        )

        def step(s):
            i = s["i"]
            logits = s["logits"].astype(jnp.float32)
            # the model's own log-probs; banned n-gram completions become -inf without
            # renormalising the rest (as HF), so scores stay sums of model log-probs
            logp = jax.nn.log_softmax(logits, -1)
            if ngram:
                logp = no_repeat_ngram_mask(logp, s["history"], s["valid"], t + i, ngram)
            logp = jnp.where(jnp.isfinite(logp), logp, NEG).reshape(b, k, vocab)
            cand = (s["scores"][:, :, None] + logp).reshape(b, k * vocab)
            top_scores, top_idx = jax.lax.top_k(cand, n_top)  # [b, n_top], best first
            parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
            ends = is_eos(tok, eos)
            in_top_k = jnp.arange(n_top) < k  # only these may finish a hypothesis
            length = i + 1
            parent_seqs = jnp.take_along_axis(s["seqs"], parent[:, :, None], axis=1)
            cand_seqs = parent_seqs.at[:, :, i].set(tok)

            # finished: the old set plus candidates ending in EOS, best k by normalised score
            new_fin = jnp.where(ends & in_top_k[None, :] & (top_scores > NEG / 2),
                                norm(top_scores, jnp.full_like(tok, length)), NEG)
            new_fin = jnp.where(s["done"][:, None], NEG, new_fin)
            all_scores = jnp.concatenate([s["fin_scores"], new_fin], axis=1)
            all_seqs = jnp.concatenate([s["fin_seqs"], cand_seqs], axis=1)
            all_lens = jnp.concatenate([s["fin_lens"], jnp.full_like(tok, length)], axis=1)
            fin_scores, pick = jax.lax.top_k(all_scores, k)
            fin_seqs = jnp.take_along_axis(all_seqs, pick[:, :, None], axis=1)
            fin_lens = jnp.take_along_axis(all_lens, pick, axis=1)

            # live: best k candidates that do not end in EOS
            live_scores = jnp.where(ends, NEG, top_scores)
            scores, live_pick = jax.lax.top_k(live_scores, k)
            beam_parent = jnp.take_along_axis(parent, live_pick, axis=1)  # [b, k]
            beam_tok = jnp.take_along_axis(tok, live_pick, axis=1)
            seqs = jnp.take_along_axis(cand_seqs, live_pick[:, :, None], axis=1)

            flat_parent = (jnp.arange(b)[:, None] * k + beam_parent).reshape(-1)
            cache = _map_rows(s["cache"], lambda x, axis: jnp.take(x, flat_parent, axis=axis))
            history = s["history"][flat_parent].at[:, t + i].set(beam_tok.reshape(-1))
            valid = s["valid"][flat_parent].at[:, t + i].set(True)

            # a row is done once k hypotheses are finished and its best live beam, scored at the
            # current length, does not beat the worst of them (HF's early_stopping=False rule)
            best_live = norm(scores[:, 0], jnp.full((b,), length))
            done = s["done"] | ((fin_scores[:, -1] > NEG / 2) & (best_live <= fin_scores[:, -1]))
            logits, cache = model.apply({"params": params}, beam_tok.reshape(-1, 1), cache=cache)
            return dict(i=i + 1, logits=logits[:, -1], cache=cache, history=history, valid=valid,
                        seqs=seqs, scores=scores, fin_seqs=fin_seqs, fin_scores=fin_scores,
                        fin_lens=fin_lens, done=done)

        def cond(s):
            return (s["i"] < n_new) & ~jnp.all(s["done"])

        s = jax.lax.while_loop(cond, step, state)
        # live beams at the end compete as if finished at the current length
        live_final = jnp.where(s["done"][:, None], NEG,
                               norm(s["scores"], jnp.full((b, k), s["i"])))
        all_scores = jnp.concatenate([s["fin_scores"], live_final], axis=1)
        all_seqs = jnp.concatenate([s["fin_seqs"], s["seqs"]], axis=1)
        all_lens = jnp.concatenate([s["fin_lens"], jnp.full((b, k), s["i"], jnp.int32)], axis=1)
        best = jnp.argmax(all_scores, axis=1)
        tokens_out = jnp.take_along_axis(all_seqs, best[:, None, None], axis=1)[:, 0]
        lengths = jnp.take_along_axis(all_lens, best[:, None], axis=1)[:, 0]
        scores = jnp.take_along_axis(all_scores, best[:, None], axis=1)[:, 0]
        pos = jnp.arange(n_new)[None, :]
        tokens_out = jnp.where(pos < lengths[:, None], tokens_out, pad)
        return tokens_out, lengths, scores

    return jax.jit(run)
