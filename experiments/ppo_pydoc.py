"""PPO of the SFT'd main-job LLM (experiments/sft_pydoc.py) against the reward model of
experiments/reward_pydoc.py: four models (policy, frozen reference, reward model, critic).

Command (after workdirs/sft_pydoc and workdirs/reward_pydoc exist; `mmjax train` trains them
first when they are missing):

    mmjax train experiments/ppo_pydoc.py
    mmjax train experiments/ppo_pydoc.py --set data.reward=keyword --workdir workdirs/ppo_pydoc_keyword

Models: the policy starts from workdirs/sft_pydoc (also the frozen reference, for the per-token
KL penalty), the critic from workdirs/reward_pydoc (as trl initialises its value model from
the reward model), the reward model is workdirs/reward_pydoc frozen (trained to prefer answers
that name the asked-about topic, `mmjax.data.preferences`). With `data.reward=keyword` the
reward is that preference itself, programmatic (1 when the answer names the topic).

Rollouts: 32 training questions per rollout, answers sampled at temperature 1 (64 new tokens at
most), 4 PPO epochs in minibatches of 8 (16 optimizer steps per rollout); kl_coef 0.05, clip
0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95 (trl's defaults); AdamW lr 5e-5.

Metrics (held-out questions, topics the LM and SFT never saw): `mean_reward` of greedy answers
(reward-model score), `keyword_score` (fraction naming the topic), `kl_to_reference` (trl's
estimate on sampled answers), before (`start_*`) and after.

Measured 2026-12-02 on the 2-core CI machine (AVX-512 kind), loaded by a test run beside it,
from workdirs/sft_pydoc and the workdirs/reward_pydoc of experiments/reward_pydoc.py (held-out
reward_accuracy 0.57: a weak reward model): 320 steps (20 rollouts) in 1161 s.

  held-out, greedy      start   step 80   step 160   step 240   step 320
  mean_reward (RM)      1.059   1.542     1.954      2.058      2.058
  kl_to_reference       0       2.61      4.87       6.45       9.80
  keyword_score         0.071   0.071     0         0          0
  response_length       29.2    28.4      10         10         10

Rollout means (training questions, sampled; 4 logs each): reward 0.58 (steps 16-64) -> 0.92 ->
1.28 -> 1.36 -> 1.68 (272-320), KL 0.74 -> 8.27, length 37.9 -> 20.5 tokens. The reward rises,
and this is reward hacking, plainly: by step 160 every held-out answer is the same short
sentence ("The `try` statement is executed."), which the weak reward model scores high, the
programmatic preference falls to 0, and the KL to the reference keeps growing at kl_coef 0.05.
With `--set data.kl_coef=0.3 --set steps=160` (752 s): greedy mean_reward 1.059 -> 1.259 (step
80) -> 1.046 (160), KL bounded at 1.60 / 1.49, sampled answers' reward 0.19 -> 0.77 -> 0.70.
The keyword variant (`--set data.reward=keyword`, critic from the SFT LM): docs/finetuning.md.
"""

import os

from mmjax.models.actor_critic import ActorCriticConfig
from mmjax.models.reward import RewardConfig
from mmjax.tasks.ppo import PPODataConfig
from mmjax.tasks.sft import SFTSampleConfig
from mmjax.train.experiment import ExperimentConfig, InitSource, OptimizerConfig, load_experiment
from mmjax.train.pipeline import Requires

REQUIRES = (Requires("sft_pydoc.py", "workdirs/sft_pydoc"),
            Requires("reward_pydoc.py", "workdirs/reward_pydoc"))

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ExperimentConfig:
    lm = load_experiment(os.path.join(HERE, "sft_pydoc.py")).model.replace(dropout=0.0)
    return ExperimentConfig(
        name="ppo_pydoc",
        task="ppo",
        model=ActorCriticConfig(policy=lm, critic=RewardConfig(text=lm)),
        data=PPODataConfig(reward="model", reward_model="workdirs/reward_pydoc", seq_len=256,
                           rollout_batch=32, batch_size=8, ppo_epochs=4, max_new_tokens=64,
                           temperature=1.0, kl_coef=0.05, clip=0.2, value_clip=0.2,
                           vf_coef=0.1, gamma=1.0, lam=0.95, seed=0),
        optimizer=OptimizerConfig(learning_rate=5e-5, warmup_steps=16, end_lr_ratio=0.1,
                                  weight_decay=0.0, grad_clip=1.0),
        sample=SFTSampleConfig(num_questions=14, max_new_tokens=64, show=3),
        init_from=(InitSource("workdirs/sft_pydoc", into="policy"),
                   InitSource("workdirs/reward_pydoc", into="critic")),
        steps=320,
        log_every=16,
        eval_every=80,
        checkpoint_every=80,
        keep_checkpoints=2,
        keep_best_metric="mean_reward",
        keep_best_mode="max",
    )
