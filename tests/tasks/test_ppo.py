"""The ppo task through the real training loop on a tiny LM: rollouts come from the policy being
trained (mmjax's jit decoding loop), the policy starts exactly at the reference (KL 0), moves
off it while training, the critic trains beside it, and bad configs are refused."""


import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.actor_critic import ActorCriticConfig
from mmjax.models.reward import RewardConfig
from mmjax.tasks.ppo import PPODataConfig
from mmjax.tasks.sft import SFTSampleConfig
from mmjax.train.experiment import ExperimentConfig, InitSource, OptimizerConfig
from mmjax.train.loop import train
from mmjax.train.metrics import read_metrics



@pytest.fixture(scope="module")
def lm(tiny_lm, tmp_path_factory):
    """(this file's directory, the shared tiny LM workdir and its config: tests/tasks/conftest.py)."""
    return tmp_path_factory.mktemp("ppo"), tiny_lm[0], tiny_lm[1]


def ppo_config(lm, **data):
    _, wd, base = lm
    d = dict(reward="keyword", seq_len=128, rollout_batch=8, batch_size=4, ppo_epochs=2,
             max_new_tokens=16, system_prompt="")
    d.update(data)
    return ExperimentConfig(
        task="ppo", model=ActorCriticConfig(policy=base, critic=RewardConfig(text=base)),
        data=PPODataConfig(**d), sample=SFTSampleConfig(num_questions=4, max_new_tokens=16, show=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
        init_from=(InitSource(wd, into="policy"), InitSource(wd, into="critic/language_model")),
        steps=8, log_every=2, checkpoint_every=0)


def test_ppo_rollouts_train_the_policy_off_the_reference(lm):
    root = lm[0]
    m = train(ppo_config(lm), str(root / "ppo"))
    assert m["start_kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert m["kl_to_reference"] > 1e-4  # ... and it moved
    assert 0.0 <= m["mean_reward"] <= 1.0 and "start_mean_reward" in m
    rows = [r for r in read_metrics(str(root / "ppo")) if "train_loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:  # the rollouts' statistics ride along with each minibatch
        assert np.isfinite(r["policy_loss"]) and np.isfinite(r["value_loss"])
        assert r["rollout_length"] > 0 and 0.0 <= r["rollout_reward"] <= 1.0
        assert 0.0 <= r["clipfrac"] <= 1.0
    # 8 prompts x 2 epochs / 4 per step = 4 steps per rollout: two rollouts in 8 steps
    assert rows[0]["rollout_kl"] == pytest.approx(0.0, abs=1e-5)  # the first: from the reference
    assert rows[-1]["rollout_kl"] != pytest.approx(0.0, abs=1e-6)
    assert "Q: " in m["sample"]


def test_bad_ppo_configs(lm):
    with pytest.raises(ConfigError, match="needs data.reward_model"):
        PPODataConfig(reward="model")
    with pytest.raises(ConfigError, match="multiple of data.batch_size"):
        PPODataConfig(reward="keyword", rollout_batch=6, batch_size=4)
    with pytest.raises(ConfigError, match="needs init_from with a source into 'policy'"):
        ppo_config(lm).replace(init_from=None)
    with pytest.raises(Exception, match="not a reward model|no checkpoint|not a training workdir"):
        train(ppo_config(lm, reward="model", reward_model=lm[1]), str(lm[0] / "bad"))
