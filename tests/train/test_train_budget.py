"""A time budget shortens a run once, early, re-spans the schedule, and survives a resume."""

import json

import pytest

from mmjax.errors import ConfigError
from mmjax.train import run
from mmjax.train.budget import PLAN_FILE, fit_steps
from mmjax.train.experiment import load_experiment
from mmjax.train.metrics import read_metrics
from mmjax.train.optimizer import make_schedule
from support import LLM_TEXT, tiny_overrides


def test_fit_steps():
    assert fit_steps(900, 21, 0.5, 100.0) == 221  # 200 more steps fit
    assert fit_steps(900, 21, 0.1, 1000.0) == 900  # everything fits: never more than asked
    assert fit_steps(900, 21, 0.5, -3.0) == 22  # over budget already: one more step, no fewer
    assert fit_steps(900, 21, 0.5, 0.4) == 22


def test_budget_shortens_the_run_and_a_resume_keeps_the_plan(corpus, tmp_path):
    # a budget of 1 ms cannot hold the 40 requested steps: the plan, made after the first
    # step + 2 calibration steps, keeps one more step (4 in all)
    over = tiny_overrides(corpus, time_budget_s=0.001, budget_calibration_steps=2)
    first = run(LLM_TEXT, workdir=str(tmp_path), steps=40, stop_at=3, overrides=over)
    assert first["step"] == 3 and first.get("stopped")
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    assert plan["requested_steps"] == 40 and plan["steps"] == 4 and plan["step_time_s"] > 0
    # the resumed run takes its total from plan.json, not from the 40 it was asked for
    resumed = run(LLM_TEXT, workdir=str(tmp_path), steps=40, overrides=over)
    assert resumed["step"] == 4 and "val_loss" in resumed
    # the schedule was re-spanned to end at step 4: the logged learning rates are its values
    cfg = load_experiment(LLM_TEXT, over)
    schedule = make_schedule(cfg.optimizer, 4)
    logged = {r["step"]: r["learning_rate"] for r in read_metrics(tmp_path) if "learning_rate" in r}
    assert sorted(logged) == [1, 2, 3, 4]
    for step, lr in logged.items():
        assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6), step
    # the schedule the 40-step run would have used differs at the last step
    assert logged[4] != pytest.approx(float(make_schedule(cfg.optimizer, 40)(3)), rel=1e-3)


def test_budget_that_fits_changes_nothing(corpus, tmp_path):
    over = tiny_overrides(corpus, time_budget_s=3600, budget_calibration_steps=2)
    out = run(LLM_TEXT, workdir=str(tmp_path), steps=5, overrides=over)
    assert out["step"] == 5
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    assert plan["steps"] == plan["requested_steps"] == 5


@pytest.mark.parametrize("key, value", [("time_budget_s", 0), ("time_budget_s", -5),
                                        ("budget_calibration_steps", 0)])
def test_bad_budget_settings_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        load_experiment(LLM_TEXT, [f"{key}={value}"])
