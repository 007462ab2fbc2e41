"""Instruction-tune the main job's LLM (experiments/llm_text.py) on questions about Python's docs.

Command (after the main job has written workdirs/llm_text):

    mmjax train experiments/llm_text.py
    mmjax train experiments/sft_pydoc.py

Data (`mmjax.data.instructions.pydoc_instructions`): one item per section of the CPython help
topics, "What does the `assert` statement do?" / "Explain <section title>." answered with the
first sentences of that section (at most 240 characters). Split by topic: the 14 sections of
the topics that start in the corpus's validation part (the last 10% of the characters, which
the pretrained LM never trained on) are held out; the 518 training conversations are the
other sections, each asked in three phrasings. Rendered with LLaVA's `vicuna_v1` template
(its default system prompt; answers end with `</s>`), packed first-fit into rows of 256
tokens; loss only on the answers and their `</s>`.

Model: the main job's LLaMA (dim 256, 4 layers, 3.43M parameters, same config) initialised
from workdirs/llm_text's latest checkpoint, whose tokenizer is reused (copied into this
workdir). AdamW lr 5e-4, 30 warmup steps, cosine to 10%, dropout 0.15 as in pretraining;
120 steps of 8 x 256 tokens (~15 epochs of the training conversations).

Evaluation: held-out loss / perplexity over the answers' tokens, and `stopped_fraction`: of
greedy answers to the 14 held-out questions, the fraction that ended with `</s>` within 96
new tokens (the pretrained LM has never seen `</s>`, so it starts near 0).

Measured 2026-12-01 on the 2-core CI machine (AVX-512 kind, ~199 GFLOP/s fp32 matmul), from
the full main job (`mmjax train experiments/llm_text.py`: 495 of 900 steps fit its 540 s budget
there, val_bpb 1.735): 120 steps in 108 s (~2,300 tokens/s). Held-out answer tokens (622 tokens
of the 14 held-out sections): val_loss 6.441 -> 4.461 (step 40) -> 4.477 (80) -> 4.511 (120),
val_ppl 627 -> 91; stopped_fraction 0.0 -> 0.93 (13 of 14 greedy answers end with `</s>` within
96 tokens; the pretrained LM has never produced `</s>`). Train loss 2.24 at the end: the 518
conversations are learned far better than what carries over to unseen sections. A 300-step run
(the first setting) overfit: val_loss 4.598 (100) -> 4.898 (200) -> 4.992 (300) while the train
loss fell to 1.20, hence 120 steps. The answers have the documentation's register and the
template's shape but not the facts ("Methods" -> "The following methods are created by the
class object (see section The standard type hierarchy)."): a 3.4M-parameter LM pretrained for
495 steps knows little to recall.

Overrides: `--set data.template=minigpt4 --set steps=100 --set data.system_prompt=''`;
without workdirs/llm_text, `--set init_from=None` trains the same model from scratch with a
new tokenizer (trained on the pydoc corpus and the instructions, with the template's pieces).
"""

import os

from mmjax.tasks.sft import SFTDataConfig, SFTSampleConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig, load_experiment
from mmjax.train.pipeline import Requires

# prerequisite runs: trained first by `mmjax train` when this config reads their workdir and it
# holds no finished run (mmjax.train.pipeline)
REQUIRES = (Requires("llm_text.py", "workdirs/llm_text"),)

LLM_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm_text.py")


def get_config() -> ExperimentConfig:
    main_job = load_experiment(LLM_TEXT)  # the same model config, read from the main job
    return ExperimentConfig(
        name="sft_pydoc",
        task="sft",
        model=main_job.model,
        data=SFTDataConfig(dataset="pydoc_instructions", template="vicuna_v1", seq_len=256,
                           batch_size=8, seed=0),
        optimizer=OptimizerConfig(learning_rate=5e-4, warmup_steps=30, end_lr_ratio=0.1,
                                  weight_decay=0.1, grad_clip=1.0),
        sample=SFTSampleConfig(num_questions=16, max_new_tokens=96, show=3),
        init_from="workdirs/llm_text",
        steps=120,  # held-out loss is lowest near step 100 and rises after (see the docstring)
        log_every=10,
        eval_every=40,
        checkpoint_every=40,
        keep_checkpoints=2,
    )
