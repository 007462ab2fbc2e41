"""Scaling-law fit: exact recovery on an exact power law, noise tolerance, clear errors."""

import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.eval.scaling import fit_power_law
from support import ROOT


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

    path = os.path.join(ROOT, "experiments", "scaling_laws.py")
    spec = importlib.util.spec_from_file_location("scaling_laws", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    points = mod.grid(quick=False)
    assert len(points) == len(mod.SIZES) * (len(mod.STEPS) + 1)
    for size, steps, every in points:
        cfg = load_experiment(mod.LLM_TEXT, mod.overrides(size, steps, every))
        dim, layers, *_ = mod.SIZES[size]
        assert (cfg.model.dim, cfg.model.num_layers, cfg.model.dropout) == (dim, layers, 0.0)
        assert cfg.eval_every == every
    assert {p for p in points if p[2]} == {(s, mod.LONG_STEPS, mod.EVAL_EVERY) for s in mod.SIZES}
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


def test_sweep_fits_pick_the_right_runs():
    """L(N) fits the early-stopped best losses of the long runs, L(D) the largest model's grid
    runs, L(C) the compute frontier; synthetic results drawn from known power laws."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "scaling_laws", os.path.join(ROOT, "experiments", "scaling_laws.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = []
    for n in (1e5, 4e5, 1.6e6):
        for d in (2e5, 4e5, 8e5):
            results.append({"name": f"n{n:g}_d{d:g}", "N": n, "D": d, "C": 6 * n * d,
                            "val_loss": (3e9 / d) ** 0.2 + (1e4 / n) ** 0.3})
        # the long run ends overfit: its final loss is worse than its best
        results.append({"name": f"n{n:g}_es", "N": n, "D": 4e6, "C": 6 * n * 4e6,
                        "early_stopping": True, "val_loss": 9.0, "best_val_loss": (2e5 / n) ** 0.1})
    fits = mod.fit_all(results)
    assert fits["N"]["runs"] == ["n100000_es", "n400000_es", "n1.6e+06_es"]
    assert np.isclose(fits["N"]["alpha"], 0.1) and np.isclose(fits["N"]["c"], 2e5)
    assert fits["D"]["runs"] == [f"n1.6e+06_d{d:g}" for d in (2e5, 4e5, 8e5)]
    assert all(not r.endswith("_es") for r in fits["C"]["runs"])
    losses = [next(r["val_loss"] for r in results if r["name"] == k) for k in fits["C"]["runs"]]
    assert losses == sorted(losses, reverse=True)
