"""Orbax checkpoints of a training run: async save, keep the last N plus the best, crash-safe.

Each step directory holds four items:
  params  the model params (all `load_for_inference` needs)
  train   {"step", "opt_state", "rng"} and, for a task with its own state (BLIP's momentum
          encoder and queues, `TrainState.task_state`), "task_state"
  data    the data iterator's state (JSON); in a multi-process job every process's own state
          (gathered to the primary, which writes the JSON), each process restores its own
  meta    {"step", "metrics", "config"} (JSON)

Orbax writes a step into a temporary directory and renames it only once every item is
complete, so a process killed mid-save leaves the previous step as the latest readable one.

Once a save is committed the primary process adds `mmjax_manifest.json` (size and sha256 of
every file; `mmjax.checkpoint.write_step_manifest`). Resuming (`restore_latest`) verifies the
newest step before trusting it: the commit markers, the manifest, the saved tree and shapes
against this run's, then a read of every array and JSON item. A step that fails is named with
its reason in one line, moved out of Orbax's sight to `<workdir>/checkpoints_unreadable/` (kept
for a post-mortem, never deleted) and the next older step is tried; its data-iterator state is
restored with it, so the run continues exactly as an uninterrupted run from that step. Only
when every step fails is it an error (CheckpointError, or IncompatibleCheckpointError when
every step belongs to another model/optimizer: then the config changed, not the files, and
nothing is moved).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmjax.checkpoint import (
    WORKDIR_UNREADABLE_DIR,
    check_step_files,
    one_line,
    write_step_manifest,
)
from mmjax.train.errors import CheckpointError, IncompatibleCheckpointError
from mmjax.train.optimizer import path_str
from mmjax.train.state import TrainState

_pp = ocp.checkpoint_managers.preservation_policy


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with clear errors."""

    def __init__(
        self, directory: str, *, keep: int = 2, best_metric: str | None = None,
        best_mode: str = "min", async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        policies = [_pp.LatestN(keep)]
        if best_metric:
            # BestN sorts by the metric (descending when reverse=True) and keeps the LAST n:
            # reverse=True keeps the smallest value, reverse=False the largest.
            policies.append(_pp.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "min"), n=1,
                keep_checkpoints_without_metrics=False,
            ))
        self.best_metric = best_metric
        self._unmanifested: list[int] = []  # saved by this process, manifest not yet written
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    create=True, enable_async_checkpointing=async_save,
                    preservation_policy=_pp.AnyPreservationPolicy(policies),
                ),
                item_handlers={
                    "params": ocp.StandardCheckpointHandler(),
                    "train": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from None

    # --- queries ---------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    # --- save ------------------------------------------------------------------------------
    def save(
        self, step: int, state: TrainState, *, data_state: Any = None,
        metrics: dict[str, float] | None = None, config: dict[str, Any] | None = None,
        force: bool = False, files: dict[str, str] | None = None,
    ) -> bool:
        """Start an async save of `state` at `step`. Raises CheckpointError when it cannot.

        `files`: workdir file name -> sha256 of the files the checkpoint only makes sense with
        (the tokenizer), recorded in `meta` so a resumed run can tell a replaced one."""
        # wait for the previous async save first, so `previous` is a committed step
        self.wait()
        previous = self.latest_step()
        self._pending_previous = previous
        clean_metrics = _jsonable(metrics or {})
        if self.best_metric and self.best_metric not in clean_metrics:
            clean_metrics = None  # BestN ignores it; LatestN still keeps it
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_item(state)),
            data=ocp.args.JsonSave(_jsonable({"iterator": data_state,
                                               **_per_process(data_state)})),
            meta=ocp.args.JsonSave(_jsonable({"step": step, "metrics": metrics or {},
                                               "config": config or {}, "files": files or {}})),
        )
        try:
            saved = self._manager.save(step, args=args, metrics=clean_metrics, force=force)
        except Exception as e:  # noqa: BLE001 - any storage failure becomes one clear error
            raise self._save_error(step, previous, e) from None
        if saved:
            self._unmanifested.append(step)
        return saved

    def wait(self) -> None:
        """Block until the pending async save is committed; raise CheckpointError if it failed.

        (Orbax reports a step as latest as soon as its save starts, so the step committed
        before it was recorded when that save began.)"""
        previous = getattr(self, "_pending_previous", None)
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._unmanifested = []
            raise self._save_error(None, previous, e) from None
        finally:
            self._pending_previous = None
        self._write_manifests()

    def _write_manifests(self) -> None:
        """Manifests of the steps this process saved and Orbax has committed since (primary
        process only; a step the preservation policy already deleted is skipped)."""
        steps, self._unmanifested = self._unmanifested, []
        if jax.process_index() != 0:
            return
        for step in steps:
            step_dir = os.path.join(self.directory, str(step))
            if os.path.isdir(step_dir):
                try:
                    write_step_manifest(step_dir)
                except OSError as e:  # the step itself is committed and readable
                    print(f"warning: could not write the manifest of checkpoint step {step}: "
                          f"{e}", flush=True)

    def _save_error(self, step, previous, exc) -> CheckpointError:
        what = f"step {step}" if step is not None else "the pending checkpoint"
        kept = (f"the previous checkpoint (step {previous}) is intact" if previous is not None
                else "no earlier checkpoint exists")
        return CheckpointError(
            f"could not write {what} to {self.directory}: {type(exc).__name__}: {exc}; {kept}. "
            "Free disk space or fix the directory's permissions and run again to resume."
        )

    # --- restore ---------------------------------------------------------------------------
    def check_compatible(self, step: int, abstract: TrainState) -> None:
        """Raise IncompatibleCheckpointError listing params whose shapes differ."""
        try:
            saved = self._manager.item_metadata(step)["params"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read checkpoint step {step} in {self.directory}: {e}"
            ) from None
        saved_tree = getattr(saved, "tree", saved)
        saved_shapes = {
            path_str(p): tuple(m.shape)
            for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
        }
        want_shapes = {
            path_str(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
        }
        diffs = []
        for name in sorted(set(saved_shapes) | set(want_shapes)):
            s, w = saved_shapes.get(name), want_shapes.get(name)
            if s != w:
                diffs.append(f"{name}: checkpoint {s if s is not None else 'absent'} vs "
                             f"config {w if w is not None else 'absent'}")
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
            raise IncompatibleCheckpointError(
                f"workdir checkpoint {self.directory} (step {step}) was written for a different "
                f"model: {shown}. Use another --workdir or delete this one."
            )

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, Any, dict[str, Any]]:
        """(state, data iterator state, meta) of `step`, laid out as `abstract`'s shardings."""
        self.check_compatible(step, abstract)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            train=ocp.args.StandardRestore(_train_item(abstract)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - structure mismatches are caught by `verify`
            raise CheckpointError(
                f"cannot read checkpoint step {step} in {self.directory}: {one_line(e)}"
            ) from None
        train = out["train"]
        state = TrainState(step=train["step"], params=out["params"],
                           opt_state=train["opt_state"], rng=train["rng"],
                           task_state=train.get("task_state"))
        return state, _own_data_state(out["data"]), out["meta"]

    def verify(self, step: int, abstract: TrainState | None = None) -> str | None:
        """Why `step` cannot be trusted judged by its files and metadata (None when it can):
        commit markers, manifest, then (with `abstract`) the saved tree and shapes. Raises
        IncompatibleCheckpointError when the step holds another model or optimizer."""
        reason = check_step_files(os.path.join(self.directory, str(step)),
                                  items=("params", "train", "data", "meta"))
        if reason is not None or abstract is None:
            return reason
        self.check_compatible(step, abstract)
        try:
            saved = self._manager.item_metadata(step)["train"]
        except Exception as e:  # noqa: BLE001
            return f"its metadata cannot be read ({one_line(e)})"
        saved = getattr(saved, "tree", saved)
        want = _train_item(abstract)
        got_s = {path_str(p): tuple(m.shape) for p, m in _leaves(saved)}
        want_s = {path_str(p): tuple(a.shape) for p, a in _leaves(want)}
        if got_s != want_s:
            diff = sorted(k for k in set(got_s) | set(want_s) if got_s.get(k) != want_s.get(k))
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this run's optimizer "
                f"or task state (did the optimizer, freeze or task-state settings, e.g. "
                f"data.momentum, change?): {len(diff)} entries "
                f"differ, e.g. {diff[0]}: checkpoint {got_s.get(diff[0], 'absent')} vs run "
                f"{want_s.get(diff[0], 'absent')}")
        return None

    def restore_latest(
        self, abstract: TrainState, log: Callable[[str], None] = print,
    ) -> tuple[int, TrainState, Any, dict[str, Any]] | None:
        """(step, state, data iterator state, meta) of the newest readable step; None when
        there is no step at all. Unreadable newer steps are named through `log` and set aside
        (see the module docstring); CheckpointError when no step is readable."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        incompatible: list[IncompatibleCheckpointError] = []
        for step in steps:
            try:
                reason = self.verify(step, abstract)
            except IncompatibleCheckpointError as e:
                incompatible.append(e)
                reason = _first_clause(str(e))
            if reason is None:
                try:
                    state, data_state, meta = self.restore(step, abstract)
                except IncompatibleCheckpointError as e:
                    incompatible.append(e)
                    reason = _first_clause(str(e))
                except Exception as e:  # noqa: BLE001 - a read failure of any kind
                    reason = f"its arrays cannot be read ({one_line(e)})"
                else:
                    for b_step, b_reason in bad:
                        where = self.set_aside(b_step, b_reason)
                        log(f"checkpoint step {b_step} is unreadable: {b_reason}; resuming from "
                            f"step {step} instead (the bad step is kept in {where})")
                    return step, state, data_state, meta
            bad.append((step, reason))
        if len(incompatible) == len(steps):  # the run's config changed, not the files
            raise incompatible[0]
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {r}" for s, r in bad)
            + ". Nothing was moved; start over in a new --workdir (or delete this one)")

    def set_aside(self, step: int, reason: str) -> str:
        """Move step `step` to `<workdir>/checkpoints_unreadable/<step>-<time>/` (primary process;
        the others wait for it) with `reason.txt`, and make Orbax forget it. Returns where."""
        workdir = os.path.dirname(self.directory)
        target = os.path.join(workdir, WORKDIR_UNREADABLE_DIR,
                              f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
            with open(os.path.join(target, "reason.txt"), "w") as f:
                f.write(reason + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()
        return target

    def restore_params(self, step: int | None = None, abstract_params: Any = None) -> Any:
        """Only the params of `step` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        restore = (ocp.args.StandardRestore(abstract_params) if abstract_params is not None
                   else ocp.args.StandardRestore())
        return self._manager.restore(step, args=ocp.args.Composite(params=restore))["params"]

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
            self._write_manifests()
        finally:
            self._manager.close()


