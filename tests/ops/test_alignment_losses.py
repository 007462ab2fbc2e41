"""mmjax.ops.alignment against trl on the same random inputs.

DPO and the reward-model loss run trl 1.16's own code: `DPOTrainer._compute_loss` and
`RewardTrainer.compute_loss`, called on a minimal stand-in for the trainer (the attributes
those methods read) and a stand-in model returning the per-token log-probabilities / rewards;
token log-probabilities against trl's `selective_log_softmax`. The trl 1.16 package ships no
PPO trainer, so the PPO pieces are checked against `_trl_ppo_rollout` below, a step-by-step
torch rendering of the rollout math of trl's last PPOTrainer (trl repository,
trl/experimental/ppo/ppo_trainer.py: padding masks, INVALID_LOGPROB fill, score placement,
masked_whiten with its Bessel correction, the GAE loop over every position, the clipped
losses), written for this test.
"""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.ops import alignment as al

torch = pytest.importorskip("torch")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

TOL = 1e-6


def _stand_in(**attrs):
    accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    return types.SimpleNamespace(model=types.SimpleNamespace(training=False), accelerator=accelerator,
                                 _metrics=metrics, _total_train_tokens=0, _tp_size=1, **attrs)


def _trl_dpo_pair(pc, pr, rc, rr, len_c, len_r, beta, loss_type, t=8):
    """trl's DPO loss and logged rewards for one (chosen, rejected) pair of sequence log-probs."""
    mask = torch.zeros(2, t + 1, dtype=torch.long)  # completion mask: the last `len` tokens
    mask[0, t + 1 - len_c:] = 1
    mask[1, t + 1 - len_r:] = 1
    shifted = mask[:, 1:].double()
    seq = torch.tensor([pc, pr], dtype=torch.float64)
    per_token = shifted * (seq / shifted.sum(1))[:, None]  # sums to the sequence log-prob
    zeros = torch.zeros(2, t)
    out = types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                is_top1=zeros.bool())
    trainer = _stand_in(aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
                        beta=beta, use_weighting=False, label_smoothing=0.0)
    inputs = {"input_ids": torch.zeros(2, t + 1, dtype=torch.long),
              "attention_mask": torch.ones(2, t + 1, dtype=torch.long), "completion_mask": mask,
              "ref_chosen_logps": torch.tensor([rc], dtype=torch.float64),
              "ref_rejected_logps": torch.tensor([rr], dtype=torch.float64)}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, False)
    m = trainer._metrics["eval"]
    return float(loss), m["rewards/chosen"][0], m["rewards/rejected"][0]


def _logps(seed, b=4):
    r = np.random.default_rng(seed)
    return [r.normal(-30.0, 6.0, size=b).astype(np.float32) for _ in range(4)]


def test_token_and_sequence_logprobs_match_trl():
    r = np.random.default_rng(0)
    logits = (r.normal(size=(3, 5, 11)) * 8 + 500).astype(np.float32)  # large offset: stability
    targets = r.integers(0, 11, size=(3, 5))
    mask = r.random((3, 5)) < 0.6
    ref = trl_utils.selective_log_softmax(torch.from_numpy(logits).double(), torch.from_numpy(targets)).numpy()
    ours = np.asarray(al.token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # |logp| up to ~60: float32 relative 1e-6
    seq = np.asarray(al.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    np.testing.assert_allclose(seq, (ref * mask).sum(-1), atol=2e-4)
    # bf16 logits are upcast before the softmax
    bf = al.token_logprobs(jnp.asarray(logits - 500, jnp.bfloat16), jnp.asarray(targets))
    assert bf.dtype == jnp.float32


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(loss_type):
    pc, pr, rc, rr = _logps(1)
    lens_c, lens_r = np.array([3, 8, 5, 1]), np.array([7, 2, 5, 4])
    beta = 0.1 if loss_type != "ipo" else 0.5
    losses, rew_c, rew_r = al.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type,
                                       chosen_lengths=jnp.asarray(lens_c), rejected_lengths=jnp.asarray(lens_r))
    for i in range(len(pc)):
        loss, ref_c, ref_r = _trl_dpo_pair(float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i]),
                                           int(lens_c[i]), int(lens_r[i]), beta, loss_type)
        assert abs(float(losses[i]) - loss) <= TOL * max(1.0, abs(loss)), (i, float(losses[i]), loss)
        assert abs(float(rew_c[i]) - ref_c) <= TOL and abs(float(rew_r[i]) - ref_r) <= TOL


