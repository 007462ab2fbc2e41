"""Scaling-law fit: exact recovery on an exact power law, noise tolerance, clear errors."""

import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.eval.scaling import fit_power_law


def test_recovers_an_exact_power_law():
    x = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    loss = (8.8e13 / x) ** 0.076  # Kaplan et al.'s L(N) constants
    fit = fit_power_law(x, loss)
    assert fit.alpha == pytest.approx(0.076, rel=1e-9)
    assert fit.c == pytest.approx(8.8e13, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(1e9) == pytest.approx((8.8e13 / 1e9) ** 0.076, rel=1e-9)


def test_noisy_points_give_a_close_fit_and_r2_below_one():
    rng = np.random.default_rng(0)
    x = np.logspace(4, 8, 20)
    loss = (1e10 / x) ** 0.3 * np.exp(rng.normal(0, 0.01, x.shape))
    fit = fit_power_law(x, loss)
    assert fit.alpha == pytest.approx(0.3, abs=0.01)
    assert 0.95 < fit.r2 < 1.0


@pytest.mark.parametrize("x, y, needle", [
    ([1.0], [2.0], "at least 2"),
    ([1.0, 1.0], [2.0, 3.0], "distinct"),
    ([1.0, -2.0], [2.0, 3.0], "positive"),
    ([1.0, 2.0], [2.0, 2.0], "alpha = 0"),
    ([1.0, 2.0, 3.0], [2.0, 3.0], "equal length"),
])
def test_bad_input(x, y, needle):
    with pytest.raises(InputError, match=needle):
        fit_power_law(x, y)


def test_sweep_grid_builds_valid_experiment_configs():
    """Every grid point of experiments/scaling_laws.py is a valid config (no run needed)."""
    import importlib.util
    import os

    from mmjax.train import load_experiment

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "experiments", "scaling_laws.py")
    spec = importlib.util.spec_from_file_location("scaling_laws", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    points = mod.grid(quick=False)
    assert len(points) == len(mod.SIZES) * len(mod.STEPS)
    for size, steps in points:
        cfg = load_experiment(mod.LLM_TEXT, mod.overrides(size, steps))
        dim, layers, heads, kv, mlp = mod.SIZES[size]
        assert (cfg.model.dim, cfg.model.num_layers, cfg.model.dropout) == (dim, layers, 0.0)
    # the parameter count matches the model's actual non-embedding params
    import jax

    from mmjax.models.llama import Llama

    cfg = load_experiment(mod.LLM_TEXT, mod.overrides("d128_l2", 100))
    shapes = jax.eval_shape(lambda r: Llama(cfg.model).init(r, jax.numpy.zeros((1, 4), "int32")),
                            jax.random.PRNGKey(0))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    non_emb = sum(x.value.size if hasattr(x, "value") else x.size for p, x in leaves
                  if "embed" not in jax.tree_util.keystr(p))
    assert non_emb == mod.non_embedding_params(*mod.SIZES["d128_l2"])