def _train_item(state: TrainState) -> dict[str, Any]:
    """The "train" item of `state` (arrays or their abstract targets): step, optimizer state,
    RNG, and the task state when the task has one."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if state.task_state is not None:
        item["task_state"] = state.task_state
    return item


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _first_clause(message: str) -> str:
    """'was written for a different model: ...' -> the start of it, for a one-line summary."""
    return message if len(message) <= 300 else message[:297] + "..."


def _per_process(data_state: Any) -> dict[str, Any]:
    """{"per_process": [state of process 0, 1, ...]} in a multi-process job (every process must
    call this: it is a collective), {} otherwise. Orbax's JSON items are written by the primary
    process only, so the other processes' iterator states travel to it first."""
    if jax.process_count() == 1:
        return {}
    import json

    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(_jsonable(data_state)).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return {"per_process": [json.loads(gathered[i, :n].tobytes()) for i, n in enumerate(sizes)]}


def _own_data_state(saved: dict[str, Any]) -> Any:
    """This process's iterator state; when the process count changed since the save, the
    primary's (data sharded by process cannot continue exactly on another count)."""
    states = saved.get("per_process")
    if states and len(states) == jax.process_count():
        return states[jax.process_index()]
    return saved.get("iterator")


def _jsonable(x: Any) -> Any:
    """numpy / jax scalars and arrays -> Python numbers and lists; bytes -> latin-1 str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, bytes):
        return x.decode("latin-1")
    return x


def check_workdir(workdir: str) -> dict[str, Any]:
    """What `mmjax check WORKDIR` reports, reading only (no lock taken, nothing moved):

        {"workdir", "steps": [{"step", "readable", "reason"}, ...] newest first, "note",
         "latest_readable": bool | None, "set_aside": [names], "lock": {...} | None}

    Each step is verified like a resume verifies it, without the experiment config: commit
    markers and manifest, the params' tree and shapes against the workdir's `mmjax_model.json`,
    then a read of every item (arrays restored on one device, as saved). A model this version
    cannot build (an unknown family) skips the shape comparison, said in "note", rather than
    calling every step unreadable."""
    import orbax.checkpoint as ocp

    from mmjax import checkpoint as ck
    from mmjax.errors import InputError
    from mmjax.models import abstract_params, build_model
    from mmjax.train.workdir_lock import describe_owner, read_lock, why_stale

    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise InputError(f"workdir {workdir} does not exist")
    if not ck.is_workdir(workdir):
        raise InputError(f"{workdir} is not a training workdir (no {ck.WORKDIR_MODEL_FILE})")
    spec = ck.read_workdir_info(workdir)
    try:
        module, config = build_model(spec.get("family"), spec.get("config") or {})
        target = abstract_params(spec.get("family"), module, config)
    except Exception as e:  # noqa: BLE001 - the report says so instead of stopping
        target, model_error = None, one_line(e)
    else:
        model_error = None
    ckpt_dir = os.path.join(workdir, ck.WORKDIR_CHECKPOINT_DIR)
    steps = ck.checkpoint_steps(ckpt_dir)
    rows = []
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if steps:
        manager = ocp.CheckpointManager(
            ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "train": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        try:
            for step in steps:
                reason = ck.check_step_files(os.path.join(ckpt_dir, str(step)),
                                             items=("params", "train", "data", "meta"))
                if reason is None and target is not None:
                    reason = ck._params_mismatch(manager, step, target)
                if reason is None:
                    reason = _read_every_item(manager, step, device)
                rows.append({"step": step, "readable": reason is None, "reason": reason})
        finally:
            manager.close()
    aside_dir = os.path.join(workdir, ck.WORKDIR_UNREADABLE_DIR)
    lock = read_lock(workdir)
    if lock is not None:
        stale = why_stale(lock)
        lock = {**lock, "owner": describe_owner(lock), "stale": stale}
    return {"workdir": workdir, "steps": rows,
            "note": (None if model_error is None else
                     f"shapes not compared: the workdir's model cannot be built ({model_error})"),
            "latest_readable": rows[0]["readable"] if rows else None,
            "set_aside": sorted(os.listdir(aside_dir)) if os.path.isdir(aside_dir) else [],
            "lock": lock}


def _read_every_item(manager: Any, step: int, device: Any) -> str | None:
    """Restore every item of `step` (arrays onto `device`); why it failed, or None."""
    try:
        meta = manager.item_metadata(step)
        args = {}
        for name in ("params", "train"):
            tree = getattr(meta[name], "tree", meta[name])
            args[name] = ocp.args.StandardRestore(jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree))
        args["data"] = ocp.args.JsonRestore()
        args["meta"] = ocp.args.JsonRestore()
        out = manager.restore(step, args=ocp.args.Composite(**args))
        for leaf in jax.tree_util.tree_leaves((out["params"], out["train"])):
            np.asarray(leaf)  # every byte read back
    except Exception as e:  # noqa: BLE001
        return f"it cannot be read ({one_line(e)})"
    return None
