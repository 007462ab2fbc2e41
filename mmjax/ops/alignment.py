"""Preference- and RL-alignment objectives as pure float32 functions (no parameters, no model
code): DPO and its IPO / hinge variants, the pairwise reward-model loss, and the pieces of PPO
for language models (KL-penalised per-token rewards, masked whitening, GAE, the clipped policy
and value losses).

The reference is Hugging Face trl 1.16 (`DPOTrainer._compute_loss`, `RewardTrainer.compute_loss`)
and, for PPO, trl's last `PPOTrainer` (`trl/experimental/ppo/ppo_trainer.py` in the trl
repository; the trl 1.16 package ships no PPO trainer). Where these functions differ from trl,
the function's docstring says so.

Log-probabilities:
  * `token_logprobs(logits [B, T, V], targets [B, T]) -> [B, T]`: log softmax(logits)[target],
    computed as logit[target] - logsumexp(logits) in float32 (never materialises the [B, T, V]
    log-softmax). The caller aligns them: for a causal LM, `logits[:, :-1]` predict
    `tokens[:, 1:]`.
  * `sequence_logprobs(logits, targets, mask) -> [B]`: the SUM over the positions where `mask`
    is set (the completion tokens), what DPO calls log pi(y | x).

Preferences (batch of B pairs; trl concatenates [chosen; rejected] along the batch, here they
come as separate [B] arrays):
  * `dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=, loss_type=, ...)
    -> (losses [B], chosen_rewards [B], rejected_rewards [B])`. With the policy equal to the
    reference every log-ratio is 0 and the "sigmoid" loss is exactly ln 2 = 0.6931 (trl#1311:
    a loss stuck there means the policy never moved).
  * `reward_loss(r_chosen, r_rejected, margin=, center_coefficient=) -> []` and
    `reward_accuracy(r_chosen, r_rejected) -> []`.

PPO (per-token arrays [B, T] over the response tokens, `mask` True on real tokens):
  * `kl_penalized_rewards` -> rewards [B, T]; `critic_mask` -> the mask GAE and the value loss
    use (it covers the score's position);
  * `whiten(x, mask)`; `gae_advantages(rewards, values, mask, gamma, lam)` -> (advantages,
    returns); `ppo_policy_loss` -> (loss, clipfrac, approx_kl); `ppo_value_loss` -> (loss,
    clipfrac).
  trl's order: rewards -> (optionally whiten the rewards, shift_mean=False) -> GAE over the
  critic mask -> whiten the advantages over the response mask -> the losses (policy over the
  response mask, value over the critic mask), total loss = policy + vf_coef * value.

Masks are bool or 0/1 arrays; every masked mean divides by max(count, 1), so an all-padding
batch gives 0 rather than NaN (trl divides by the count itself). Metrics (rewards, clip
fractions, approx KL, accuracy) carry no gradient (`stop_gradient`), as trl computes them
detached.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.errors import InputError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
SCORE_POSITIONS = ("last", "after_last")
KL_ESTIMATORS = ("k1", "k3")

_f32 = jnp.float32


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _check_same(fn: str, **arrays: Any) -> tuple[int, ...]:
    """The common shape of `arrays` (InputError naming the odd one out)."""
    shapes = {name: _shape(a) for name, a in arrays.items()}
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if shape != first:
            raise InputError(f"{fn}: {name} has shape {shape} but {first_name} has {first}; they "
                             "must match")
    return first


def _check_rank(fn: str, shape: tuple[int, ...], rank: int, what: str) -> None:
    if len(shape) != rank:
        raise InputError(f"{fn}: expected {what} arrays, got shape {shape}")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(_f32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _check_positive(fn: str, name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not value > 0:
        raise InputError(f"{fn}: {name} must be > 0, got {value}")


# --- log-probabilities ----------------------------------------------------------------------

def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) [B, T] float32 under `logits` [B, T, V] (any float dtype): the target's
    logit minus logsumexp over the vocabulary, both in float32 (trl's `selective_log_softmax`
    computes the same thing)."""
    if len(_shape(logits)) != 3 or _shape(targets) != _shape(logits)[:2]:
        raise InputError(f"token_logprobs: logits must be [B, T, V] and targets [B, T], got "
                         f"{_shape(logits)} and {_shape(targets)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise InputError(f"token_logprobs: targets must be integer ids, got dtype {targets.dtype}")
    logits = logits.astype(_f32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t mask[b, t] * log p(targets[b, t]) -> [B] float32: the log-probability of each
    row's completion (mask [B, T] True on completion tokens; prompt and padding do not count).
    A SUM, not a mean: DPO's log pi(y | x) (trl sums too; its IPO divides by the length later,
    `dpo_loss(..., loss_type="ipo")`)."""
    logp = token_logprobs(logits, targets)
    if _shape(mask) != _shape(targets):
        raise InputError(f"sequence_logprobs: mask {_shape(mask)} must match targets "
                         f"{_shape(targets)}")
    return jnp.sum(jnp.where(mask.astype(bool), logp, 0.0), axis=-1)


# --- preferences ----------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO losses and the implicit rewards, all [B] float32.

    Inputs: sequence log-probabilities [B] (`sequence_logprobs`) of the chosen and rejected
    completions under the policy and the frozen reference. With the log-ratios
    c = policy_chosen - ref_chosen, r = policy_rejected - ref_rejected and delta = c - r:

      "sigmoid" (DPO):  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta), with
                        eps = label_smoothing (conservative DPO: eps is the probability that a
                        preference label is flipped, 0 <= eps < 0.5). trl 1.16's "sigmoid" has
                        no smoothing (its label_smoothing feeds the "robust", "exo_pair" and
                        "aot" losses only); at eps = 0, the default, the two agree. This form
                        is what trl's "sigmoid" computed before 1.0.
      "ipo":            (c / chosen_lengths - r / rejected_lengths - 1 / (2 beta))^2: trl's
                        length-averaged IPO (the log-ratios divided by the number of
                        completion tokens, clamped at 1; beta is the paper's tau). Needs
                        `chosen_lengths` and `rejected_lengths` [B].
      "hinge" (SLiC):   relu(1 - beta delta).

    Returns (losses, chosen_rewards, rejected_rewards): the mean of `losses` is trl's loss;
    the rewards are beta * c and beta * r (not length-averaged, also for IPO), what trl logs
    as rewards/chosen and rewards/rejected (their mean difference is rewards/margins; chosen >
    rejected is rewards/accuracies). The rewards carry no gradient.
    """
    fn = "dpo_loss"
    shape = _check_same(fn, policy_chosen_logps=policy_chosen_logps,
                        policy_rejected_logps=policy_rejected_logps,
                        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_rank(fn, shape, 1, "[batch] sequence log-probability")
    if loss_type not in DPO_LOSS_TYPES:
        raise InputError(f"{fn}: unknown loss_type {loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")
    _check_positive(fn, "beta", beta)
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 0.5:
        raise InputError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type != "sigmoid" and isinstance(label_smoothing, (int, float)) and label_smoothing:
        raise InputError(f"{fn}: label_smoothing applies to loss_type 'sigmoid' only, got "
                         f"{label_smoothing} with {loss_type!r}")
    chosen = policy_chosen_logps.astype(_f32) - ref_chosen_logps.astype(_f32)
    rejected = policy_rejected_logps.astype(_f32) - ref_rejected_logps.astype(_f32)
    if loss_type == "sigmoid":
        z = beta * (chosen - rejected)
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
                  - label_smoothing * jax.nn.log_sigmoid(-z))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * (chosen - rejected))
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise InputError(f"{fn}: loss_type 'ipo' averages the log-ratios over the completion "
                             "tokens: pass chosen_lengths and rejected_lengths [batch] (e.g. "
                             "mask.sum(-1) of each completion mask)")
        _check_same(fn, policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                    rejected_lengths=rejected_lengths)
        c_avg = chosen / jnp.maximum(chosen_lengths.astype(_f32), 1.0)
        r_avg = rejected / jnp.maximum(rejected_lengths.astype(_f32), 1.0)
        losses = jnp.square(c_avg - r_avg - 1.0 / (2.0 * beta))
    rewards = jax.lax.stop_gradient(beta * chosen), jax.lax.stop_gradient(beta * rejected)
    return (losses,) + rewards


