"""Linear probe: multinomial logistic regression on frozen features, in JAX.

    probe = fit_linear_probe(train_feats, train_labels, l2=1e-3)
    acc = probe.accuracy(test_feats, test_labels)
    acc = linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels)

Features are standardised with the training split's mean and standard deviation, then
W [dim, classes] and b [classes] minimise mean cross-entropy + l2 / 2 * ||W||^2 (the bias is
not penalised) with full-batch L-BFGS (`optax.lbfgs`, zoom line search) inside one jit-compiled
`lax.while_loop` that stops when the gradient norm falls below `tol` or after `max_steps`.
The objective is convex (strictly, for l2 > 0), so the result does not depend on the start.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    weights: np.ndarray  # [dim, classes] (on standardised features)
    bias: np.ndarray  # [classes]
    mean: np.ndarray  # [dim] training feature mean
    scale: np.ndarray  # [dim] training feature std (1 where it is 0)
    steps: int  # L-BFGS iterations used
    grad_norm: float  # final gradient norm of the objective
    train_loss: float  # final objective value

    def logits(self, features: np.ndarray) -> np.ndarray:
        features = _check_features(features, self.mean.shape[0])
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(features), axis=-1)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        labels = np.asarray(labels)
        if labels.shape != (len(features),):
            raise InputError(f"labels must be [{len(features)}], got {labels.shape}")
        return float(np.mean(self.predict(features) == labels))


def _check_features(features, dim: int | None = None) -> np.ndarray:
    x = np.asarray(features, np.float32)
    if x.ndim != 2:
        raise InputError(f"features must be [n, dim], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"features have dim {x.shape[1]}, the probe was fitted on dim {dim}")
    if not np.all(np.isfinite(x)):
        raise InputError("features contain NaN or inf")
    return x


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit(x, y, l2, tol, num_classes: int, max_steps: int):
    params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}

    def objective(p):
        logits = x @ p["w"] + p["b"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
        return nll + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        p, state, i, _, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state, i + 1, value, _norm(grad)

    def keep_going(carry):
        _, _, i, _, gnorm = carry
        return (i < max_steps) & (gnorm > tol)

    init = (params, opt.init(params), jnp.int32(0), jnp.float32(jnp.inf), jnp.float32(jnp.inf))
    p, _, steps, _, _ = jax.lax.while_loop(keep_going, step, init)
    value, grad = jax.value_and_grad(objective)(p)
    return p, steps, value, _norm(grad)


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int | None = None, *,
                     l2: float = 1e-3, max_steps: int = 500, tol: float = 1e-5) -> LinearProbe:
    """Fit the probe (see the module docstring). labels: int [n] in [0, num_classes)."""
    x = _check_features(features)
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels must be integers [{len(x)}], got {y.dtype} {y.shape}")
    if len(x) == 0:
        raise InputError("no training features for the linear probe")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if num_classes < 2 or y.min() < 0 or y.max() >= num_classes:
        raise InputError(f"labels must lie in [0, num_classes={num_classes}) with num_classes >= 2, got "
                         f"[{y.min()}, {y.max()}]")
    if l2 < 0:
        raise InputError(f"l2 must be >= 0, got {l2}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    z = (x - mean) / scale
    p, steps, value, gnorm = _fit(jnp.asarray(z), jnp.asarray(y, jnp.int32), jnp.float32(l2),
                                  jnp.float32(tol), num_classes, max_steps)
    return LinearProbe(np.asarray(p["w"]), np.asarray(p["b"]), mean, scale, int(steps), float(gnorm), float(value))


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, **fit_kwargs) -> float:
    """Test accuracy of a probe fitted on the training features."""
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    probe = fit_linear_probe(train_features, train_labels, num_classes, **fit_kwargs)
    return probe.accuracy(test_features, test_labels)
