"""Multi-host training: `mmjax train` in 2 processes on localhost (jax.distributed with gloo CPU
collectives, 4 simulated devices each, one 8-device mesh across both), stopped and resumed,
gives the same per-step losses as the single-process 8-device run.

Both runs use a synthetic LM task defined here (registered into `mmjax.train.task.TASKS` by the
experiment file the test writes): every step's global batch is drawn from a seeded generator and
process p of P keeps rows [p*B/P, (p+1)*B/P), so the global batch does not depend on the number
of processes (the text pipeline shards documents by process instead, which changes the global
batch with the process count). Everything else is the real loop: distributed start-up from the
CLI flags, the mesh over both processes' devices, params created sharded across processes,
process-local rows assembled into global arrays, Orbax checkpoints written by both processes.

Tolerance: both runs execute the same 8-device program; only the collectives' implementation
(in-process vs gloo over TCP) and so the order of float32 sums may differ: losses agree to
~1e-7 relative (measured); we assert 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmjax.models.llama import Llama
from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
from mmjax.train.step import make_eval_step, shard_batch
from mmjax.train.task import Task

from support import ROOT, xla_flags  # noqa: E402
TESTS = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    seq_len: int = 16
    batch_size: int = 8  # global rows per step, split over processes
    seed: int = 0


class _Iterator:
    def __init__(self, cfg: SyntheticDataConfig, vocab: int):
        self.cfg, self.vocab, self.step = cfg, vocab, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = synthetic_batch(self.cfg, self.vocab, self.step)
        self.step += 1
        return process_rows(batch)

    def get_state(self):
        return {"step": self.step, "process": jax.process_index()}

    def set_state(self, state):
        if state["process"] != jax.process_index():  # each process must get its own state back
            raise AssertionError(f"process {jax.process_index()} got {state}")
        self.step = int(state["step"])


def synthetic_batch(cfg: SyntheticDataConfig, vocab: int, index: int) -> dict[str, np.ndarray]:
    """The global batch `index`: [batch_size, seq_len] arrays, the same in every process. Two
    batches alternate, so a step that sees a batch again shows whether the model learned."""
    rng = np.random.default_rng((cfg.seed, index % 2))
    b, t = cfg.batch_size, cfg.seq_len
    tok = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "loss_mask": (rng.random((b, t)) > 0.1).astype(np.float32)}


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows."""
    p, n = jax.process_index(), jax.process_count()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[p * rows:(p + 1) * rows] for k, v in batch.items()}


class SyntheticLMTask(Task):
    """Next-token loss of a LLaMA on seeded random tokens (process-count independent batches)."""

    family = "llama"
    unit = "tokens"
    trains = "lm"  # any family whose record lists "lm"
    data_config_class = SyntheticDataConfig

    def __init__(self, cfg, workdir, log=print):
        super().__init__(cfg, workdir, log)
        self.model_config = cfg.model
        self.model = Llama(cfg.model)
        self.init_params = lm_init_fn(self.model, cfg.data.seq_len)
        self.loss = lm_loss_fn(self.model)
        self.units_per_step = cfg.data.batch_size * cfg.data.seq_len

    def train_iterator(self):
        return _Iterator(self.cfg.data, self.cfg.model.vocab_size)

    def evaluate(self, params, mesh, *, final=False):
        held_out = dataclasses.replace(self.cfg.data, seed=self.cfg.data.seed + 1)
        batch = process_rows(synthetic_batch(held_out, self.cfg.model.vocab_size, 0))
        total, count, _ = make_eval_step(self.loss, mesh=mesh)(params, shard_batch(batch, mesh))
        return {"val_loss": float(total) / float(count)}


EXPERIMENT = textwrap.dedent('''
    import os, sys
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]  # this folder, and tests/ (support.py)
    from mmjax.train.task import TASKS
    TASKS["synthetic_lm"] = "test_multihost:SyntheticLMTask"
    from test_multihost import SyntheticDataConfig
    from mmjax.models.llama import LlamaConfig
    from mmjax.train.experiment import ExperimentConfig, OptimizerConfig

    def get_config():
        return ExperimentConfig(
            name="multihost", task="synthetic_lm", parallelism={parallelism!r},
            model=LlamaConfig(vocab_size=128, dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                              mlp_dim=64, max_len=32),
            data=SyntheticDataConfig(seq_len=16, batch_size=8, seed=0),
            optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
            steps={steps}, log_every=1, eval_every=0, eval_at_start=False, checkpoint_every=2,
            keep_best_metric=None)
''')


