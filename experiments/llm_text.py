"""A small LLaMA trained on Python's own documentation text, then sampled: mmjax's main job.

Command (README command 1 runs it after setting up `.venv/`):

    mmjax train experiments/llm_text.py
    mmjax generate --workdir workdirs/llm_text --prompt "The with statement" --max-new-tokens 80

Data: the Python documentation topics that ship with CPython
(`"\\n\\n".join(pydoc_data.topics.topics.values())`, 465,126 characters on Python 3.11.7):
the first 90% of the characters train, the last 10% validate. A 2048-piece BPE sentencepiece
tokenizer is trained on the training split and saved with the checkpoint.

Model: LLaMA (RMSNorm, RoPE, GQA 8 query / 4 key-value heads, SwiGLU, tied embeddings),
dim 256, 4 layers, 3.43M parameters, fp32 params with bf16 compute, residual dropout 0.1
(the corpus is small and the model overfits it: final train loss 3.05 vs validation 3.94
nats/token; at 450 steps dropout 0.1 gave val_bpb 1.737); AdamW (lr 3e-3,
wd 0.1), 50 warmup steps then cosine to 10%; 450 steps of 32 x 128 tokens (~14 epochs of
the 128k-token training split, packed documents with segment ids).

Expected runtime: about 9-11 minutes on 2 CPU cores (~1.2-1.5 s per step; tokenizer
training and compilation take under a minute); a resumed run continues from the last
checkpoint in the workdir, and a finished one just re-evaluates and samples.

Expected result (measured 2026-11-24 on the 2-core CI machine): validation perplexity per
token falls from 2080 (untrained) to 51.3, val_bpb from 3.37 to 1.737 bits per UTF-8 byte
(tokenizer-independent; the outside nanoGPT reference reached 1.74 in 10 minutes), train
loss 3.05 nats/token; the sample is documentation-like English about Python statements. `--json` prints {"step", "train_loss",
"val_loss", "val_ppl", "val_bpb", ...} as its last line.

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
        log_every=10,
        eval_every=300,
        checkpoint_every=300,
        keep_checkpoints=2,
    )