def test_dpo_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = _logps(2)
    eps, beta = 0.1, 0.2
    losses, _, _ = al.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    z = beta * ((pc.astype(np.float64) - rc) - (pr - rr))
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(losses), -(1 - eps) * log_sig(z) - eps * log_sig(-z), rtol=TOL, atol=TOL)


def test_dpo_loss_at_the_reference_is_ln2():
    pc, pr, _, _ = _logps(3)
    losses, rc, rr = al.dpo_loss(*map(jnp.asarray, (pc, pr, pc, pr)))
    assert np.all(np.asarray(losses) == np.float32(math.log(2.0)))
    assert np.all(np.asarray(rc) == 0) and np.all(np.asarray(rr) == 0)


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl(with_margin):
    r = np.random.default_rng(4)
    rc, rr = (r.normal(size=6).astype(np.float32) * 2 for _ in range(2))
    margin = r.random(6).astype(np.float32) if with_margin else None
    coef = 0.01 if with_margin else None
    logits = torch.from_numpy(np.concatenate([rc, rr])[:, None]).double()
    trainer = _stand_in(args=types.SimpleNamespace(center_rewards_coefficient=coef))
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = torch.from_numpy(margin).double()
    ref = float(trl_reward.RewardTrainer.compute_loss(trainer, lambda **kw: types.SimpleNamespace(logits=logits), inputs))
    ours = al.reward_loss(jnp.asarray(rc), jnp.asarray(rr), margin=None if margin is None else jnp.asarray(margin),
                          center_coefficient=coef)
    assert ours.shape == () and abs(float(ours) - ref) <= TOL
    acc = float(al.reward_accuracy(jnp.asarray(rc), jnp.asarray(rr)))
    assert abs(acc - trainer._metrics["eval"]["accuracy"][0]) <= TOL


# --- PPO ------------------------------------------------------------------------------------

INVALID_LOGPROB = 1.0


def _masked_mean_t(x, m):
    return (x * m).sum() / m.sum()


