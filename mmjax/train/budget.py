"""A wall-clock budget for the training steps: shorten a run that would not fit, once, early.

`ExperimentConfig.time_budget_s` says how long the training steps may take. A fresh run times
`calibration_steps` steps after the first one (which compiles), projects the whole run from
that step time, and when `steps` would not fit, trains only the steps that do: the run's total
becomes that number and the learning-rate schedule is re-spanned to end there (warmup is
unchanged; the calibration steps lie inside it for any usual warmup). The re-spanned step
compiles again; the time the first step took is set aside for that. Evaluation, sampling and
checkpoint saves after the calibration are not projected: keep them small against the budget.
The decision is made once, by process 0 (broadcast to the others), and written to `plan.json`
in the workdir so a resumed run keeps the same total and schedule.

This trades reproducibility across machines for a bounded run time: on a fast machine the
budget does not bite and the run is exactly the configured one; on a slower one the result
is that of a shorter schedule. The log line and `plan.json` say which happened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """requested_steps: the configured total; steps: the total the run trains;
    step_time_s: the measured seconds per step; budget_s: the budget it was fitted to."""

    requested_steps: int
    steps: int
    step_time_s: float
    budget_s: float

    def describe(self) -> str:
        projected = self.requested_steps * self.step_time_s
        if self.steps == self.requested_steps:
            return (f"time budget {self.budget_s:.0f} s: {self.requested_steps} steps fit "
                    f"({self.step_time_s:.3f} s/step, ~{projected:.0f} s)")
        return (f"time budget {self.budget_s:.0f} s: {self.requested_steps} steps would take "
                f"~{projected:.0f} s at {self.step_time_s:.3f} s/step; training {self.steps} "
                "steps (learning-rate schedule re-spanned to end there)")


def fit_steps(requested: int, done: int, step_time_s: float, remaining_s: float) -> int:
    """The total number of steps that fits: `done` already taken, `remaining_s` left at
    `step_time_s` each; never more than `requested`, never fewer than `done + 1`."""
    more = int(max(remaining_s, 0.0) // max(step_time_s, 1e-9))
    return max(done + 1, min(requested, done + more))


class BudgetTimer:
    """Times the loop of a fresh run and, after `calibration_steps` steps past the first,
    returns the plan (`observe` -> StepPlan once, None otherwise)."""

    def __init__(self, budget_s: float, requested_steps: int, calibration_steps: int = 20):
        self.budget_s = float(budget_s)
        self.requested = int(requested_steps)
        self.calibration = int(calibration_steps)
        self._t0 = time.perf_counter()
        self._t_first: float | None = None
        self._done = False

    def observe(self, step: int, last_metrics) -> StepPlan | None:
        """Call after dispatching step `step` (1-based) with that step's metrics on device."""
        if self._done or step not in (1, 1 + self.calibration):
            return None
        jax.block_until_ready(last_metrics)
        now = time.perf_counter()
        if step == 1:
            self._t_first = now
            return None
        self._done = True
        step_time = (now - self._t_first) / self.calibration
        remaining = self.budget_s - (now - self._t0)
        total = fit_steps(self.requested, step, step_time, remaining)
        if total < self.requested:  # the re-spanned step compiles again: as long as the first did
            compile_s = self._t_first - self._t0
            total = fit_steps(self.requested, step, step_time, remaining - compile_s)
        total = int(_broadcast(np.int64(total)))
        return StepPlan(self.requested, total, step_time, self.budget_s)


def _broadcast(value: np.ndarray) -> np.ndarray:
    """Process 0's value on every process (the processes' step times differ slightly)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


def save_plan(workdir: str, plan: StepPlan) -> None:
    with open(os.path.join(workdir, PLAN_FILE), "w") as f:
        json.dump(dataclasses.asdict(plan), f, indent=2)


def load_plan(workdir: str, requested_steps: int) -> StepPlan | None:
    """The plan recorded for a run of `requested_steps` in `workdir`, or None (no plan, or one
    made for another requested total: an explicit new `--steps` is the user's choice)."""
    path = os.path.join(workdir, PLAN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        plan = StepPlan(**json.load(f))
    return plan if plan.requested_steps == requested_steps else None