def reward_loss(r_chosen: jax.Array, r_rejected: jax.Array, *, margin: jax.Array | float | None = None,
                center_coefficient: float | None = None) -> jax.Array:
    """The pairwise (Bradley-Terry) reward-model loss, a float32 scalar, as trl's RewardTrainer:
    mean(-log sigmoid(r_chosen - r_rejected - margin)) + center_coefficient *
    mean((r_chosen + r_rejected)^2).

    r_chosen, r_rejected: [B] scalar rewards of the chosen / rejected sequences (a reward
    model's `rewards`). margin: None, a float or [B] (trl: the dataset's "margin" column).
    center_coefficient: None or a float (trl's `center_rewards_coefficient`; pushes the
    rewards towards mean zero).
    """
    fn = "reward_loss"
    shape = _check_same(fn, r_chosen=r_chosen, r_rejected=r_rejected)
    _check_rank(fn, shape, 1, "[batch] reward")
    rc, rr = r_chosen.astype(_f32), r_rejected.astype(_f32)
    diff = rc - rr
    if margin is not None:
        if _shape(margin) not in ((), shape):
            raise InputError(f"{fn}: margin must be a scalar or {shape}, got {_shape(margin)}")
        diff = diff - jnp.asarray(margin, _f32)
    loss = -jnp.mean(jax.nn.log_sigmoid(diff))
    if center_coefficient is not None:
        loss = loss + center_coefficient * jnp.mean(jnp.square(rc + rr))
    return loss


