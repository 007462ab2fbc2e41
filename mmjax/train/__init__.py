"""Training: experiment configs, optimizer, train state and step, the loop, checkpoints.

The loop is model-agnostic: an experiment's `task` (`mmjax.train.task.TASKS`) supplies the
model, the data, the loss and the evaluation.

    from mmjax.train import run
    metrics = run("experiments/llm_text.py", workdir=None, steps=None, stop_at=None, mesh=None,
                  overrides=["optimizer.learning_rate=1e-3"], json_output=False)
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from mmjax.train.experiment import ExperimentConfig, OptimizerConfig, apply_overrides, load_experiment


def run(
    config_path: str, *, workdir: str | None = None, steps: int | None = None,
    stop_at: int | None = None, mesh: str | None = None, overrides: Sequence[str] = (),
    json_output: bool = False, force_unlock: bool = False, phase: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment in `config_path`; return the final metrics.

    `steps` overrides the run's total steps (the LR schedule spans them); `stop_at` saves and
    returns after that step as if preempted; `workdir` defaults to `workdirs/<name>`;
    `force_unlock` takes the workdir's lock even from a run that looks alive.
    A file that defines `get_pipeline()` runs every stage (`mmjax.train.pipeline`: `steps` and
    `stop_at` count all phases' steps, `PHASE.key=value` overrides one phase); `phase` trains
    one phase's declared config alone instead.
    """
    from mmjax.errors import ConfigError
    from mmjax.train.loop import train
    from mmjax.train.pipeline import (ensure_prerequisites, load_pipeline, load_requires, one_phase_config,
                                      run_pipeline)

    if steps is not None and steps <= 0:
        raise ConfigError(f"--steps must be positive, got {steps}")
    if stop_at is not None and stop_at <= 0:
        raise ConfigError(f"--stop-at must be positive, got {stop_at}")
    pipeline = load_pipeline(config_path)
    if pipeline is not None and phase is None:
        return run_pipeline(
            pipeline, workdir or os.path.join("workdirs", pipeline.name),
            base_dir=os.path.dirname(os.path.abspath(config_path)), steps=steps, stop_at=stop_at,
            mesh_spec=mesh, overrides=overrides, json_output=json_output, force_unlock=force_unlock, run=run)
    if phase is not None:
        if pipeline is None:
            raise ConfigError(f"--phase {phase}: {config_path} defines no get_pipeline(), so it has "
                              "no phases; run it without --phase")
        cfg = one_phase_config(pipeline, phase, overrides)  # ConfigError listing the phases
        workdir = workdir or os.path.join("workdirs", pipeline.name, phase)
    else:
        cfg = load_experiment(config_path, list(overrides))
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    workdir = workdir or os.path.join("workdirs", cfg.name)
    requires = pipeline.requires if pipeline is not None else load_requires(config_path)
    if requires:  # the prerequisite runs this config reads
        ensure_prerequisites(requires, [cfg], os.path.dirname(os.path.abspath(config_path)),
                             lambda msg: print(msg, file=sys.stderr if json_output else sys.stdout, flush=True),
                             run=run, mesh_spec=mesh, json_output=json_output, force_unlock=force_unlock)
    return train(cfg, workdir, stop_at=stop_at, mesh_spec=mesh, json_output=json_output,
                 force_unlock=force_unlock)


def load_for_inference(workdir: str):
    """(module, params, tokenizer) from a training workdir's latest checkpoint."""
    from mmjax.train.inference import load_for_inference as _load

    return _load(workdir)


__all__ = ["ExperimentConfig", "OptimizerConfig", "apply_overrides", "load_experiment",
           "load_for_inference", "run"]
