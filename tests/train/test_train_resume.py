"""Training runs end to end: resume equals an uninterrupted run, kills never corrupt checkpoints,
SIGTERM saves and exits cleanly, and the workdir holds what a person wants to look at."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmjax.train import run
from mmjax.train.metrics import read_metrics

from support import LLM_TEXT, ROOT, tiny_overrides  # noqa: F401


def train_losses(workdir):
    """step -> train_loss from metrics.jsonl (a resumed run may rewrite a step: keep the last)."""
    return {r["step"]: r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r}


def test_stop_and_resume_gives_the_same_losses_as_one_run(corpus, tmp_path):
    straight = run(LLM_TEXT, workdir=str(tmp_path / "a"), steps=8, overrides=tiny_overrides(corpus))
    first = run(LLM_TEXT, workdir=str(tmp_path / "b"), steps=8, stop_at=4,
                overrides=tiny_overrides(corpus))
    assert first["step"] == 4 and first.get("stopped") == "--stop-at 4"
    resumed = run(LLM_TEXT, workdir=str(tmp_path / "b"), steps=8, overrides=tiny_overrides(corpus))
    assert resumed["step"] == 8
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(1, 9):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), (s, a[s], b[s])
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)
    # what a person wants to look at is there
    for name in ("metrics.jsonl", "loss_curve.png", "tokenizer.model", "mmjax_model.json",
                 "samples.txt"):
        assert os.path.isfile(tmp_path / "b" / name), name
    assert os.listdir(tmp_path / "b" / "tensorboard")
    # running a finished job again re-evaluates without training or failing on the saved step
    again = run(LLM_TEXT, workdir=str(tmp_path / "b"), steps=8, overrides=tiny_overrides(corpus))
    assert again["step"] == 8 and again["val_loss"] == pytest.approx(resumed["val_loss"], rel=1e-6)


def _train_cmd(corpus, workdir, steps, **extra):
    args = [sys.executable, "-m", "mmjax", "train", LLM_TEXT, "--workdir", str(workdir),
            "--steps", str(steps)]
    for item in tiny_overrides(corpus, **extra):
        args += ["--set", item]
    return args


def _wait_for(predicate, timeout, proc):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _checkpoint_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_kill_during_saves_never_corrupts_the_latest_checkpoint(corpus, tmp_path):
    """SIGKILL a run that checkpoints every step, then resume: the latest readable checkpoint loads."""
    workdir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(corpus, workdir, 400, checkpoint_every=1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert _wait_for(lambda: len(_checkpoint_steps(workdir)) >= 2, 240, proc), \
            proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoints"
        time.sleep(0.37)  # somewhere inside the save cycle
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps_before = _checkpoint_steps(workdir)
    assert steps_before
    out = subprocess.run(_train_cmd(corpus, workdir, max(steps_before) + 2, checkpoint_every=1)
                         + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stderr
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["step"] == max(steps_before) + 2


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(corpus, tmp_path):
    workdir = tmp_path / "term"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    metrics = os.path.join(workdir, "metrics.jsonl")
    proc = subprocess.Popen(_train_cmd(corpus, workdir, 100_000), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert _wait_for(lambda: len(train_losses(workdir)) >= 3 if os.path.exists(metrics)
                         else False, 240, proc), "training never logged"
        proc.send_signal(signal.SIGTERM)
        out_text, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out_text + err
    steps = _checkpoint_steps(workdir)
    assert steps and steps[-1] >= 3
    out = subprocess.run(_train_cmd(corpus, workdir, steps[-1] + 1) + ["--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == steps[-1] + 1
