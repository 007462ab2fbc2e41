"""Experiments of several training runs: one `mmjax train CONFIG` for the whole recipe.

BLIP-2 trains its Q-Former (stage 1) before it feeds the LLM (stage 2); CapFilt trains on noisy
pairs, fine-tunes a filter and a captioner, cleans the data and trains again; LLaVA aligns its
projector before it tunes the LLM. An experiment file says so by defining `get_pipeline()`
beside (or instead of) `get_config()`:

    def get_pipeline() -> Pipeline:
        return Pipeline(
            name="blip2_digits",
            requires=(Requires("clip_digits.py", "workdirs/clip_digits"),),
            stages=(Phase("stage1", stage1_config()),
                    Phase("stage2", stage2_config(), prepare=lambda cfg, r: cfg.replace(
                        init_from=r["stage1"].workdir))),
            summarize=lambda r: {"retrieval_recall_at_1": r["stage1"].metrics["i2t_r@1"], ...})

`mmjax train FILE [--workdir DIR]` then runs every stage in order, each training run in
`DIR/<phase>` (DIR defaults to `workdirs/<pipeline name>`), and prints one summary:

* **Stages.** A `Phase` is a training run of its `ExperimentConfig`; `prepare(cfg, results)` may
  rewrite it from the earlier stages' results (a workdir to start from, a file they wrote). An
  `Action` is work between runs that is not training (CapFilt's filtering): `fn(results, DIR)`
  returns JSON-able metrics. `results[name]` is a `StageResult` (workdir, config, metrics).
* **Prerequisites.** `Requires(experiment, workdir)`: a run other experiments share (the CLIP
  digits tower, the main job's LLM). When a phase's config reads `workdir` (`init_from`, a
  tokenizer path) and it holds no finished run, it is trained there first with its own file's
  config (and its own prerequisites), unscaled by `--steps`: a shared workdir must not be left
  holding a shortened run. A finished one is reused as it is; one the overrides made unused
  (`--set init_from=None`) is not trained. A single-run experiment declares the same with a
  module-level `REQUIRES = (Requires(...), ...)`. `MMJAX_TRAIN_PREREQUISITES=refuse` (the test
  suite sets it) turns "train it first" into an error, so no test trains a full prerequisite.
* **Steps.** `--steps N` is the pipeline's total number of training steps: N is split over the
  phases in proportion to their configured steps (largest remainder, at least 1 each), and each
  phase's learning-rate schedule spans its share. `--stop-at K` counts the same global steps: the
  phase in which step K falls saves and stops as if preempted; the same command without it
  resumes there. The summary's `step` is the global count, `train_loss` the last phase's.
* **Overrides.** `--set key=value` applies to every phase; `--set PHASE.key=value` to one.
  An unprefixed key that some phase's config lacks is refused (name that phase).
* **Resuming.** `DIR/pipeline.json` records each finished stage with a fingerprint of its final
  config. A rerun skips recorded stages whose config is unchanged and resumes the first
  unfinished one; a finished stage whose config changed is refused (the later stages were
  built on the old one): use a new `--workdir`.

`--phase NAME` (Python: `run(..., phase=NAME)`) trains that phase's declared config alone
(without `prepare`), in `workdirs/<pipeline>/<NAME>` unless `--workdir` says otherwise: for tests
and for one stage by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from mmjax.errors import ConfigError
from mmjax.train.experiment import ExperimentConfig, apply_overrides

RECORD_FILE = "pipeline.json"
_RESERVED = {f.name for f in dataclasses.fields(ExperimentConfig)}


@dataclasses.dataclass(frozen=True)
class Requires:
    """A shared prerequisite run: `experiment` (a path, relative to the pipeline's file) trained
    in `workdir` (relative to the current directory, as experiments' `init_from` paths are)."""

    experiment: str
    workdir: str


@dataclasses.dataclass(frozen=True)
class StageResult:
    name: str
    workdir: str
    config: ExperimentConfig | None  # None for an Action
    metrics: dict[str, Any]


Results = Mapping[str, StageResult]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training run. `prepare(cfg, results) -> cfg` rewrites its config from earlier stages
    (run after overrides and the `--steps` split, before training)."""

    name: str
    config: ExperimentConfig
    prepare: Callable[[ExperimentConfig, Results], ExperimentConfig] | None = None

    def __post_init__(self):
        if not isinstance(self.config, ExperimentConfig):
            raise ConfigError(f"phase {self.name!r}: config must be an ExperimentConfig, "
                              f"got {type(self.config).__name__}")


@dataclasses.dataclass(frozen=True)
class Action:
    """Work between training runs: `fn(results, pipeline_workdir) -> metrics` (JSON-able)."""

    name: str
    fn: Callable[[Results, str], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[Phase | Action, ...]
    summarize: Callable[[Results], dict[str, Any]]
    requires: tuple[Requires, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "requires", tuple(self.requires))
        names = [s.name for s in self.stages]
        if not any(isinstance(s, Phase) for s in self.stages):
            raise ConfigError(f"pipeline {self.name!r} has no Phase: nothing to train")
        for n in names:
            if names.count(n) > 1:
                raise ConfigError(f"pipeline {self.name!r}: stage name {n!r} is used twice")
            if n in _RESERVED or not n.isidentifier():
                raise ConfigError(f"pipeline {self.name!r}: stage name {n!r} must be an identifier "
                                  "that is not an ExperimentConfig field (it prefixes --set keys)")

    @property
    def phases(self) -> tuple[Phase, ...]:
        return tuple(s for s in self.stages if isinstance(s, Phase))

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise ConfigError(f"pipeline {self.name!r} has no phase {name!r}; its phases: "
                          + ", ".join(p.name for p in self.phases))


# --- configs ---------------------------------------------------------------------------------

def split_overrides(pipeline: Pipeline, overrides: Sequence[str]) -> dict[str, list[str]]:
    """{phase name: its overrides}: unprefixed ones go to every phase, `PHASE.key=v` to one."""
    names = {s.name for s in pipeline.stages}
    out: dict[str, list[str]] = {p.name: [] for p in pipeline.phases}
    for item in overrides:
        head = item.split("=", 1)[0].split(".", 1)[0].strip()
        if head in names:
            if head not in out:
                raise ConfigError(f"--set {item!r}: {head!r} is an action, not a training phase")
            out[head].append(item.split(".", 1)[1])
        else:
            for v in out.values():
                v.append(item)
    return out


def phase_configs(pipeline: Pipeline, overrides: Sequence[str] = (), steps: int | None = None
                  ) -> dict[str, ExperimentConfig]:
    """Each phase's config with the overrides and the share of `steps` (before `prepare`)."""
    per_phase = split_overrides(pipeline, overrides)
    prefixed = {item.split(".", 1)[1] for item in overrides
                if item.split(".", 1)[0].strip() in per_phase}
    cfgs = {}
    for p in pipeline.phases:
        try:
            cfgs[p.name] = apply_overrides(p.config, per_phase[p.name])
        except ConfigError as e:
            shared = [o for o in per_phase[p.name] if o not in prefixed]
            hint = (f" (an unprefixed --set applies to every phase; for one phase write "
                    f"{p.name}.KEY=VALUE)" if shared else "")
            raise ConfigError(f"phase {p.name!r}: {e}{hint}") from e
    if steps is not None:
        for name, n in zip(cfgs, split_steps(steps, [c.steps for c in cfgs.values()])):
            cfgs[name] = cfgs[name].replace(steps=n)
    return cfgs


def one_phase_config(pipeline: Pipeline, name: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Phase `name`'s declared config with the overrides meant for it (unprefixed or `name.`);
    other phases' configs are not built, so keys only this phase has are fine unprefixed."""
    phase = pipeline.phase(name)
    try:
        return apply_overrides(phase.config, split_overrides(pipeline, overrides)[name])
    except ConfigError as e:
        raise ConfigError(f"phase {name!r}: {e}") from e


def split_steps(total: int, weights: Sequence[int]) -> list[int]:
    """`total` steps over phases in proportion to `weights` (largest remainder, >= 1 each)."""
    if total < len(weights):
        raise ConfigError(f"--steps {total} is fewer than the pipeline's {len(weights)} phases "
                          "(each needs at least one step)")
    exact = [total * w / sum(weights) for w in weights]
    out = [max(1, math.floor(x)) for x in exact]
    while sum(out) < total:  # the largest remainders get the spare steps
        out[max(range(len(out)), key=lambda i: exact[i] - out[i])] += 1
    while sum(out) > total:  # the floor of 1 overshot: take from the most over-served
        out[max((i for i in range(len(out)) if out[i] > 1), key=lambda i: out[i] - exact[i])] -= 1
    return out


def fingerprint(cfg: ExperimentConfig) -> str:
    blob = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- running ---------------------------------------------------------------------------------

def _finished(workdir: str) -> bool:
    """Whether `workdir` holds a run that reached its configured (or budgeted) last step."""
    try:
        with open(os.path.join(workdir, "experiment.json")) as f:
            total = int(json.load(f)["steps"])
        plan_path = os.path.join(workdir, "plan.json")
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                total = int(json.load(f)["steps"])
        steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    except (OSError, KeyError, ValueError):
        return False
    return bool(steps) and max(steps) >= total


def ensure_prerequisites(
    requires: Sequence[Requires], configs: Sequence[ExperimentConfig], base_dir: str, log, *,
    run: Callable[..., Any] | None = None, mesh_spec: str | None = None, json_output: bool = False,
    force_unlock: bool = False,
) -> None:
    """Train each prerequisite that one of `configs` reads (its workdir appears in the config:
    `init_from`, a tokenizer path, ...) and whose workdir holds no finished run. A prerequisite
    the overrides made unused (`--set init_from=None`) is not trained. `run` is
    `mmjax.train.run` (passed in: it calls this module), which trains a file with its own
    prerequisites."""
    text = json.dumps([c.to_dict() for c in configs], default=str)
    for req in requires:
        wanted = {os.path.normpath(req.workdir), os.path.abspath(req.workdir)}
        if not any(re.search('"' + re.escape(w) + '[/"]', text) for w in wanted):
            continue
        if _finished(req.workdir):
            log(f"prerequisite {req.workdir}: finished run found, reused")
            continue
        path = os.path.join(base_dir, req.experiment)
        if os.environ.get("MMJAX_TRAIN_PREREQUISITES", "train") == "refuse":
            raise ConfigError(
                f"prerequisite {req.workdir} holds no finished run and MMJAX_TRAIN_PREREQUISITES=refuse "
                f"(set by the test suite): train it first (mmjax train {path} --workdir {req.workdir}) "
                "or override the reference to it away")
        log(f"prerequisite {req.workdir}: no finished run; training {path} there first "
            "(its own config: a shared workdir is not shortened by --steps)")
        if run is None:
            raise ConfigError(f"prerequisite {req.workdir} must be trained, and no runner was given")
        run(path, workdir=req.workdir, mesh=mesh_spec, json_output=json_output, force_unlock=force_unlock)


def load_requires(path: str) -> tuple[Requires, ...]:
    """A single-run experiment file's module-level `REQUIRES` (prerequisite runs), or ()."""
    from mmjax.train.experiment import load_module

    requires = tuple(getattr(load_module(path), "REQUIRES", ()))
    bad = [r for r in requires if not isinstance(r, Requires)]
    if bad:
        raise ConfigError(f"{path}: REQUIRES must hold mmjax.train.pipeline.Requires, got {bad[0]!r}")
    return requires


def _jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(metrics), default=lambda x: getattr(x, "tolist", lambda: str(x))()))


def _read_record(root: str) -> dict[str, Any]:
    path = os.path.join(root, RECORD_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f).get("stages", {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); delete it to rerun every stage") from e


def _write_record(root: str, name: str, stages: dict[str, Any]) -> None:
    path = os.path.join(root, RECORD_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pipeline": name, "stages": stages}, f, indent=2)
    os.replace(tmp, path)


def run_pipeline(
    pipeline: Pipeline, workdir: str, *, base_dir: str = ".", steps: int | None = None,
    stop_at: int | None = None, mesh_spec: str | None = None, overrides: Sequence[str] = (),
    json_output: bool = False, force_unlock: bool = False, run: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage of `pipeline` under `workdir`; return the summary metrics
    (the pipeline's `summarize` plus `step`, `train_loss` and per-phase `phases`). `run`
    (`mmjax.train.run`) trains missing prerequisites."""
    import jax

    from mmjax.train.loop import check_workdir_writable, train
    from mmjax.train.workdir_lock import WorkdirLock

    is_main = jax.process_index() == 0
    out = sys.stderr if json_output else sys.stdout

    def log(msg: str) -> None:
        if is_main:
            print(f"[{pipeline.name}] {msg}", file=out, flush=True)

    cfgs = phase_configs(pipeline, overrides, steps)  # all config errors before any training
    root = os.path.abspath(workdir)
    check_workdir_writable(root)
    lock = WorkdirLock(root).acquire(force=force_unlock, log=log) if is_main else None
    try:
        ensure_prerequisites(pipeline.requires, list(cfgs.values()), base_dir, log, run=run,
                             mesh_spec=mesh_spec, json_output=json_output, force_unlock=force_unlock)
        record = _read_record(root)
        results: dict[str, StageResult] = {}
        phase_info: dict[str, Any] = {}
        offset, last_loss = 0, None
        for stage in pipeline.stages:
            sub = os.path.join(root, stage.name)
            done = record.get(stage.name, {})
            if isinstance(stage, Action):
                if done.get("done"):
                    metrics = done["metrics"]
                    log(f"{stage.name}: done before, result reused")
                else:
                    log(f"{stage.name}: running")
                    t0 = time.perf_counter()
                    metrics = _jsonable(stage.fn(results, root))
                    metrics.setdefault("wall_time_s", round(time.perf_counter() - t0, 1))
                    record[stage.name] = {"done": True, "metrics": metrics}
                    if is_main:
                        _write_record(root, pipeline.name, record)
                results[stage.name] = StageResult(stage.name, root, None, metrics)
                continue
            cfg = cfgs[stage.name]
            if stage.prepare is not None:
                cfg = stage.prepare(cfg, results)
            fp = fingerprint(cfg)
            if done.get("done"):
                if done.get("fingerprint") != fp:
                    raise ConfigError(
                        f"phase {stage.name!r} finished in {sub} with another config (changed "
                        "overrides or --steps?); the later stages were built on it. Use a new "
                        f"--workdir, or delete {sub} and {os.path.join(root, RECORD_FILE)}")
                log(f"{stage.name}: finished before ({cfg.steps} steps), result reused")
                metrics = done["metrics"]
            else:
                local_stop = None if stop_at is None else stop_at - offset
                if local_stop is not None and local_stop <= 0:
                    return _stopped(offset, last_loss, stop_at, stage.name, log)
                if local_stop is not None and local_stop >= cfg.steps:
                    local_stop = None
                log(f"{stage.name}: training {cfg.steps} steps in {sub}")
                metrics = _jsonable(train(cfg, sub, stop_at=local_stop, mesh_spec=mesh_spec,
                                          json_output=json_output, force_unlock=force_unlock))
                if "stopped" in metrics:
                    return _stopped(offset + int(metrics["step"]), metrics.get("train_loss"),
                                    stop_at, stage.name, log)
                record[stage.name] = {"done": True, "fingerprint": fp, "metrics": metrics}
                if is_main:
                    _write_record(root, pipeline.name, record)
            results[stage.name] = StageResult(stage.name, sub, cfg, metrics)
            offset += cfg.steps
            last_loss = metrics.get("train_loss")
            phase_info[stage.name] = {"steps": cfg.steps, "workdir": sub,
                                      "wall_time_s": metrics.get("wall_time_s")}
        summary = dict(pipeline.summarize(results))
        summary.update({"step": offset, "train_loss": last_loss, "phases": phase_info,
                        "workdir": root})
        return summary
    finally:
        if lock is not None:
            lock.release()


def _stopped(step: int, loss: Any, stop_at: int, phase: str, log) -> dict[str, Any]:
    log(f"stopped by --stop-at {stop_at} at global step {step} (phase {phase}); run the same "
        "command again without --stop-at to resume")
    return {"step": step, "train_loss": loss, "stopped": f"--stop-at {stop_at}", "phase": phase}


def load_pipeline(path: str) -> Pipeline | None:
    """The file's `get_pipeline()`, or None when it defines none (a single-run experiment)."""
    from mmjax.train.experiment import load_module

    module = load_module(path)
    if not hasattr(module, "get_pipeline"):
        return None
    pipeline = module.get_pipeline()
    if not isinstance(pipeline, Pipeline):
        raise ConfigError(f"{path}: get_pipeline() must return a mmjax.train.pipeline.Pipeline, "
                          f"got {type(pipeline).__name__}")
    return pipeline