def _whiten_t(x, m, shift_mean=True):
    mean = _masked_mean_t(x, m)
    var = _masked_mean_t((x - mean) ** 2, m) * (m.sum() / (m.sum() - 1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def _trl_ppo_rollout(scores, logprobs, ref_logprobs, values, seq_lengths, kl_coef, gamma, lam,
                     after_eos, whiten_rewards=False):
    """trl PPOTrainer's rollout math in torch (see the module docstring); seq_lengths = index of
    each row's last real response token."""
    b, t = logprobs.shape
    idx = torch.arange(t).repeat(b, 1)
    pad = idx > seq_lengths[:, None]
    pad_p1 = idx > (seq_lengths + 1)[:, None]
    lp = logprobs.masked_fill(pad, INVALID_LOGPROB)
    ref = ref_logprobs.masked_fill(pad, INVALID_LOGPROB)
    critic_pad = pad_p1 if after_eos else pad
    values = values.masked_fill(critic_pad, 0)
    rewards = -kl_coef * (lp - ref)
    if after_eos:
        end = torch.where(seq_lengths + 1 < t, seq_lengths + 1, seq_lengths)
    else:  # the legacy placement: the last real token
        end = seq_lengths
    rewards[torch.arange(b), end] += scores
    if whiten_rewards:
        rewards = _whiten_t(rewards, ~critic_pad, shift_mean=False).masked_fill(critic_pad, 0)
    last, advs = 0.0, []
    for i in reversed(range(t)):
        next_values = values[:, i + 1] if i < t - 1 else 0.0
        last = rewards[:, i] + gamma * next_values - values[:, i] + gamma * lam * last
        advs.append(last)
    advantages = torch.stack(advs[::-1], 1)
    returns = advantages + values
    whitened = _whiten_t(advantages, ~pad).masked_fill(pad, 0)
    return dict(rewards=rewards, advantages=advantages, returns=returns, whitened=whitened,
                pad=pad, critic_pad=critic_pad, values=values, logprobs=lp)


def _rollout(seed, b=4, t=7):
    r = np.random.default_rng(seed)
    seq_lengths = np.array([2, t - 1, 0, 4])[:b]  # a full row (no padding) and a one-token row
    mask = np.arange(t)[None] <= seq_lengths[:, None]
    f = lambda *s: r.normal(size=s).astype(np.float64)  # noqa: E731
    return dict(scores=f(b), logprobs=-np.abs(f(b, t)) - 1, ref_logprobs=-np.abs(f(b, t)) - 1,
                values=f(b, t), seq_lengths=seq_lengths, mask=mask, rng=r)


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _j(x):
    return jnp.asarray(np.asarray(x), jnp.float32) if np.asarray(x).dtype != bool else jnp.asarray(x)


@pytest.mark.parametrize("position", ["last", "after_last"])
def test_ppo_rewards_gae_whitening_match_trl(position):
    d = _rollout(5)
    kl_coef, gamma, lam = 0.05, 0.97, 0.95
    ref = _trl_ppo_rollout(_t(d["scores"]), _t(d["logprobs"]), _t(d["ref_logprobs"]), _t(d["values"]),
                           _t(d["seq_lengths"]), kl_coef, gamma, lam, after_eos=position == "after_last")
    mask = _j(d["mask"])
    rewards = al.kl_penalized_rewards(_j(d["scores"]), _j(d["logprobs"]), _j(d["ref_logprobs"]), mask,
                                      kl_coef, score_position=position)
    np.testing.assert_allclose(np.asarray(rewards), ref["rewards"].numpy(), atol=TOL)
    cmask = al.critic_mask(mask, position)
    np.testing.assert_array_equal(np.asarray(cmask), ~ref["critic_pad"].numpy())
    adv, ret = al.gae_advantages(rewards, _j(d["values"]), cmask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(np.asarray(adv), ref["advantages"].numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(ret), ref["returns"].numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(al.whiten(adv, mask)), ref["whitened"].numpy(), atol=5e-6)


def test_whiten_rewards_shift_mean_false_and_k3_match_trl():
    d = _rollout(6)
    ref = _trl_ppo_rollout(_t(d["scores"]), _t(d["logprobs"]), _t(d["ref_logprobs"]), _t(d["values"]),
                           _t(d["seq_lengths"]), 0.1, 1.0, 0.95, after_eos=True, whiten_rewards=True)
    mask = _j(d["mask"])
    rewards = al.kl_penalized_rewards(_j(d["scores"]), _j(d["logprobs"]), _j(d["ref_logprobs"]), mask, 0.1,
                                      score_position="after_last")
    white = al.whiten(rewards, al.critic_mask(mask, "after_last"), shift_mean=False)
    np.testing.assert_allclose(np.asarray(white), ref["rewards"].numpy(), atol=5e-6)
    # k3: (exp(ref - logp) - 1) - (ref - logp) on real tokens
    k3 = al.kl_penalized_rewards(jnp.zeros(4), _j(d["logprobs"]), _j(d["ref_logprobs"]), mask, 0.1,
                                 kl_estimator="k3")
    lr = d["ref_logprobs"] - d["logprobs"]
    np.testing.assert_allclose(np.asarray(k3), np.where(d["mask"], -0.1 * (np.expm1(lr) - lr), 0), atol=TOL)


def test_ppo_losses_match_trl():
    d = _rollout(7)
    r = d["rng"]
    ref = _trl_ppo_rollout(_t(d["scores"]), _t(d["logprobs"]), _t(d["ref_logprobs"]), _t(d["values"]),
                           _t(d["seq_lengths"]), 0.05, 1.0, 0.95, after_eos=True)
    pad, cpad = ref["pad"], ref["critic_pad"]
    new_lp = _t(d["logprobs"] + r.normal(scale=0.3, size=d["logprobs"].shape)).masked_fill(pad, INVALID_LOGPROB)
    vpred = _t(d["values"] + r.normal(scale=0.4, size=d["values"].shape)).masked_fill(cpad, 0)
    # trl's minibatch losses
    diff = new_lp - ref["logprobs"]
    ratio = torch.exp(diff)
    pg1, pg2 = -ref["whitened"] * ratio, -ref["whitened"] * torch.clamp(ratio, 0.8, 1.2)
    pg_loss = _masked_mean_t(torch.max(pg1, pg2), ~pad)
    pg_clipfrac = _masked_mean_t((pg2 > pg1).double(), ~pad)
    approx_kl = 0.5 * (diff ** 2).mean()
    vclip = torch.clamp(vpred, ref["values"] - 0.2, ref["values"] + 0.2)
    vf1, vf2 = (vpred - ref["returns"]) ** 2, (vclip - ref["returns"]) ** 2
    vf_loss = 0.5 * _masked_mean_t(torch.max(vf1, vf2), ~cpad)
    vf_clipfrac = _masked_mean_t((vf2 > vf1).double(), ~cpad)

    mask, cmask = _j(~pad.numpy()), _j(~cpad.numpy())
    loss, clipfrac, kl = al.ppo_policy_loss(_j(new_lp), _j(ref["logprobs"]), _j(ref["whitened"]), mask, clip=0.2)
    assert abs(float(loss) - float(pg_loss)) <= TOL and abs(float(clipfrac) - float(pg_clipfrac)) <= TOL
    frac_real = float((~pad).double().mean())
    assert abs(float(kl) * frac_real - float(approx_kl)) <= TOL  # trl: plain mean, padding adds 0
    vloss, vclipfrac = al.ppo_value_loss(_j(vpred), _j(ref["values"]), _j(ref["returns"]), cmask, clip=0.2)
    assert abs(float(vloss) - float(vf_loss)) <= TOL and abs(float(vclipfrac) - float(vf_clipfrac)) <= TOL
    assert 0 < float(clipfrac) < 1 and 0 < float(vclipfrac) < 1  # both branches exercised


def test_gae_skips_masked_positions_left_padding_equals_right_padding():
    r = np.random.default_rng(8)
    rew, val = r.normal(size=(1, 5)).astype(np.float32), r.normal(size=(1, 5)).astype(np.float32)
    right = np.array([[True, True, True, False, False]])
    adv_r, ret_r = al.gae_advantages(jnp.asarray(rew), jnp.asarray(val), jnp.asarray(right), 0.9, 0.8)
    left = np.roll(right, 2, axis=1)
    adv_l, ret_l = al.gae_advantages(jnp.asarray(np.roll(rew, 2, 1)), jnp.asarray(np.roll(val, 2, 1)),
                                     jnp.asarray(left), 0.9, 0.8)
    np.testing.assert_allclose(np.roll(np.asarray(adv_l), -2, 1), np.asarray(adv_r), atol=1e-6)
    np.testing.assert_allclose(np.roll(np.asarray(ret_l), -2, 1), np.asarray(ret_r), atol=1e-6)
    assert np.all(np.asarray(adv_r)[~right] == 0)


def test_gradients_are_finite():
    pc, pr, rc, rr = map(jnp.asarray, _logps(9))
    pc = pc.at[0].set(1e4)  # a saturated pair
    for loss_type in al.DPO_LOSS_TYPES:
        g = jax.grad(lambda a, b: al.dpo_loss(a, b, rc, rr, loss_type=loss_type,
                                              chosen_lengths=jnp.full(4, 3), rejected_lengths=jnp.full(4, 5)
                                              )[0].mean(), argnums=(0, 1))(pc, pr)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in g), loss_type
    g = jax.grad(lambda a: al.reward_loss(a, rr, margin=0.5, center_coefficient=0.01))(pc)
    assert bool(jnp.all(jnp.isfinite(g)))
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7)) * 50, jnp.float32)
    g = jax.grad(lambda x: al.sequence_logprobs(x, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool)).sum())(logits)
    assert bool(jnp.all(jnp.isfinite(g)))
    d = _rollout(10)
    mask = _j(d["mask"])
    g = jax.grad(lambda lp, v: al.ppo_policy_loss(lp, _j(d["logprobs"]), _j(d["values"]), mask)[0]
                 + al.ppo_value_loss(v, _j(d["values"]), _j(d["values"]) + 1, mask)[0], argnums=(0, 1))(
        _j(d["logprobs"]) + 0.1, _j(d["values"]))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
    assert bool(jnp.all(g[0][~d["mask"]] == 0))  # padding gets no gradient


