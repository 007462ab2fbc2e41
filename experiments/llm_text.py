"""A small LLaMA trained on Python's own documentation text, then sampled: mmjax's main job.

Command (README command 1 runs it after setting up `.venv/`):

    mmjax train experiments/llm_text.py
    mmjax generate --workdir workdirs/llm_text --prompt "The with statement" --max-new-tokens 80

Data: the Python documentation topics that ship with CPython
(`"\\n\\n".join(pydoc_data.topics.topics.values())`, 465,126 characters on Python 3.11.7):
the first 90% of the characters train, the last 10% validate. A 2048-piece BPE sentencepiece
tokenizer is trained on the training split and saved with the checkpoint.

Model: LLaMA (RMSNorm, RoPE, GQA 8 query / 4 key-value heads, SwiGLU, tied embeddings),
dim 256, 4 layers, 3.43M parameters, fp32 params with bf16 compute, residual dropout 0.15
(the corpus is small and the model overfits it); AdamW (lr 2e-3, wd 0.1), 100 warmup steps
then cosine to 10%; 900 steps of 16 x 128 tokens (~14 epochs of the 128k-token training
split, packed documents with segment ids). These settings won a sweep of batch size, steps,
width, dropout and learning rate at the same ~5-minute budget (table in docs/training.md).

Time budget: the training steps may take at most 9 minutes (`time_budget_s=540`,
`mmjax.train.budget`). The project's 2-core machines differ about 4x in matrix-product speed:
where 900 steps fit (the 2026-11-25 machine, ~485 GFLOP/s float32 matmul) the run is exactly
the configured one; where they don't (the 2026-11-30 one, AMD EPYC with AVX2, ~120 GFLOP/s,
~0.86 s per step) the run times 20 steps, trains as many steps as fit with the learning-rate
schedule re-spanned to end there, logs `[budget] ...` and writes `plan.json`.

Expected runtime and result (measured):
- 2026-11-30, the ~120 GFLOP/s machine, quiet: 9 min 11 s for `mmjax train` (tokenizer,
  582 steps at ~0.86 s/step, ~2,300 tokens/s, evaluation, sampling); README command 1 adds
  ~3 min of installation. Validation perplexity per token 2080 -> 64.3 (step 300) -> 47.4
  (step 582); val_bpb 3.371 -> 1.837 -> 1.702 bits per UTF-8 byte.
- 2026-11-25, the ~485 GFLOP/s machine (before the budget existed; its 900 steps took less
  than half of it): README command 1 took 5 min 49 s in all, 900 steps in 4 min 27 s (~7,000 tokens/s);
  perplexity 2080 -> 64.0 (300) -> 46.4 (600) -> 43.5 (900); val_bpb 3.371 -> 1.835 -> 1.693
  -> 1.664, train loss ~2.3 nats/token at the end vs 3.77 on validation (overfitting the small
  split is what limits it).
val_bpb is tokenizer-independent; the outside nanoGPT reference reached 1.74 in 10 minutes.
The sample is documentation-like English about Python statements. `--json` prints
{"step", "train_loss", "val_loss", "val_ppl", "val_bpb", ...} as its last line.

Overrides: `--set model.num_layers=2 --set optimizer.learning_rate=1e-3 --set data.corpus=vim`.
"""

from mmjax.models.llama import LlamaConfig
from mmjax.tasks.lm import SampleConfig
from mmjax.tasks.text_data import TextDataConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llm_text",
        task="lm",
        model=LlamaConfig(
            vocab_size=2048,  # replaced by the trained tokenizer's size
            dim=256,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            mlp_dim=688,
            max_len=512,
            rope_theta=10_000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
            dtype="bfloat16",
            param_dtype="float32",
            dropout=0.15,
        ),
        data=TextDataConfig(corpus="pydoc", vocab_size=2048, tokenizer_type="bpe", seq_len=128,
                            batch_size=16, seed=0),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=100, end_lr_ratio=0.1,
                                  weight_decay=0.1, grad_clip=1.0),
        sample=SampleConfig(prompt="The with statement", max_new_tokens=80, temperature=0.8,
                            top_k=40),
        steps=900,
        # at most 9 minutes of training steps (see the docstring): 900 steps take ~4.5 min
        # on a ~485 GFLOP/s CPU, ~13 min on a ~120 GFLOP/s one, which trains what fits
        time_budget_s=540.0,
        log_every=10,
        eval_every=300,
        checkpoint_every=300,
        keep_checkpoints=2,
    )
