"""A small LLaMA trained on Python's own documentation text, then sampled: mmjax's main job.

Command (README command 1 runs it after setting up `.venv/`):

    mmjax train experiments/llm_text.py
    mmjax generate --workdir workdirs/llm_text --prompt "The with statement" --max-new-tokens 80

Data: the Python documentation topics that ship with CPython
(`"\\n\\n".join(pydoc_data.topics.topics.values())`, 465,126 characters on Python 3.11.7):
the first 90% of the characters train, the last 10% validate. A 2048-piece BPE sentencepiece
tokenizer is trained on the training split and saved with the checkpoint.

Model: LLaMA (RMSNorm, RoPE, GQA 8 query / 4 key-value heads, SwiGLU), dim 256, 4 layers,
about 4.2M parameters, fp32 params with bf16 compute; AdamW, warmup + cosine.

Expected runtime: about 8-10 minutes on 2 CPU cores (the first minute is tokenizer training
and compilation); a resumed run continues from the last checkpoint in the workdir.

Expected result: validation perplexity (per token) falls from ~2048 (the vocabulary size, an
untrained model) to about 30, i.e. roughly val_bpb ~= 1.5 bits per UTF-8 byte
(tokenizer-independent); the sample is English-like documentation prose with Python keywords.
The exact figures measured are in docs/benchmarks.md. `--json` prints {"step", "train_loss",
"val_loss", "val_ppl", "val_bpb", ...} as its last line.

Overrides: `--set model.num_layers=2 --set optimizer.learning_rate=1e-3 --set data.corpus=vim`.
"""

from mmjax.models.llama import LlamaConfig
from mmjax.train.experiment import DataConfig, ExperimentConfig, OptimizerConfig, SampleConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llm_text",
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
        ),
        data=DataConfig(corpus="pydoc", vocab_size=2048, tokenizer_type="bpe", seq_len=128,
                        batch_size=32, seed=0),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=100, end_lr_ratio=0.1,
                                  weight_decay=0.1, grad_clip=1.0),
        sample=SampleConfig(prompt="The with statement", max_new_tokens=80, temperature=0.8,
                            top_k=40),
        steps=1500,
        log_every=10,
        eval_every=500,
        checkpoint_every=500,
        keep_checkpoints=2,
    )
