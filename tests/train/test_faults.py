"""Fault injection for the training stack: a workdir has one writer, and an unreadable checkpoint
never ends a run. Every test breaks a copy of one small run (6 steps, checkpoints at 2 and 4,
stopped after 4) and checks that nothing is lost beyond the last good step and that the resumed
run's losses equal those of one uninterrupted 6-step run.

Speed: the 8 resumed runs and the subprocesses compile the same train step, so the module turns
on JAX's persistent compilation cache in a temporary directory (the first run compiles, the
others load; ~2 s a run instead of ~17 s) and restores the setting afterwards."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from mmjax import checkpoint
from mmjax.cli import main
from mmjax.train import run
from mmjax.train.checkpointing import Checkpointer
from mmjax.train.metrics import read_metrics
from mmjax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError, read_lock

from support import LLM_TEXT, ROOT, tiny_overrides

STEPS, STOP, EVERY = 6, 4, 2


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    import jax
    from jax._src import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    for n, v in zip(names, (cache, 0, 0)):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


def _overrides(corpus):
    # no end-of-run sample: its decoding loop would be one more compile per run
    return tiny_overrides(corpus, checkpoint_every=EVERY, keep_checkpoints=3, eval_at_start=False,
                          **{"sample.max_new_tokens": 0})


def train_losses(workdir):
    """step -> train_loss from metrics.jsonl (a resumed run rewrites steps: keep the last)."""
    return {r["step"]: r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r}


@pytest.fixture(scope="module")
def runs(corpus, compile_cache, tmp_path_factory):
    """{"reference": step -> loss of one uninterrupted 6-step run, "base": that run as it stood
    after step 4 (checkpoints 2 and 4, metrics up to step 4): what `--stop-at 4` leaves, made
    without a second training run (training is deterministic, so the checkpoints are the same)."""
    root = tmp_path_factory.mktemp("faults")
    ref = str(root / "reference")
    run(LLM_TEXT, workdir=ref, steps=STEPS, overrides=_overrides(corpus))
    base = str(root / "base")
    shutil.copytree(ref, base)
    shutil.rmtree(os.path.join(base, "checkpoints", str(STEPS)))
    with open(os.path.join(base, "metrics.jsonl"), "w") as f:
        for r in read_metrics(ref):
            if r["step"] <= STOP and "train_loss" in r:
                f.write(json.dumps(r) + "\n")
    assert sorted(int(s) for s in os.listdir(os.path.join(base, "checkpoints"))) == [2, 4]
    return {"reference": train_losses(ref), "base": base, "corpus": corpus, "env": compile_cache}


@pytest.fixture
def wd(runs, tmp_path):
    path = str(tmp_path / "wd")
    shutil.copytree(runs["base"], path)
    return path


def _resume(runs, wd, from_step):
    """Resume `wd` to the end; the records the resumed run appends are exactly steps
    from_step+1 .. 6 with the uninterrupted run's losses."""
    before = len(read_metrics(wd))
    final = run(LLM_TEXT, workdir=wd, steps=STEPS, overrides=_overrides(runs["corpus"]))
    assert final["step"] == STEPS
    new = [r for r in read_metrics(wd)[before:] if "train_loss" in r]
    assert [r["step"] for r in new] == list(range(from_step + 1, STEPS + 1))
    for r in new:
        want = runs["reference"][r["step"]]
        assert r["train_loss"] == pytest.approx(want, rel=1e-6, abs=1e-6), (r, want)
    assert not os.path.exists(os.path.join(wd, LOCK_FILE))  # released at the end
    return final


def _step_dir(wd, step):
    return os.path.join(wd, "checkpoints", str(step))


def _data_file(wd, step, item="params"):
    d = os.path.join(_step_dir(wd, step), item, "ocdbt.process_0", "d")
    return os.path.join(d, sorted(os.listdir(d))[0])


def _truncate(wd):
    with open(_data_file(wd, STOP), "r+b") as f:
        f.truncate(10)


def _flip_bit(wd):
    path = _data_file(wd, STOP, "train")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _drop_commit_marker(wd):
    os.remove(os.path.join(_step_dir(wd, STOP), "commit_success.txt"))


def _other_model(wd):
    """Step 4 replaced by a step of another model (embedding width 48, not 32), as if copied in
    from another run: intact files with their own manifest, so the tree/shape check must catch
    it, not the checksum."""
    import numpy as np
    import orbax.checkpoint as ocp

    from mmjax.train.state import TrainState

    ours = Checkpointer(os.path.join(wd, "checkpoints"), keep=10)
    try:
        out = ours._manager.restore(STOP, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore(),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    finally:
        ours.close()
    params = dict(out["params"])
    params["embed"] = {"embedding": np.zeros((512, 48), np.float32)}
    state = TrainState(step=out["train"]["step"], params=params,
                       opt_state=out["train"]["opt_state"], rng=out["train"]["rng"])
    other_dir = os.path.join(os.path.dirname(wd), "other_model")
    other = Checkpointer(other_dir, keep=10)
    try:
        other.save(STOP, state, data_state=out["data"]["iterator"])
    finally:
        other.close()
    shutil.rmtree(_step_dir(wd, STOP))
    shutil.copytree(os.path.join(other_dir, str(STOP)), _step_dir(wd, STOP))


FAULTS = {"truncated": (_truncate, "truncated"), "bit_flip": (_flip_bit, "sha256"),
          "no_commit_marker": (_drop_commit_marker, "commit marker"),
          "other_model": (_other_model, "different model")}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_an_unreadable_latest_step_falls_back_to_the_previous_one(fault, runs, wd, capsys):
    inject, why = FAULTS[fault]
    inject(wd)
    # `mmjax check` names the bad step and exits 1; generate falls back and says so
    assert main(["check", wd]) == 1
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()]
    assert lines[1][:3] == ["step", str(STOP), "UNREADABLE:"] and why in out.splitlines()[1], out
    assert lines[2] == ["step", "2", "readable"], out
    _, _, params = checkpoint.load_workdir(wd)  # what generate / export read
    assert f"checkpoint step {STOP}:" in capsys.readouterr().err
    if fault == "truncated":  # the commands themselves (one fault is enough: same function)
        before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
        assert main(["export", wd, os.path.join(os.path.dirname(wd), "hf")]) == 0
        assert main(["generate", "--workdir", wd, "--prompt", "The", "--max-new-tokens", "2"]) == 0
        err = capsys.readouterr().err
        assert err.count(f"checkpoint step {STOP}: ") == 2 and "using step 2" in err, err
        assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before  # read-only
    # training resumes from step 2, exactly as an uninterrupted run
    _resume(runs, wd, 2)
    log = capsys.readouterr().out
    line = [ln for ln in log.splitlines() if ln.startswith(f"checkpoint step {STOP} is unreadable")]
    assert len(line) == 1 and why in line[0] and "resuming from step 2" in line[0], log
    aside = os.listdir(os.path.join(wd, checkpoint.WORKDIR_UNREADABLE_DIR))
    assert len(aside) == 1 and aside[0].startswith(f"{STOP}-")  # kept, not deleted
    with open(os.path.join(wd, checkpoint.WORKDIR_UNREADABLE_DIR, aside[0], "reason.txt")) as f:
        assert why in f.read()
    ckpt = Checkpointer(os.path.join(wd, "checkpoints"), keep=10)
    try:  # the new run's steps, all verified; the bad one is out of Orbax's sight
        assert sorted(ckpt.all_steps()) == [2, 4, 6]
        assert all(ckpt.verify(s) is None for s in (2, 4, 6))
    finally:
        ckpt.close()


def test_no_readable_step_is_one_line_and_exit_2_and_nothing_moves(runs, wd, capsys):
    _truncate(wd)
    with open(_data_file(wd, 2), "r+b") as f:
        f.truncate(5)
    args = ["train", LLM_TEXT, "--workdir", wd, "--steps", str(STEPS)]
    for o in _overrides(runs["corpus"]):
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmjax train: error: no readable checkpoint"), err
    assert "step 4:" in err[0] and "step 2:" in err[0]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
    assert not os.path.exists(os.path.join(wd, checkpoint.WORKDIR_UNREADABLE_DIR))
    assert not os.path.exists(os.path.join(wd, LOCK_FILE))
    assert main(["generate", "--workdir", wd, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable checkpoint" in err[0], err


def test_a_metrics_line_cut_mid_write_is_skipped_and_appending_starts_a_clean_line(runs, wd):
    path = os.path.join(wd, "metrics.jsonl")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) - 25])  # the last record (step 4) loses its end and newline
    _resume(runs, wd, STOP)
    with open(path) as f:
        lines = f.read().splitlines()
    broken = [ln for ln in lines if not _is_json(ln)]
    assert len(broken) == 1 and lines.index(broken[0]) < len(lines) - 1  # alone on its line


