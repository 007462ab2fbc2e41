"""The Flamingo task through the real training loop at tiny sizes (experiments/flamingo_digits.py
shrunk, no pretrained parts, a tokenizer trained on the data's text): the loss falls, only the
resampler and the gated blocks move (tower and LM bit-identical to the start), and the few-shot
metrics come back with the interface's keys."""

import os

import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.train import run
from mmjax.train.experiment import load_experiment

from support import ROOT  # noqa: E402

FLAMINGO = os.path.join(ROOT, "experiments", "flamingo_digits.py")
TINY = ["init_from=None", "data.tokenizer=None", "data.vocab_size=512",
        "model.vision.dim=32", "model.vision.mlp_dim=64", "model.vision.num_layers=1", "model.vision.num_heads=2",
        "model.text.dim=64", "model.text.mlp_dim=128", "model.text.num_layers=2", "model.text.num_heads=4",
        "model.text.num_kv_heads=4", "model.resampler_depth=1", "model.resampler_heads=2",
        "model.resampler_head_dim=16", "model.resampler_latents=4",
        "data.seq_len=48", "data.batch_size=8", "data.eval_batches=1", "data.eval_batch_size=16",
        "data.eval_queries=16", "data.eval_shots=(0, 2)", "optimizer.learning_rate=3e-3",
        "optimizer.warmup_steps=1", "log_every=1", "eval_every=0", "checkpoint_every=0"]


def test_flamingo_task_trains_only_the_new_layers_and_reports_few_shot(tmp_path):
    import orbax.checkpoint as ocp

    wd = str(tmp_path / "wd")
    m = run(FLAMINGO, workdir=wd, steps=6, overrides=TINY)
    assert m["val_loss"] < m["start_val_loss"]
    for key in ("few_shot_accuracy", "few_shot_accuracy_rices", "episodic_accuracy"):
        assert set(m[key]) == {"0", "2"} and all(0.0 <= v <= 1.0 for v in m[key].values()), key
    restored = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", "6", "params"))
    gate = restored["gated_xattn_0"]["alpha_attn"]
    assert np.abs(np.asarray(gate)).max() > 0  # the gates opened (they start at exactly 0)


def test_frozen_parts_do_not_move(tmp_path):
    import jax

    from mmjax.tasks.flamingo import FlamingoTask
    from mmjax.train.optimizer import make_optimizer
    from mmjax.train.state import abstract_boxed_params, create_train_state
    from mmjax.train.step import make_train_step, shard_batch

    cfg = load_experiment(FLAMINGO, TINY)
    task = FlamingoTask(cfg, str(tmp_path / "wd"), log=lambda s: None)
    tx, sched = make_optimizer(cfg.optimizer, 6, abstract_boxed_params(task.init_params))
    state, _ = create_train_state(task.init_params, tx, seed=0)
    before = jax.tree_util.tree_map(np.array, state.params)
    batch = next(task.train_iterator())
    assert (batch["tokens"] == task.model_config.image_token_index).sum() == batch["image_valid"].sum()
    step = make_train_step(task.loss, tx, sched)
    assert float(sched(0)) == 0.0  # warmup: the first update is zero; the second is the first real one
    state, _ = step(state, shard_batch(batch, None))
    state, _ = step(state, shard_batch(batch, None))
    # the first real step: the gates start at exactly 0, so only they get a gradient
    # (tanh'(0) = 1); every weight behind a gate has a zero gradient until the gates open
    gates = {k: np.asarray(v["alpha_attn"]) for k, v in state.params.items() if k.startswith("gated_xattn")}
    assert all(np.abs(g).max() > 0 for g in gates.values())
    leaves = lambda tree: jax.tree_util.tree_leaves(tree)  # noqa: E731
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(leaves(state.params["resampler"]),
                                                                 leaves(before["resampler"])))
    state, _ = step(state, shard_batch(batch, None))  # the next: the layers behind the gates train
    assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in
               zip(leaves(state.params["resampler"]), leaves(before["resampler"]))) > 0
    for part in ("vision", "language_model"):  # frozen: bit-identical
        jax.tree_util.tree_map(np.testing.assert_array_equal,
                               jax.tree_util.tree_map(np.asarray, state.params[part]), before[part])


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.image_size=16 but the image tower takes"):
        load_experiment(FLAMINGO, TINY + ["data.image_size=16"])
    with pytest.raises(ConfigError, match="scan_layers=False"):
        load_experiment(FLAMINGO, TINY + ["model.text.scan_layers=True"])
    with pytest.raises(ConfigError, match="eval_shots"):
        load_experiment(FLAMINGO, TINY + ["data.eval_shots=()"])
    from mmjax.data.tokenizer import Tokenizer

    bare = str(tmp_path / "bare.model")
    Tokenizer.train(["a few words of text, then more text " * 50], bare, 300, user_defined_symbols=("<image>",))
    with pytest.raises(InputError, match="<\\|endofchunk\\|>"):
        run(FLAMINGO, workdir=str(tmp_path / "wd"), steps=1, overrides=TINY + [f"data.tokenizer={bare!r}"])
