"""Fixtures shared by the alignment task tests (dpo, reward, ppo): one tiny LM and one tiny SFT
model per test session, built once even when the files run on different xdist workers (a file
lock in the session's shared temp directory; the first worker builds, the others wait and
reuse). Each was built separately by each file before (~20 s apiece)."""

import os
import shutil

import pytest
from filelock import FileLock

from mmjax.train import run
from mmjax.train.experiment import load_experiment

from support import LLM_TEXT, ROOT, tiny_overrides  # noqa: E402

SFT_PYDOC = os.path.join(ROOT, "experiments", "sft_pydoc.py")
# the tiny SFT model's settings (the dpo / reward files train from it with the same widths)
SFT_TINY = {"model.dim": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
            "model.mlp_dim": 64, "model.dtype": "float32", "model.max_len": 256,
            "model.dropout": 0.0, "data.seq_len": 192, "data.batch_size": 8,
            "data.max_answer_chars": 120, "data.system_prompt": "", "optimizer.warmup_steps": 2,
            "optimizer.learning_rate": 3e-3, "log_every": 5, "eval_every": 0,
            "checkpoint_every": 0, "sample.num_questions": 0}


def _built_once(tmp_path_factory, worker_id, name, build):
    base = tmp_path_factory.getbasetemp()
    path = (base if worker_id == "master" else base.parent) / f"shared_{name}"
    with FileLock(f"{path}.lock"):
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)
            build(str(path))
            (path / ".built").touch()
    return str(path)


@pytest.fixture(scope="session")
def tiny_lm(corpus, tmp_path_factory, worker_id):
    """(workdir, LlamaConfig) of a 2-step tiny LM (max_len 256)."""
    over = tiny_overrides(corpus, eval_at_start=False) + ["model.max_len=256"]
    path = _built_once(tmp_path_factory, worker_id, "tiny_lm",
                       lambda wd: run(LLM_TEXT, workdir=wd, steps=2, overrides=over))
    return path, load_experiment(LLM_TEXT, over).model


@pytest.fixture(scope="session")
def tiny_sft(tiny_lm, tmp_path_factory, worker_id):
    """Workdir of the tiny LM instruction-tuned on pydoc questions for 10 steps."""
    over = [f"{k}={v!r}" for k, v in {**SFT_TINY, "init_from": tiny_lm[0]}.items()]
    return _built_once(tmp_path_factory, worker_id, "tiny_sft",
                       lambda wd: run(SFT_PYDOC, workdir=wd, steps=10, overrides=over))
