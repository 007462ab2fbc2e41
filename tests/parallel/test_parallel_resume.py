"""A checkpoint saved under one mesh restores under another: `mmjax train` stopped on
`fsdp=8` resumes on `data=4,tensor=2` (Orbax reshards into the new layout) and continues like a
straight one-device run.

Tolerance: the sharded and one-device runs compute the same steps with float32 sums in another
order; over 4 AdamW steps the losses agree to ~1e-6 relative (measured); we assert 1e-5.
"""

import os

import jax
import numpy as np
import pytest

from mmjax.parallel import get_preset, make_mesh
from mmjax.train import run
from mmjax.train.checkpointing import Checkpointer
from mmjax.train.experiment import load_experiment
from mmjax.train.metrics import read_metrics
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_boxed_params, abstract_train_state, state_shardings
from mmjax.train.task import build_task

from support import ROOT  # noqa: E402
LLM_TEXT = os.path.join(ROOT, "experiments", "llm_text.py")

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "pydoc_slice.txt"
    path.write_text("\n\n".join(topics.values())[:60_000])
    return str(path)


def overrides(corpus):
    items = {
        "data.corpus": corpus, "data.vocab_size": 512, "data.seq_len": 32, "data.batch_size": 8,
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 64, "model.max_len": 64, "model.dtype": "float32", "model.dropout": 0.0,
        "optimizer.warmup_steps": 2, "log_every": 1, "eval_every": 0, "checkpoint_every": 0,
        "sample.max_new_tokens": 4, "max_eval_batches": 2, "eval_at_start": False,
    }
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in items.items()]


def losses(workdir):
    return {r["step"]: r["train_loss"] for r in read_metrics(str(workdir)) if "train_loss" in r}


def _restore(workdir, cfg, mesh_spec, step):
    """The checkpoint of `step` restored through the real Checkpointer into `mesh_spec`'s layout."""
    task = build_task(cfg, str(workdir), log=lambda *_: None)
    tx, _ = make_optimizer(cfg.optimizer, cfg.steps, abstract_boxed_params(task.init_params))
    p = get_preset(cfg.parallelism)
    sh = state_shardings(task.init_params, tx, make_mesh(mesh_spec), p.rules, p.opt_rules)
    ckpt = Checkpointer(os.path.join(str(workdir), "checkpoints"), keep=10)
    try:
        state, _, _ = ckpt.restore(step, abstract_train_state(task.init_params, tx, shardings=sh))
    finally:
        ckpt.close()
    return state


def test_checkpoint_from_fsdp8_resumes_on_data4_tensor2(corpus, tmp_path):
    ov = overrides(corpus)
    straight = run(LLM_TEXT, workdir=str(tmp_path / "straight"), steps=4, overrides=ov)
    first = run(LLM_TEXT, workdir=str(tmp_path / "b"), steps=4, stop_at=2, mesh="fsdp=8",
                overrides=ov)
    assert first["stopped"] == "--stop-at 2"

    cfg = load_experiment(LLM_TEXT, ov).replace(steps=4)
    old = _restore(tmp_path / "b", cfg, "fsdp=8", 2)
    new = _restore(tmp_path / "b", cfg, "data=4,tensor=2", 2)
    k_old = old.params["layers_0"]["mlp"]["gate"]["kernel"]  # [embed, mlp]
    k_new = new.params["layers_0"]["mlp"]["gate"]["kernel"]
    assert k_old.addressable_shards[0].data.shape == (4, 64)  # embed 32 split 8 ways
    assert k_new.addressable_shards[0].data.shape == (32, 32)  # mlp 64 split 2 ways
    assert dict(k_new.sharding.mesh.shape)["data"] == 4
    for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same values, new layout

    resumed = run(LLM_TEXT, workdir=str(tmp_path / "b"), steps=4, mesh="data=4,tensor=2",
                  overrides=ov)
    assert resumed["step"] == 4
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)
