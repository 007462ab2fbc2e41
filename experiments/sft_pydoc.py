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
300 steps of 8 x 256 tokens.

Evaluation: held-out loss / perplexity over the answers' tokens, and `stopped_fraction`: of
greedy answers to the 14 held-out questions, the fraction that ended with `</s>` within 96
new tokens (the pretrained LM has never seen `</s>`, so it starts near 0).

Measured (2026-12-01, the project's shared 2-core CPU machine, other jobs running): a SHORT
main job first, `mmjax train experiments/llm_text.py --steps 300 --set time_budget_s=300.0`
(the budget trained 91 steps: val_ppl 2080 -> 246.8, val_bpb 2.43), then
`mmjax train experiments/sft_pydoc.py --steps 120 --set time_budget_s=420.0 --set
eval_every=60`: 3 min 49 s in all (~1.7-2.4 s/step). Held-out answer tokens (622 tokens):
val_loss 6.782 -> 5.681 (step 60) -> 5.582 (step 120), val_ppl 881 -> 266; stopped_fraction
0.0 -> 1.0 (all 14 held-out answers end with `</s>`, none did before); train loss 4.47. The
answers are short and documentation-flavoured but wrong ("The `__` statement is a ..."): the
format is learned, the facts are beyond a 3.4M model pretrained for 91 steps. The configured
300 steps after the full main job were not measured.

Overrides: `--set data.template=minigpt4 --set steps=100 --set data.system_prompt=''`;
without workdirs/llm_text, `--set init_from=None` trains the same model from scratch with a
new tokenizer (trained on the pydoc corpus and the instructions, with the template's pieces).
"""

import os

from mmjax.tasks.sft import SFTDataConfig, SFTSampleConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig, load_experiment

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
        steps=300,
        log_every=10,
        eval_every=100,
        checkpoint_every=100,
        keep_checkpoints=2,
    )
