"""The training loop: resume, step, log, evaluate, sample, checkpoint, stop cleanly.

    metrics = train(cfg, workdir, stop_at=None, mesh_spec=None)

Sharding: `mesh_spec` (`--mesh fsdp=4,tensor=2`) sizes the mesh axes and `cfg.parallelism` names
the preset (`mmjax.parallel.presets`) whose rules lay out params, optimizer state, batch and
activations on it. Without a mesh a single process trains on one device (several processes
get `data=-1`).

It knows nothing of model families: `cfg.task` names a `mmjax.train.task.Task` that builds the
model, the data, the loss and the evaluation. Workdir layout: `checkpoints/` (Orbax),
`mmjax_model.json` ({"family", "config"}), `experiment.json`, `metrics.jsonl`, `tensorboard/`,
`samples.txt`, `loss_curve.png`, plus the task's own files (e.g. `tokenizer.model`).

Task state: a task whose `init_task_state(params)` returns a pytree (None = none) trains with
`task.state_loss(params, task_state, batch, rng)` (see `mmjax.train.step`); the state is
created with the params, sharded like them, checkpointed in the "train" item and restored on
resume (`mmjax.train.state`, docs/training.md). A task may also define
`params_from_state(params, task_state) -> params` for params no gradient learns (VQ's EMA
codebook): the step applies it after the optimizer update.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax

from mmjax.checkpoint import (
    WORKDIR_CHECKPOINT_DIR as CHECKPOINT_DIR,
    WORKDIR_MODEL_FILE as MODEL_FILE,
    WORKDIR_TOKENIZER_FILE as TOKENIZER_FILE,
)
from mmjax.parallel.mesh import activate, make_mesh
from mmjax.parallel.presets import check_mesh, describe_mesh, get_preset
from mmjax.train.checkpointing import Checkpointer
from mmjax.train.errors import CheckpointError, DataError, NonFiniteLossError
from mmjax.train.experiment import ExperimentConfig
from mmjax.train.metrics import MetricsWriter, Progress, read_metrics
from mmjax.train.optimizer import make_optimizer
from mmjax.train.peft import run_for as peft_run_for
from mmjax.train import pretrained
from mmjax.train.budget import BudgetTimer, load_plan, save_plan
from mmjax.train.plots import plot_loss_curve
from mmjax.train.state import (
    abstract_boxed_params,
    abstract_train_state,
    count_params,
    create_train_state,
    reinit_task_state,
    state_shardings,
)
from mmjax.train.step import make_train_step, parallel_chains_for, shard_batch
from mmjax.train.task import build_task
from mmjax.train.workdir_lock import WorkdirLock, WorkdirLockedError
from mmjax.xla_options import step_compiler_options

# The workdir layout constants live in mmjax.checkpoint (imported above), which reads workdirs
# for `mmjax export`; MODEL_FILE, TOKENIZER_FILE and CHECKPOINT_DIR are re-exported from here.
__all__ = ["CHECKPOINT_DIR", "MODEL_FILE", "TOKENIZER_FILE", "check_workdir_writable",
           "format_metrics", "train"]


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves and exits after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: give up waiting
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_workdir_writable(workdir: str) -> None:
    """Raise CheckpointError when `workdir` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


def train(
    cfg: ExperimentConfig, workdir: str, *, stop_at: int | None = None,
    mesh_spec: str | None = None, json_output: bool = False, force_unlock: bool = False,
) -> dict[str, Any]:
    """Train (or resume) `cfg` in `workdir`; return the final metrics.

    The workdir is locked for the whole run (`mmjax.train.workdir_lock`; WorkdirLockedError
    when another live run holds it, `force_unlock` takes it regardless) before anything in it
    is written, and released however the run ends (normally, SIGTERM/SIGINT, an exception);
    only a killed process leaves it behind, and the next run takes that over."""
    is_main = jax.process_index() == 0
    out = sys.stderr if json_output else sys.stdout

    def log(msg: str) -> None:
        if is_main:
            print(msg, file=out, flush=True)

    workdir = os.path.abspath(workdir)
    check_workdir_writable(workdir)
    lock = _lock_workdir(workdir, force_unlock, log)
    try:
        return _train(cfg, workdir, stop_at=stop_at, mesh_spec=mesh_spec, log=log,
                      is_main=is_main)
    finally:
        if lock is not None:
            lock.release()