def write_experiment(tmp_path, parallelism="fsdp_tp", steps=4) -> str:
    path = tmp_path / f"multihost_{parallelism}.py"
    path.write_text(EXPERIMENT.format(tests=TESTS, parallelism=parallelism, steps=steps))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(experiment: str, workdir: str, mesh: str, extra=(), timeout=240):
    """`mmjax train` as processes 0 and 1 of a 2-process job; returns both (code, out, err)."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices=4),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mmjax", "train", experiment, "--workdir", workdir, "--mesh", mesh,
         "--json", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for i in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def train_losses(workdir) -> dict[int, float]:
    from mmjax.train.metrics import read_metrics

    return {r["step"]: r["train_loss"] for r in read_metrics(str(workdir)) if "train_loss" in r}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_two_processes_train_and_resume_like_one_process_with_8_devices(tmp_path):
    """2 processes x 4 devices, stopped after step 2 (`--stop-at`, Orbax checkpoint written by
    both processes) and resumed by the same command (each process gets its own data-iterator
    state back: the synthetic iterator raises otherwise), against one straight run of one
    process with 8 devices: the same per-step losses."""
    from mmjax.train.experiment import load_experiment
    from mmjax.train.loop import train

    exp = write_experiment(tmp_path)
    mesh = "fsdp=4,tensor=2"  # FSDP across the two processes, tensor parallel inside each
    first = run_two_processes(exp, str(tmp_path / "two"), mesh, extra=("--stop-at", "2"))
    for code, _, err in first:
        assert code == 0, err[-3000:]
    assert json.loads(first[0][1].strip().splitlines()[-1])["stopped"] == "--stop-at 2"
    assert "on mesh fsdp=4,tensor=2" in first[0][1] + first[0][2]
    second = run_two_processes(exp, str(tmp_path / "two"), mesh)
    for code, _, err in second:
        assert code == 0, err[-3000:]
    assert "resumed from" in second[0][1] + second[0][2]
    final = json.loads(second[0][1].strip().splitlines()[-1])
    assert final["step"] == 4

    single = train(load_experiment(exp), str(tmp_path / "one"), mesh_spec=mesh)
    two, one = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5), (s, one[s], two[s])
    assert one[3] < one[1] and one[4] < one[2]  # the same batches again: it learned
    assert final["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert final["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


def test_distributed_start_up_from_flags_or_environment(monkeypatch):
    from mmjax.errors import ConfigError
    from mmjax.parallel.distributed import resolve_distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "MMJAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_distributed() is None  # single process
    assert resolve_distributed("10.0.0.1:1234", 4, 3) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert resolve_distributed("auto") == {}  # JAX's cluster auto-detection
    monkeypatch.setenv("MMJAX_DISTRIBUTED", "auto")
    assert resolve_distributed() == {}
    monkeypatch.delenv("MMJAX_DISTRIBUTED")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert resolve_distributed() == {"coordinator_address": "host:99", "num_processes": 2,
                                     "process_id": 1}
    assert resolve_distributed(process_id=0)["process_id"] == 0  # flags win
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='x' is not an integer"):
        resolve_distributed()
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ConfigError, match="also give --num-processes and --process-id"):
        resolve_distributed()
    with pytest.raises(ConfigError, match=r"process id 2 not in \[0, 2\)"):
        resolve_distributed(process_id=2)
    with pytest.raises(ConfigError, match="must be host:port"):
        resolve_distributed("localhost", 2, 0)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with pytest.raises(ConfigError, match="need --coordinator"):
        resolve_distributed(num_processes=2)


def test_cli_multihost_flag_errors_exit_2(capsys, tmp_path):
    from mmjax.cli import main

    exp = write_experiment(tmp_path)
    code = main(["train", exp, "--workdir", str(tmp_path / "w"), "--coordinator", "127.0.0.1:1",
                 "--num-processes", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--process-id" in err, err
