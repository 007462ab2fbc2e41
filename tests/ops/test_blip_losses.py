"""BLIP's objectives (mmjax.ops.blip_losses) against numpy references on small inputs, and the
hard-negative sampler's law (never the positive, high similarity preferred)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.ops import blip_losses as bl


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _feats(seed, b=5, d=8, q=0):
    r = np.random.default_rng(seed)
    return [_unit(r.normal(size=(n, d))).astype(np.float32) for n in (b, b, q, q)]


def test_itc_loss_matches_numpy():
    img, txt, _, _ = _feats(0)
    t = 0.07
    s = img.astype(np.float64) @ txt.T / t
    want = -(np.trace(_log_softmax(s)) + np.trace(_log_softmax(s.T))) / (2 * len(img))
    np.testing.assert_allclose(float(bl.itc_loss(img, txt, t)), want, rtol=1e-5)


def test_itc_queue_loss_hard_and_soft_targets():
    img, txt, iq, tq = _feats(1, b=4, q=6)
    t, alpha = 0.1, 0.4
    all_t, all_i = np.concatenate([txt, tq]), np.concatenate([img, iq])
    li2t, lt2i = img @ all_t.T / t, txt @ all_i.T / t
    hard = np.eye(4, 10)
    ce = lambda lg, tg: -np.mean(np.sum(tg * _log_softmax(lg), -1))  # noqa: E731
    want = 0.5 * (ce(li2t, hard) + ce(lt2i, hard))
    np.testing.assert_allclose(float(bl.itc_queue_loss(img, txt, iq, tq, t)), want, rtol=1e-5)
    # momentum distillation: soft targets from (here, different) momentum features
    mi, mt, _, _ = _feats(2, b=4)
    sm = lambda x: np.exp(_log_softmax(x))  # noqa: E731
    ti2t = alpha * sm(mi @ np.concatenate([mt, tq]).T / t) + (1 - alpha) * hard
    tt2i = alpha * sm(mt @ np.concatenate([mi, iq]).T / t) + (1 - alpha) * hard
    got_t = bl.momentum_targets(mi, mt, iq, tq, t, alpha)
    np.testing.assert_allclose(np.asarray(got_t[0]), ti2t, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_t[1]), tt2i, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(bl.itc_queue_loss(img, txt, iq, tq, t, targets=got_t)),
                               0.5 * (ce(li2t, ti2t) + ce(lt2i, tt2i)), rtol=1e-5)
    # an empty queue is the plain ITC loss
    np.testing.assert_allclose(float(bl.itc_queue_loss(img, txt, iq[:0], tq[:0], t)),
                               float(bl.itc_loss(img, txt, t)), rtol=1e-5)
    with pytest.raises(InputError, match="queues"):
        bl.itc_queue_loss(img, txt, iq[:, :3], tq, t)


def test_momentum_update_and_queue_push():
    ema = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2,))}}
    online = {"a": jnp.zeros(3), "b": {"c": jnp.full((2,), 10.0)}}
    out = bl.momentum_update(ema, online, 0.9)
    np.testing.assert_allclose(out["a"], 0.9)
    np.testing.assert_allclose(out["b"]["c"], 1.0)
    queue = jnp.zeros((5, 2))
    q, ptr = bl.queue_push(queue, jnp.ones((3, 2)), 0)
    q, ptr = bl.queue_push(q, 2 * jnp.ones((3, 2)), ptr)  # wraps: rows 3, 4, 0
    np.testing.assert_allclose(np.asarray(q)[:, 0], [2, 1, 1, 2, 2])
    assert int(ptr) == 1
    with pytest.raises(InputError, match="do not fit"):
        bl.queue_push(queue, jnp.ones((6, 2)), 0)


def test_itm_loss_matches_numpy():
    r = np.random.default_rng(3)
    logits = r.normal(size=(7, 2)).astype(np.float32)
    labels = np.array([1, 1, 0, 0, 1, 0, 0])
    want = -np.mean(_log_softmax(logits.astype(np.float64))[np.arange(7), labels])
    np.testing.assert_allclose(float(bl.itm_loss(logits, labels)), want, rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_lm_loss_matches_numpy_and_ignores_padding(eps):
    r = np.random.default_rng(4)
    b, t, v = 3, 6, 11
    logits = r.normal(size=(b, t, v)).astype(np.float32)
    tokens = r.integers(0, v, size=(b, t))
    mask = np.ones((b, t), bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    lp = _log_softmax(logits[:, :-1].astype(np.float64))
    terms = []
    for i in range(b):
        for j in range(t - 1):
            if mask[i, j + 1]:
                target = np.full(v, eps / v)
                target[tokens[i, j + 1]] += 1 - eps
                terms.append(-np.sum(target * lp[i, j]))
    got = bl.lm_loss(logits, tokens, mask, label_smoothing=eps)
    np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)
    # padded positions do not matter: change their tokens and logits
    tokens2, logits2 = tokens.copy(), logits.copy()
    tokens2[~mask] = 0
    logits2[1, 4:] = 100.0
    np.testing.assert_allclose(float(bl.lm_loss(logits2, tokens2, mask, eps)), float(got), rtol=1e-6)
    total, count = bl.lm_loss(logits, tokens, mask, eps, return_sums=True)
    assert int(count) == len(terms)


def test_hard_negatives_never_positive_and_prefer_similar():
    b = 6
    # image i is most similar to text (i + 1) % b, then (i + 2) % b, ... ; the positive highest
    sim = np.zeros((b, b), np.float32)
    for i in range(b):
        for k in range(b):
            sim[i, (i + k) % b] = 1.0 if k == 0 else 0.5 - 0.1 * k
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    neg_t, neg_i = jax.vmap(lambda k: bl.sample_hard_negatives(k, jnp.asarray(sim), 0.1))(keys)
    neg_t, neg_i = np.asarray(neg_t), np.asarray(neg_i)  # [draws, b]
    assert not np.any(neg_t == np.arange(b)) and not np.any(neg_i == np.arange(b))
    # the law: softmax(sim / 0.1) over the off-diagonal candidates
    for i in range(b):
        logits = sim[i] / 0.1
        p = np.exp(logits - logits.max())
        p[i] = 0
        p /= p.sum()
        freq = np.bincount(neg_t[:, i], minlength=b) / len(keys)
        np.testing.assert_allclose(freq, p, atol=0.04)
        assert np.argmax(freq) == (i + 1) % b
    # texts draw images by the columns: text j's most similar non-positive image is (j - 1) % b
    for j in range(b):
        assert np.argmax(np.bincount(neg_i[:, j], minlength=b)) == (j - 1) % b
    # excluded pairs are never drawn; an all-excluded row falls back to any other item
    exclude = np.zeros((b, b), bool)
    exclude[0, 1] = exclude[0, 2] = True
    exclude[3, :] = True
    neg_t, _ = jax.vmap(lambda k: bl.sample_hard_negatives(k, jnp.asarray(sim), 0.1, jnp.asarray(exclude)))(keys[:300])
    neg_t = np.asarray(neg_t)
    assert not np.isin(neg_t[:, 0], [0, 1, 2]).any()
    assert not np.any(neg_t[:, 3] == 3) and len(np.unique(neg_t[:, 3])) > 1
    with pytest.raises(InputError, match=r"\[B, B\]"):
        bl.sample_hard_negatives(keys[0], jnp.zeros((2, 3)))
