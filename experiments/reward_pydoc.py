"""Train a reward model on the pydoc preference pairs, from the SFT'd main-job LLM (experiments/sft_pydoc.py).

Command (after the main job and the SFT run have written workdirs/llm_text, workdirs/sft_pydoc;
`mmjax train` runs them first when they are missing):

    mmjax train experiments/reward_pydoc.py

Data (`mmjax.data.preferences.pydoc_preferences`, as experiments/dpo_pydoc.py): chosen = the
asked section's own answer, which names the topic's keyword; rejected = another section's
answer that does not. 368 training pairs, 56 held-out pairs (the 14 held-out questions, from
topics neither the LM nor the SFT run trained on, 4 rejected answers each). Template
`vicuna_v1` with its system prompt; each row is the whole conversation, the reward read at its
closing `</s>`.

Model: `RewardConfig` (family "reward") = the main job's LLaMA (3.43M params) whose decoder
`language_model/...` comes from workdirs/sft_pydoc (its tokenizer reused), plus a fresh scalar
head `score` (256 params; `init_from.json` lists it as kept). Loss: `reward_loss` (Bradley-Terry,
no margin, no centering). AdamW, warmup, cosine to 10%; 8 pairs (16 rows of 256 tokens) per
step. keep_best by held-out reward_accuracy.

Metrics (held-out): `reward_accuracy` (r_chosen > r_rejected; chance 0.5), `val_loss`
(starts near ln 2 = 0.693), `reward_margin` (mean r_chosen - r_rejected), before (`start_*`)
and after.

MEASURED
"""

import os

from mmjax.models.reward import RewardConfig
from mmjax.tasks.reward import RewardDataConfig
from mmjax.train.experiment import ExperimentConfig, InitSource, OptimizerConfig, load_experiment
from mmjax.train.pipeline import Requires

REQUIRES = (Requires("sft_pydoc.py", "workdirs/sft_pydoc"),)

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ExperimentConfig:
    sft = load_experiment(os.path.join(HERE, "sft_pydoc.py"))
    return ExperimentConfig(
        name="reward_pydoc",
        task="reward",
        model=RewardConfig(text=sft.model.replace(dropout=0.0)),
        data=RewardDataConfig(template="vicuna_v1", seq_len=256, batch_size=8, seed=0),
        optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=10, end_lr_ratio=0.1,
                                  weight_decay=0.0, grad_clip=1.0),
        init_from=InitSource("workdirs/sft_pydoc", into="language_model"),
        steps=150,
        log_every=10,
        eval_every=50,
        checkpoint_every=50,
        keep_checkpoints=2,
        keep_best_metric="reward_accuracy",
        keep_best_mode="max",
    )
