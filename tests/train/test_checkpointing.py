"""Checkpointer retention: the latest N plus the best by a metric, in either direction."""

import jax.numpy as jnp
import pytest

from mmjax.train.checkpointing import Checkpointer
from mmjax.train.state import TrainState


def _state(v: float) -> TrainState:
    return TrainState(step=jnp.asarray(0, jnp.int32), params={"w": jnp.full((2,), v)},
                      opt_state={}, rng=jnp.zeros((2,), jnp.uint32))


@pytest.mark.parametrize("mode,best_step", [("min", 2), ("max", 1)])
def test_keeps_latest_and_best(tmp_path, mode, best_step):
    ckpt = Checkpointer(str(tmp_path), keep=1, best_metric="val_loss", best_mode=mode,
                        async_save=False)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
        ckpt.save(step, _state(loss), metrics={"val_loss": loss}, force=True)
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == sorted({best_step, 4})
    ckpt.close()


def test_checkpoints_without_the_metric_are_kept_only_as_latest(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=1, best_metric="val_loss", async_save=False)
    ckpt.save(1, _state(1.0), metrics={"val_loss": 1.0}, force=True)
    ckpt.save(2, _state(2.0), metrics={"train_loss": 0.5}, force=True)  # no val_loss: not ranked
    ckpt.save(3, _state(3.0), metrics={}, force=True)
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [1, 3]
    ckpt.close()


def test_unknown_mode_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(str(tmp_path), best_metric="val_loss", best_mode="lowest")