def test_bad_inputs_raise_clear_errors():
    pc, pr, rc, rr = map(jnp.asarray, _logps(11))
    with pytest.raises(ValueError, match="unknown loss_type 'kto'.*sigmoid, ipo, hinge"):
        al.dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        al.dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(InputError, match="ref_rejected_logps has shape"):
        al.dpo_loss(pc, pr, rc, rr[:2])
    with pytest.raises(InputError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        al.dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(InputError, match=r"label_smoothing must be in \[0, 0.5\)"):
        al.dpo_loss(pc, pr, rc, rr, label_smoothing=0.7)
    with pytest.raises(InputError, match="beta must be > 0"):
        al.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(InputError, match="margin must be"):
        al.reward_loss(pc, pr, margin=jnp.ones(3))
    with pytest.raises(InputError, match="score_position 'eos' unknown; known: last, after_last"):
        al.kl_penalized_rewards(jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool),
                                0.05, score_position="eos")
    with pytest.raises(InputError, match=r"scores must be \[batch\]"):
        al.kl_penalized_rewards(jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool), 0.05)
    with pytest.raises(InputError, match="targets must be integer"):
        al.token_logprobs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)))
    with pytest.raises(InputError, match="mask has shape"):
        al.gae_advantages(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 4), bool))
