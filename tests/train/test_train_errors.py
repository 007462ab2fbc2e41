"""Training fails loudly and loses nothing: an incompatible workdir, a too-small dataset, a NaN
loss, a disk that refuses the checkpoint. Each is one clear error; the last good checkpoint
stays readable and a fixed run resumes from it."""

import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from mmjax.errors import MmjaxError
from mmjax.train import run
from mmjax.train.checkpointing import Checkpointer
from mmjax.train.errors import DataError, IncompatibleCheckpointError, NonFiniteLossError

from support import LLM_TEXT, ROOT, tiny_overrides


def _params_finite(ckpt_dir: str) -> tuple[int, bool]:
    ckpt = Checkpointer(ckpt_dir, keep=100)
    try:
        step = ckpt.latest_step()
        params = ckpt.restore_params(step)
        leaves = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(params)]
        return step, all(np.isfinite(x).all() for x in leaves)
    finally:
        ckpt.close()


def test_workdir_of_another_model_names_the_differing_shapes(corpus, tmp_path):
    wd = str(tmp_path / "wd")
    run(LLM_TEXT, workdir=wd, steps=2, overrides=tiny_overrides(corpus))
    with pytest.raises(IncompatibleCheckpointError) as e:
        run(LLM_TEXT, workdir=wd, steps=4, overrides=tiny_overrides(corpus, **{"model.dim": 48}))
    msg = str(e.value)
    assert "different model" in msg and "(512, 32)" in msg and "(512, 48)" in msg, msg


@pytest.mark.parametrize("text", ["", "tiny corpus " * 20])
def test_empty_or_too_small_corpus(text, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(text)
    with pytest.raises(MmjaxError) as e:
        run(LLM_TEXT, workdir=str(tmp_path / "wd"), steps=2,
            overrides=tiny_overrides(str(path), **{"data.vocab_size": 300}))
    assert isinstance(e.value, DataError), e.value
    assert str(path) in str(e.value) and ("empty" in str(e.value) or "fewer" in str(e.value))


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    wd = str(tmp_path / "wd")
    # a learning rate of 1e9 blows the params up within a few steps
    overrides = tiny_overrides(corpus, **{"optimizer.learning_rate": 1e9, "optimizer.warmup_steps": 0,
                                          "optimizer.grad_clip": None, "checkpoint_every": 1,
                                          "keep_checkpoints": 3})
    with pytest.raises(NonFiniteLossError) as e:
        run(LLM_TEXT, workdir=wd, steps=50, overrides=overrides)
    bad_step = e.value.step
    assert f"at step {bad_step}" in str(e.value) and "last good checkpoint" in str(e.value)
    kept, finite = _params_finite(os.path.join(wd, "checkpoints"))
    assert kept is not None and kept < bad_step and finite


def test_a_checkpoint_the_disk_refuses_is_a_clear_error_and_the_previous_one_survives(corpus, tmp_path):
    wd = str(tmp_path / "wd")
    overrides = tiny_overrides(corpus, checkpoint_every=2)
    run(LLM_TEXT, workdir=wd, steps=2, overrides=overrides)  # step 2 saved normally
    args = [sys.executable, "-m", "mmjax", "train", LLM_TEXT, "--workdir", wd, "--steps", "4"]
    for o in overrides:
        args += ["--set", o]
    # A real write failure: every file the resumed run writes may hold at most 24 KiB
    # (`ulimit -f`, SIGXFSZ ignored so the write fails with EFBIG instead of killing the
    # process). The embedding alone (512 x 32 float32 = 64 KiB) cannot be written.
    script = "ulimit -f 24; trap '' XFSZ; exec " + " ".join(shlex.quote(a) for a in args)
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 2, p.stderr[-3000:]
    # exactly one line of ours (Orbax / tensorstore also log their own diagnostics, some from
    # background threads, possibly after it)
    ours = [l for l in p.stderr.splitlines() if l.startswith("mmjax train: error:")]
    assert len(ours) == 1, p.stderr[-3000:]
    assert "could not write" in ours[0] and "File too large" in ours[0], ours[0]
    assert "previous checkpoint (step 2) is intact" in ours[0], ours[0]
    kept, finite = _params_finite(os.path.join(wd, "checkpoints"))
    assert kept == 2 and finite
    # with the disk fixed, the same command resumes from step 2 and finishes
    metrics = run(LLM_TEXT, workdir=wd, steps=4, overrides=overrides)
    assert metrics["step"] == 4 and math.isfinite(metrics["train_loss"])