def reward_accuracy(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
    """The fraction of pairs with r_chosen > r_rejected (ties count as wrong, as in trl), a
    float32 scalar without gradient."""
    shape = _check_same("reward_accuracy", r_chosen=r_chosen, r_rejected=r_rejected)
    _check_rank("reward_accuracy", shape, 1, "[batch] reward")
    return jax.lax.stop_gradient(jnp.mean((r_chosen > r_rejected).astype(_f32)))


# --- PPO --------------------------------------------------------------------------------------

def _last_real(mask: jax.Array) -> jax.Array:
    """Index [B] of each row's last True position (-1 for a row without one)."""
    t = mask.shape[-1]
    return jnp.max(jnp.where(mask.astype(bool), jnp.arange(t), -1), axis=-1)


def _score_index(mask: jax.Array, score_position: str) -> jax.Array:
    if score_position not in SCORE_POSITIONS:
        raise InputError(f"score_position {score_position!r} unknown; known: {', '.join(SCORE_POSITIONS)}")
    last = _last_real(mask)
    if score_position == "last":
        return jnp.maximum(last, 0)
    return jnp.minimum(last + 1, mask.shape[-1] - 1)


def kl_penalized_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array,
                         mask: jax.Array, kl_coef: float = 0.05, score_position: str = "last",
                         kl_estimator: str = "k1") -> jax.Array:
    """Per-token PPO rewards [B, T] float32: -kl_coef * kl_t on real response tokens, plus each
    row's reward-model score at one position.

    scores [B]: the reward model's score of each (query, response). logprobs, ref_logprobs
    [B, T]: log-probabilities of the sampled response tokens under the policy (at sampling
    time) and the frozen reference. mask [B, T]: True on real response tokens (the stop token
    included), False on padding after it.

    kl_estimator: "k1" kl_t = logprobs - ref_logprobs (trl's default); "k3" kl_t =
    (exp(ref - logp) - 1) - (ref - logp) (non-negative, lower variance; trl's other choice).

    score_position:
      "last" (default): the score goes on each row's last real token -- where the legacy trl
        PPOTrainer and OpenAI's lm-human-preferences put it (that token's action is the one
        that ended the episode).
      "after_last": the position after the last real token (the token after the EOS), or the
        last position when the row fills T -- where trl's later PPOTrainer (PPOv2, up to its
        removal; trl#3750 reports it) adds it. That position is padding, so GAE and the
        value loss must cover it: use `critic_mask(mask, "after_last")` there (trl's
        `~padding_mask_p1`), or the score is lost.
    A row without real tokens gets its score at position 0.
    """
    fn = "kl_penalized_rewards"
    shape = _check_same(fn, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _check_rank(fn, shape, 2, "[batch, seq]")
    if _shape(scores) != shape[:1]:
        raise InputError(f"{fn}: scores must be [batch]={shape[:1]}, got {_shape(scores)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise InputError(f"{fn}: unknown kl_estimator {kl_estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    log_ratio = ref_logprobs.astype(_f32) - logprobs.astype(_f32)
    kl = -log_ratio if kl_estimator == "k1" else jnp.expm1(log_ratio) - log_ratio
    rewards = jnp.where(mask.astype(bool), -kl_coef * kl, 0.0)
    at = _score_index(mask, score_position)
    return rewards.at[jnp.arange(shape[0]), at].add(scores.astype(_f32))


def critic_mask(mask: jax.Array, score_position: str = "last") -> jax.Array:
    """The [B, T] bool mask GAE (`gae_advantages`) and the value loss should use with rewards
    from `kl_penalized_rewards(..., score_position)`: `mask` itself for "last"; `mask` plus
    the position that holds the score for "after_last" (trl's `~padding_mask_p1`)."""
    mask = mask.astype(bool)
    if score_position == "last":
        return mask
    at = _score_index(mask, score_position)
    return mask | (jnp.arange(mask.shape[-1]) == at[:, None])


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, unbiased: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) with the mean and variance over the positions where `mask`
    is set, pooled over the whole batch (not per row), as trl's `masked_whiten`; float32.

    unbiased: the variance is multiplied by n / (n - 1), n = the number of masked positions
    (trl's Bessel correction; it divides by zero at n = 1, where the correction is skipped
    here). shift_mean=False adds the mean back (only the scale changes: trl whitens rewards
    so). Positions outside the mask are 0 (trl computes them and then fills them with 0).
    """
    shape = _check_same("whiten", x=x, mask=mask)
    del shape
    m = mask.astype(bool)
    x = x.astype(_f32)
    mean = _masked_mean(x, m)
    var = _masked_mean(jnp.square(x - mean), m)
    if unbiased:
        n = jnp.sum(m.astype(_f32))
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns, both [B, T] float32, by a reverse
    `lax.scan` over time:

      delta_t = r_t + gamma V_{t'} - V_t,   A_t = delta_t + gamma lam A_{t'},   R_t = A_t + V_t

    where t' is the next position with mask set (V and A are 0 past a row's last one).
    Positions without mask are skipped -- the recursion passes over them -- and get 0, so
    left padding, right padding and holes all work. For right-padded rows this is trl's
    loop, which runs over every position after zeroing the values past the critic mask
    (rewards there are 0 by construction). Pass `critic_mask(...)` as `mask`.
    """
    fn = "gae_advantages"
    shape = _check_same(fn, rewards=rewards, values=values, mask=mask)
    _check_rank(fn, shape, 2, "[batch, seq]")
    r, v, m = (jnp.swapaxes(a, 0, 1) for a in (rewards.astype(_f32), values.astype(_f32),
                                               mask.astype(bool)))

    def step(carry, inputs):
        next_value, next_adv = carry
        r_t, v_t, m_t = inputs
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
        return carry, jnp.where(m_t, adv, 0.0)

    zeros = jnp.zeros(shape[:1], _f32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r, v, m), reverse=True)
    adv = jnp.swapaxes(adv, 0, 1)
    returns = jnp.where(mask.astype(bool), adv + values.astype(_f32), 0.0)
    return adv, returns


def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                    mask: jax.Array, clip: float = 0.2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO's clipped surrogate: (loss, clipfrac, approx_kl), float32 scalars.

    ratio = exp(logprobs - old_logprobs); loss = masked mean of
    max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)); clipfrac = the masked fraction where
    the clipped term is the larger; approx_kl = 0.5 * masked mean of (logprobs -
    old_logprobs)^2. logprobs [B, T] from the current policy (with gradient), old_logprobs and
    advantages [B, T] from the rollout (whitened advantages, no gradient), mask [B, T] the
    response tokens.

    trl's approx_kl is 0.5 * the plain mean over all [B, T] positions, where padding
    contributes 0 (it fills both log-probabilities with the same constant); it equals this
    value times the fraction of real tokens.
    """
    fn = "ppo_policy_loss"
    shape = _check_same(fn, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                        mask=mask)
    del shape
    _check_positive(fn, "clip", clip)
    diff = logprobs.astype(_f32) - old_logprobs.astype(_f32)
    ratio = jnp.exp(diff)
    adv = advantages.astype(_f32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = _masked_mean(jnp.maximum(unclipped, clipped), mask)
    clipfrac = _masked_mean((clipped > unclipped).astype(_f32), mask)
    approx_kl = 0.5 * _masked_mean(jnp.square(diff), mask)
    return loss, jax.lax.stop_gradient(clipfrac), jax.lax.stop_gradient(approx_kl)


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                   clip: float = 0.2) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped value loss: (loss, clipfrac), float32 scalars.

    loss = 0.5 * masked mean of max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2);
    clipfrac = the masked fraction where the clipped error is the larger. values [B, T] from
    the current critic (with gradient), old_values and returns [B, T] from the rollout, mask
    the critic mask (`critic_mask`; trl's `~padding_mask_p1`). trl weights it by vf_coef (0.1)
    in the total loss.
    """
    fn = "ppo_value_loss"
    _check_same(fn, values=values, old_values=old_values, returns=returns, mask=mask)
    _check_positive(fn, "clip", clip)
    v, old, ret = values.astype(_f32), old_values.astype(_f32), returns.astype(_f32)
    unclipped = jnp.square(v - ret)
    clipped = jnp.square(jnp.clip(v, old - clip, old + clip) - ret)
    loss = 0.5 * _masked_mean(jnp.maximum(unclipped, clipped), mask)
    clipfrac = _masked_mean((clipped > unclipped).astype(_f32), mask)
    return loss, jax.lax.stop_gradient(clipfrac)


__all__ = ["DPO_LOSS_TYPES", "SCORE_POSITIONS", "KL_ESTIMATORS", "token_logprobs",
           "sequence_logprobs", "dpo_loss", "reward_loss", "reward_accuracy",
           "kl_penalized_rewards", "critic_mask", "whiten", "gae_advantages", "ppo_policy_loss",
           "ppo_value_loss"]