def _lock_workdir(workdir: str, force: bool, log) -> WorkdirLock | None:
    """Process 0 takes the lock on behalf of the job; in a multi-process job it tells the
    others whether it got it, so all of them stop together when it did not."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire(force=force, log=log)
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirLockedError(f"process 0 could not lock workdir {workdir}")
    if error is not None:
        raise error
    return lock


def _tokenizer_sha(workdir: str) -> str | None:
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_tokenizer(workdir: str, meta: dict[str, Any], step: int, existed: bool, log) -> None:
    """The tokenizer in the workdir must be the one checkpoint `step` was trained with: the
    task retrains a missing one from the corpus, and a different vocabulary would make the
    restored embedding rows mean other tokens. Identical (training is seeded): say so and go
    on; different: set the new one aside and stop (DataError)."""
    want = (meta.get("files") or {}).get(TOKENIZER_FILE)
    have = _tokenizer_sha(workdir)
    if want is None or want == have:
        if not existed and have is not None and want is not None:
            log(f"{TOKENIZER_FILE} was missing from {workdir}; retrained it from the corpus and it "
                f"is identical to the one checkpoint step {step} was trained with")
        return
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not existed and have is not None and jax.process_index() == 0:
        os.replace(path, path + ".retrained")
        raise DataError(
            f"{path} was missing and the tokenizer retrained from the corpus differs from the one "
            f"checkpoint step {step} was trained with (sha256 {want[:12]}...); put the original "
            f"{TOKENIZER_FILE} back (the retrained one is in {TOKENIZER_FILE}.retrained) or start "
            "over in a new --workdir")
    raise DataError(
        f"{path} is not the tokenizer checkpoint step {step} was trained with (sha256 "
        f"{want[:12]}..., found {(have or 'none')[:12]}); put the original back or start over "
        "in a new --workdir")


def _train(
    cfg: ExperimentConfig, workdir: str, *, stop_at: int | None, mesh_spec: str | None,
    log, is_main: bool,
) -> dict[str, Any]:
    t_start = time.perf_counter()

    preset = get_preset(cfg.parallelism)
    model_cfg = preset.configure_model(cfg.model, on_mesh=bool(mesh_spec) or jax.process_count() > 1)
    if model_cfg != cfg.model:
        changed = {k: getattr(model_cfg, k) for k in ("dtype", "param_dtype", "implementation")
                   if getattr(model_cfg, k, None) != getattr(cfg.model, k, None)}
        log(f"parallelism={preset.name}: model " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        cfg = cfg.replace(model=model_cfg)
    if not mesh_spec and jax.process_count() > 1:
        mesh_spec = "data=-1"  # one device per process cannot hold a multi-process job
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    if mesh is not None:
        check_mesh(mesh, preset)

    tokenizer_existed = os.path.isfile(os.path.join(workdir, TOKENIZER_FILE))
    task = build_task(cfg, workdir, log)
    peft = peft_run_for(cfg)  # LoRA / a compact frozen base: the task runs with it active
    if peft is not None:
        peft.wrap(task)
    tokenizer_sha = _tokenizer_sha(workdir)
    if is_main:
        _write_json(os.path.join(workdir, MODEL_FILE),
                    {"family": task.family, "config": task.model_config.to_dict()})
        _write_json(os.path.join(workdir, "experiment.json"), cfg.to_dict())
        if peft is not None:
            peft.write(workdir)

    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=cfg.keep_checkpoints,
                        best_metric=cfg.keep_best_metric, best_mode=cfg.keep_best_mode)
    latest = ckpt.latest_step()
    plan = load_plan(workdir, cfg.steps) if latest is not None else None
    if plan is not None:  # a budgeted run being resumed: same total, same schedule
        log(f"resuming the plan in {workdir}/plan.json: {plan.describe()}")
        cfg = cfg.replace(steps=plan.steps)
    abstract_params = abstract_boxed_params(task.init_params)  # the tree the optimizer needs
    trainable = peft.trainable if peft is not None else None
    trainable_mask = peft.trainable_mask(abstract_params) if peft is not None else None
    tx, schedule = make_optimizer(cfg.optimizer, cfg.steps, abstract_params, trainable)
    rules, opt_rules = preset.rules, preset.opt_rules
    init_task_state = _task_state_fn(task, abstract_params)
    shardings = (state_shardings(task.init_params, tx, mesh, rules, opt_rules, init_task_state)
                 if mesh is not None else None)

    train_iter = task.train_iterator()
    history: dict[str, Any] = {}
    restored = None
    if latest is not None:
        abstract = abstract_train_state(task.init_params, tx, shardings=shardings,
                                        init_task_state=init_task_state)
        restored = ckpt.restore_latest(abstract, log)  # verified; falls back past bad steps
    if restored is not None:
        latest, state, iter_state, meta = restored
        _check_tokenizer(workdir, meta, latest, tokenizer_existed, log)
        if iter_state is not None:
            train_iter.set_state(iter_state)
        history = dict(meta.get("metrics") or {})
        log(f"resumed from {ckpt.directory} at step {latest}")
    else:
        state, _ = create_train_state(task.init_params, tx, seed=cfg.seed, mesh=mesh,
                                      rules=rules, opt_rules=opt_rules,
                                      init_task_state=init_task_state)
        sources = pretrained.init_sources(cfg.init_from, cfg.init_from_prefix)
        if sources:
            params, report = pretrained.overlay_sources(state.params, sources)
            state = state.replace(params=params)
            with activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
                state = reinit_task_state(state, init_task_state, shardings)  # from the new params
            log(pretrained.describe(report, sources))
            if is_main:
                pretrained.write_report(workdir, report, sources)
    step = int(jax.device_get(state.step))
    describe = getattr(task, "describe", lambda: type(task.model).__name__)()
    log(f"model: {count_params(state.params) / 1e6:.2f}M params ({describe}); {cfg.steps} steps"
        + (f" on mesh {describe_mesh(mesh)}, parallelism {preset.name}" if mesh is not None
           else ""))
    if peft is not None:
        log(peft.describe(state.params))

    def build_train_step(tx, schedule):
        return make_train_step(task.loss, tx, schedule,
                               grad_accum_steps=cfg.optimizer.grad_accum_steps,
                               mesh=mesh, shardings=shardings, rules=rules,
                               state_loss_fn=task.state_loss if init_task_state else None,
                               trainable=trainable_mask,
                               state_params_fn=getattr(task, "params_from_state", None)
                               if init_task_state else None,
                               compiler_options=step_compiler_options(
                                   getattr(cfg.model, "dtype", None)),
                               parallel_chains=parallel_chains_for(
                                   getattr(cfg.data, "batch_size", 0)
                                   // cfg.optimizer.grad_accum_steps, mesh=mesh,
                                   sums_over_examples=getattr(task, "loss_sums_over_examples", False)))

    train_step = build_train_step(tx, schedule)
    writer = MetricsWriter(workdir, enabled=is_main)
    final: dict[str, Any] = {"step": step}
    sample_text = None

    def run_eval(tag: str) -> dict[str, float]:
        t0 = time.perf_counter()
        with activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
            # a task with state may evaluate it too (I-JEPA: the EMA target encoder, which the
            # paper evaluates); it says so with `evaluates_task_state = True`
            extra = ({"task_state": state.task_state}
                     if getattr(task, "evaluates_task_state", False) and state.task_state is not None else {})
            m = task.evaluate(state.params, mesh, final=(tag == "end"), **extra)
        evals_at[step] = m
        writer.write(step, m)
        log(f"[{tag}] step {step}: {format_metrics(m)} ({time.perf_counter() - t0:.1f}s)")
        return m

    def run_sample() -> str | None:
        text = task.sample(state.params, step)
        if text is not None and is_main:
            with open(os.path.join(workdir, "samples.txt"), "a") as f:
                f.write(f"--- step {step} ---\n{text}\n")
            writer.write_text(step, "sample", text)
        return text

    evals_at: dict[int, dict[str, float]] = {}  # step -> evaluation metrics at that step

    def save(metrics: dict[str, Any] | None = None, force: bool = True) -> None:
        """Checkpoint `state`; the metrics include this step's evaluation when there was one,
        so the best-checkpoint policy can rank it."""
        if ckpt.latest_step() == step:  # e.g. re-running a finished job: already saved
            return
        metrics = {**(metrics or {}), **evals_at.get(step, {})}
        ckpt.save(step, state, data_state=train_iter.get_state(), metrics=metrics,
                  config=cfg.to_dict(), force=force,
                  files={TOKENIZER_FILE: tokenizer_sha} if tokenizer_sha else None)

    if step == 0 and cfg.eval_at_start:
        start_metrics = run_eval("start")
        final.update({f"start_{k}": v for k, v in start_metrics.items()})
    else:
        final.update({k: v for k, v in history.items() if k.startswith("start_")})

    stopped_by: str | None = None
    units_per_step = task.units_per_step
    rate_key = f"{task.unit}_per_sec"
    progress = Progress(step, cfg.steps, enabled=is_main, unit=task.unit)
    last_log = time.perf_counter()
    steps_since_log, units_since_log = 0, 0.0
    pending = None  # (step, metrics on device) of the last dispatched step
    train_loss = history.get("train_loss")

    def resolve() -> None:
        nonlocal pending, train_loss
        if pending is None:
            return
        at, m = pending
        pending = None
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        # a non-finite gradient norm poisons the params this step produced even when the loss
        # (computed before the update) is still finite: neither state may be checkpointed
        bad = (f"loss is {loss}" if not math.isfinite(loss) else
               f"gradient norm is {grad_norm}" if not math.isfinite(grad_norm) else None)
        if bad is not None:
            ckpt.wait()
            kept = ckpt.latest_step()
            raise NonFiniteLossError(
                f"{bad} at step {at}; training stopped. The last good checkpoint "
                f"({'step ' + str(kept) if kept is not None else 'none'}) in {ckpt.directory} "
                "was kept; lower the learning rate or check the data.", at)
        train_loss = loss

    budget = (BudgetTimer(cfg.time_budget_s, cfg.steps, cfg.budget_calibration_steps)
              if cfg.time_budget_s is not None and step == 0 else None)  # times the steps only
    try:
        with _StopSignal() as stop:
            refresh = getattr(task, "refresh", None)  # e.g. PPO's rollouts from the policy
            while step < cfg.steps:
                if refresh is not None:
                    with activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
                        refresh(state.params, step)
                batch = next(train_iter)
                state, metrics = train_step(state, shard_batch(batch, mesh, rules))
                resolve()  # the previous step's loss, read while this one runs
                step += 1
                pending = (step, metrics)
                plan = budget.observe(step, metrics) if budget is not None else None
                if plan is not None:
                    progress.write(f"[budget] {plan.describe()}")
                    if is_main:
                        save_plan(workdir, plan)
                    if plan.steps != cfg.steps:
                        cfg = cfg.replace(steps=plan.steps)
                        # the optimizer state's structure does not depend on the schedule
                        tx, schedule = make_optimizer(cfg.optimizer, cfg.steps, abstract_params,
                                                      trainable)
                        train_step = build_train_step(tx, schedule)
                        progress.set_total(cfg.steps)
                steps_since_log += 1
                units_since_log += units_per_step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    resolve()
                    now = time.perf_counter()
                    rate = units_since_log / max(now - last_log, 1e-9)
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()
                            if k not in ("loss", "count")}
                    writer.write(step, {"train_loss": train_loss, **host, rate_key: rate})
                    progress.update(steps_since_log, int(units_since_log), loss=train_loss)
                    last_log, steps_since_log, units_since_log = now, 0, 0.0
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    resolve()
                    run_eval("eval")
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                    resolve()
                    text = run_sample()
                    if text is not None:
                        progress.write(f"[sample] step {step}: {text!r}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    resolve()
                    save({**final, "train_loss": train_loss})
                if stop_at is not None and step >= stop_at and step < cfg.steps:
                    stopped_by = f"--stop-at {stop_at}"
                    break
                if stop.received is not None:
                    stopped_by = signal.Signals(stop.received).name
                    break
            resolve()
            progress.update(steps_since_log, int(units_since_log), loss=train_loss or float("nan"))
            progress.close()
            final.update({"step": step, "train_loss": train_loss})
            if stopped_by is not None:
                save({"train_loss": train_loss, **final})
                ckpt.wait()
                log(f"stopped by {stopped_by} after step {step}; checkpoint saved in "
                    f"{ckpt.directory}; run the same command again to resume")
                final["stopped"] = stopped_by
            else:
                end = run_eval("end")
                final.update(end)
                save({"train_loss": train_loss, **final})
                sample_text = run_sample()
                if sample_text is not None:
                    log(f"[sample] {sample_text}")
                ckpt.wait()
    finally:
        progress.close()
        writer.close()
        with contextlib.suppress(Exception):
            ckpt.close()
    if is_main:
        plot_loss_curve(read_metrics(workdir), os.path.join(workdir, "loss_curve.png"), cfg.name)
    final["wall_time_s"] = time.perf_counter() - t_start
    final["workdir"] = workdir
    if sample_text is not None:
        final["sample"] = sample_text
    return final


def _task_state_fn(task, abstract_boxed) -> Any:
    """The task's `init_task_state` when it has one that returns a state for these params (a
    task may keep it off by config), else None."""
    fn = getattr(task, "init_task_state", None)
    if fn is None:
        return None
    import flax.linen as nn

    if jax.eval_shape(fn, nn.meta.unbox(abstract_boxed)) is None:
        return None
    if not callable(getattr(task, "state_loss", None)):
        raise TypeError(f"task {type(task).__name__} has a task state but no "
                        "state_loss(params, task_state, batch, rng)")
    return fn


def format_metrics(m: dict[str, Any]) -> str:
    """'val_loss 3.9412, val_ppl 51.30, val_bpb 1.737' (counts without decimals)."""
    parts = []
    for k, v in m.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}" if abs(v) < 1e4 else f"{k} {v:.0f}")
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts) or "no metrics"


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
