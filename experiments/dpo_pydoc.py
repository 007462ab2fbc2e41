"""Align the SFT'd main-job LLM (experiments/sft_pydoc.py) toward answers that name the topic, by DPO.

Command (after the main job and the SFT run have written workdirs/llm_text, workdirs/sft_pydoc;
`mmjax train` runs them first when they are missing):

    mmjax train experiments/dpo_pydoc.py

Data (`mmjax.data.preferences.pydoc_preferences`): the pydoc instruction questions; chosen =
the asked section's own answer, which names the topic's keyword ("while", "Methods",
"Immutable"); rejected = another section's answer that does not. 368 training pairs (every
training phrasing of the 123 sections whose answer names its keyword), 56 held-out pairs (the
14 held-out questions, from topics neither the LM nor the SFT run trained on, 4 rejected
answers each). Template `vicuna_v1` with its system prompt, as in SFT.

Model: the main job's LLaMA (3.43M params) from workdirs/sft_pydoc, which is also the frozen
reference (its log-probs of every pair cached once). DPO sigmoid loss, beta 0.1; AdamW lr 2e-5
... see `get_config`; 8 pairs per step (16 rows of 256 tokens).

Metrics: held-out `preference_accuracy` (implicit reward ranks chosen above rejected),
`reward_margin`, `val_loss` (starts at ln 2 = 0.693), and `keyword_score`: the fraction of
greedy answers to the 14 held-out questions that name the topic, before (`start_keyword_score`)
and after.

Measured: see docs/finetuning.md ("DPO").
"""

import os

from mmjax.tasks.dpo import DPODataConfig
from mmjax.tasks.sft import SFTSampleConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig, load_experiment
from mmjax.train.pipeline import Requires

REQUIRES = (Requires("sft_pydoc.py", "workdirs/sft_pydoc"),)

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ExperimentConfig:
    sft = load_experiment(os.path.join(HERE, "sft_pydoc.py"))
    return ExperimentConfig(
        name="dpo_pydoc",
        task="dpo",
        model=sft.model.replace(dropout=0.0),  # DPO compares two forwards of one model: no dropout
        data=DPODataConfig(dataset="pydoc_instructions", template="vicuna_v1", seq_len=256,
                           batch_size=8, seed=0, beta=0.1, loss_type="sigmoid"),
        optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=10, end_lr_ratio=0.1,
                                  weight_decay=0.0, grad_clip=1.0),
        sample=SFTSampleConfig(num_questions=14, max_new_tokens=96, show=3),
        init_from="workdirs/sft_pydoc",
        steps=150,
        log_every=10,
        eval_every=50,
        checkpoint_every=50,
        keep_checkpoints=2,
        keep_best_metric="preference_accuracy",
        keep_best_mode="max",
    )
