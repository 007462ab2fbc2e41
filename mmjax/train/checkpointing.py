"""Orbax checkpoints of a training run: async save, keep the last N plus the best, crash-safe.

Each step directory holds four items:
  params  the model params (all `load_for_inference` needs)
  train   {"step", "opt_state", "rng"}
  data    the data iterator's state (JSON); in a multi-process job every process's own state
          (gathered to the primary, which writes the JSON), each process restores its own
  meta    {"step", "metrics", "config"} (JSON)

Orbax writes a step into a temporary directory and renames it only once every item is
complete, so a process killed mid-save leaves the previous step as the latest readable one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

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
        force: bool = False,
    ) -> bool:
        """Start an async save of `state` at `step`. Raises CheckpointError when it cannot."""
        # wait for the previous async save first, so `previous` is a committed step
        self.wait()
        previous = self.latest_step()
        self._pending_previous = previous
        clean_metrics = _jsonable(metrics or {})
        if self.best_metric and self.best_metric not in clean_metrics:
            clean_metrics = None  # BestN ignores it; LatestN still keeps it
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(
                {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
            ),
            data=ocp.args.JsonSave(_jsonable({"iterator": data_state,
                                               **_per_process(data_state)})),
            meta=ocp.args.JsonSave(_jsonable({"step": step, "metrics": metrics or {},
                                               "config": config or {}})),
        )
        try:
            return self._manager.save(step, args=args, metrics=clean_metrics, force=force)
        except Exception as e:  # noqa: BLE001 - any storage failure becomes one clear error
            raise self._save_error(step, previous, e) from None

    def wait(self) -> None:
        """Block until the pending async save is committed; raise CheckpointError if it failed.

        (Orbax reports a step as latest as soon as its save starts, so the step committed
        before it was recorded when that save began.)"""
        previous = getattr(self, "_pending_previous", None)
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(None, previous, e) from None
        finally:
            self._pending_previous = None

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
            train=ocp.args.StandardRestore(
                {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
            ),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this run's optimizer "
                f"state (did the optimizer or freeze settings change?): {e}"
            ) from None
        train = out["train"]
        state = TrainState(step=train["step"], params=out["params"],
                           opt_state=train["opt_state"], rng=train["rng"])
        return state, _own_data_state(out["data"]), out["meta"]

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
        finally:
            self._manager.close()


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