def _is_json(line):
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def test_a_missing_tokenizer_is_retrained_identically_or_refused(runs, wd, capsys):
    tok = os.path.join(wd, "tokenizer.model")
    with open(tok, "rb") as f:
        original = f.read()
    os.remove(tok)
    # generate cannot work without it: one line, exit 2
    assert main(["generate", "--workdir", wd, "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer.model" in err[0], err
    # training retrains it from the corpus (seeded: the same file) and checks it against the
    # sha256 the checkpoint recorded before going on
    _resume(runs, wd, STOP)
    assert "retrained it from the corpus and it is identical" in capsys.readouterr().out
    with open(tok, "rb") as f:
        assert f.read() == original
    # a tokenizer that is not the checkpoint's is refused (one error), never trained on
    ckpt_meta = os.path.join(_step_dir(wd, STEPS), "meta", "metadata")
    with open(ckpt_meta) as f:
        meta = json.load(f)
    meta["files"]["tokenizer.model"] = "0" * 64
    with open(ckpt_meta, "w") as f:
        json.dump(meta, f)
    os.remove(os.path.join(_step_dir(wd, STEPS), checkpoint.STEP_MANIFEST))
    args = ["train", LLM_TEXT, "--workdir", wd, "--steps", str(STEPS + 1)]
    for o in _overrides(runs["corpus"]):
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the tokenizer checkpoint step 6 was trained with" in err[0]


# --- one writer per workdir ----------------------------------------------------------------------

def _train_cmd(runs, wd, *extra):
    args = [sys.executable, "-m", "mmjax", "train", LLM_TEXT, "--workdir", wd,
            "--steps", str(STEPS)]
    for o in _overrides(runs["corpus"]):
        args += ["--set", o]
    return args + list(extra)


def _start_and_pause_when_locked(runs, wd):
    """A real `mmjax train` subprocess, stopped (SIGSTOP) as soon as it holds the lock."""
    env = {**os.environ, **runs["env"], "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(runs, wd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    t0 = time.time()
    while not os.path.exists(os.path.join(wd, LOCK_FILE)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 120, "the run never took the lock"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    return proc, env


def test_a_second_run_on_the_same_workdir_is_refused_naming_the_first(runs, wd):
    first, env = _start_and_pause_when_locked(runs, wd)
    try:
        second = subprocess.run(_train_cmd(runs, wd), capture_output=True, text=True, env=env,
                                cwd=ROOT, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmjax train: error: workdir"), err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err[0], err
        first.send_signal(signal.SIGCONT)
        out, err1 = first.communicate(timeout=180)
        assert first.returncode == 0, err1[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    # one run's records only: every step once (1-4 from the base, 5-6 from the first run),
    # the losses of the reference run
    steps = [r["step"] for r in read_metrics(wd) if "train_loss" in r]
    assert steps == list(range(1, STEPS + 1))
    got = train_losses(wd)
    for s, want in runs["reference"].items():
        assert got[s] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert not os.path.exists(os.path.join(wd, LOCK_FILE))


def test_the_lock_of_a_run_killed_with_sigkill_is_taken_over(runs, wd, capsys):
    killed, _ = _start_and_pause_when_locked(runs, wd)  # resuming the base copy
    killed.kill()
    killed.wait(30)
    held = read_lock(wd)
    assert held["pid"] == killed.pid and held["host"] == socket.gethostname()
    assert main(["check", wd]) == 0
    out = capsys.readouterr().out
    assert f"pid {killed.pid}" in out and "no longer exists" in out, out
    _resume(runs, wd, STOP)  # takes the lock over, resumes from step 4, finishes
    log = capsys.readouterr().out
    assert f"took over the lock of {wd} from pid {killed.pid}" in log, log
    assert "resumed from" in log and "at step 4" in log


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_timeout(tmp_path, monkeypatch):
    wd = str(tmp_path)
    now = time.time()

    def plant(heartbeat):
        with open(os.path.join(wd, LOCK_FILE), "w") as f:
            json.dump({"host": "gpu-node-7", "pid": 4242, "start_time": now - 3600,
                       "heartbeat": heartbeat, "token": "x"}, f)

    plant(now - 30)  # alive: refused, naming host, pid and start time
    with pytest.raises(WorkdirLockedError) as e:
        WorkdirLock(wd).acquire()
    assert "pid 4242 on host gpu-node-7 (started " in str(e.value)
    assert "--force-unlock" in str(e.value)
    lines = []
    lock = WorkdirLock(wd).acquire(force=True, log=lines.append)  # the user knows better
    assert read_lock(wd)["pid"] == os.getpid() and "--force-unlock" in lines[0]
    lock.release()
    assert read_lock(wd) is None
    monkeypatch.setenv("MMJAX_LOCK_STALE_S", "60")
    plant(now - 61)  # no heartbeat for longer than the limit: taken over with a warning
    lines = []
    lock = WorkdirLock(wd, heartbeat_s=0.05).acquire(log=lines.append)
    assert "heartbeat is 61 s old" in lines[0], lines
    beat = read_lock(wd)["heartbeat"]
    time.sleep(0.3)
    assert read_lock(wd)["heartbeat"] > beat  # the heartbeat thread refreshes it
    lock.release()
    assert read_lock(wd) is None
