"""`mmjax bench peft_memory`: device memory of a LoRA training step vs full fine-tuning.

The same ~110M-parameter LLaMA as `mmjax bench memory` (vocab 32000, dim 768, 12 layers,
SwiGLU 2048, tied embeddings, float32 compute), batch 8 x 512 tokens, AdamW + clipping, on one
device. Each case's real train step (`mmjax.train.step.make_train_step`, the training loop's
own, with the run's `trainable` mask and freezing) is lowered and compiled on abstract shapes
only (nothing is materialised) and reported as

  params_bytes / opt_state_bytes   what the train state holds (every param, Adam's moments)
  temp_bytes                       XLA's temporaries of the step (activations kept for the
                                   backward pass, gradient buffers)
  total_bytes                      argument + output - alias + temp (what the step needs at once)

Cases: full fine-tuning; LoRA r=8 (alpha 16) on every attention and MLP projection with the
base frozen in float32, bfloat16 and int8 (`ExperimentConfig.frozen_base_dtype`, per-channel
absmax, `mmjax.nn.quant`). `ratio` (higher is better) = total bytes of full fine-tuning / of
LoRA with the float32 base; `ratio_int8` the same for the int8 base; `state_ratio(_int8)` the
same for the train state alone (params + optimizer state). The activations kept for the
backward pass are the same for LoRA and full fine-tuning (LoRA still backpropagates through
every layer), so at a large batch they dominate and `ratio` stays near 1; rematerialisation
(`model={"remat": "full"}`) or a small batch is where the state's saving shows.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_MODEL = dict(vocab_size=32000, dim=768, num_layers=12, num_heads=16, num_kv_heads=16,
                     mlp_dim=2048, max_len=512, tie_embeddings=True)
TARGETS = (r"attn/(query|key|value|out)$", r"mlp/(gate|up|down)$")


def run(batch: int = 8, seq_len: int = 512, r: int = 8, model: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    from mmjax.models.llama import LlamaConfig

    cfg = LlamaConfig(**{**DEFAULT_MODEL, **(model or {})})
    cases = [_measure(cfg, None, None, batch, seq_len, r)]
    for dtype in (None, "bfloat16", "int8"):
        cases.append(_measure(cfg, "lora", dtype, batch, seq_len, r))
    full, lora32, lora8 = cases[0], cases[1], cases[3]
    for c in cases:
        c["vs_full"] = {k: c[f"{k}_bytes"] / full[f"{k}_bytes"]
                        for k in ("params", "opt_state", "temp", "total")}
    return {
        "name": "peft_memory",
        "reference": "full fine-tuning of the same model, same step, same batch",
        "ratio": full["total_bytes"] / lora32["total_bytes"],
        "ratio_int8": full["total_bytes"] / lora8["total_bytes"],
        # what the train state holds (params + optimizer state), without the activations
        "state_ratio": ((full["params_bytes"] + full["opt_state_bytes"])
                        / (lora32["params_bytes"] + lora32["opt_state_bytes"])),
        "state_ratio_int8": ((full["params_bytes"] + full["opt_state_bytes"])
                             / (lora8["params_bytes"] + lora8["opt_state_bytes"])),
        "cases": cases,
        "model": {**cfg.to_dict(), "num_params": cfg.num_params()},
        "batch": batch, "seq_len": seq_len, "lora_r": r, "lora_targets": list(TARGETS),
        "optimizer": "AdamW (float32 moments) + global-norm clipping",
    }


class _Task:  # the minimum of a Task that PeftRun.wrap needs
    def __init__(self, model, init, loss):
        self.model, self.init_params, self.loss, self.family = model, init, loss, "llama"
        self.model_config = model.config

    def evaluate(self, *a, **k):
        return {}

    def sample(self, *a, **k):
        return None


def _measure(cfg, method, frozen_dtype, batch, seq_len, r) -> dict[str, Any]:
    import jax
    import numpy as np

    from mmjax.models.llama import Llama
    from mmjax.nn.lora import LoraConfig
    from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
    from mmjax.train.experiment import OptimizerConfig
    from mmjax.train.optimizer import make_optimizer
    from mmjax.train.peft import PeftRun
    from mmjax.train.state import abstract_boxed_params, abstract_train_state
    from mmjax.train.step import make_train_step

    model = Llama(cfg)
    task = _Task(model, lm_init_fn(model, seq_len), lm_loss_fn(model))
    peft = None
    if method == "lora":
        peft = PeftRun(LoraConfig(targets=TARGETS, r=r, alpha=2.0 * r), frozen_dtype)
        peft.wrap(task)
    boxed = abstract_boxed_params(task.init_params)
    trainable = peft.trainable if peft else None
    tx, schedule = make_optimizer(OptimizerConfig(), 1000, boxed, trainable)
    state = abstract_train_state(task.init_params, tx)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), np.int32)
    abstract_batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens,
                      "positions": tokens,
                      "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), np.float32)}
    step = make_train_step(task.loss, tx, schedule,
                           trainable=peft.trainable_mask(boxed) if peft else None)
    mem = step.lower(state, abstract_batch).compile().memory_analysis()

    def nbytes(tree) -> int:
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree))

    params_b, opt_b = nbytes(state.params), nbytes(state.opt_state)
    n_train = (sum(math.prod(x.shape) for x, m in zip(
        jax.tree_util.tree_leaves(state.params),
        jax.tree_util.tree_leaves(peft.trainable_mask(boxed))) if m) if peft
        else sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params)))
    args_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias_b, temp_b = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return {
        "case": "full" if method is None else f"lora_{frozen_dtype or 'float32'}_base",
        "trainable_params": int(n_train),
        "params_bytes": params_b, "opt_state_bytes": opt_b, "temp_bytes": temp_b,
        "argument_bytes": args_b, "output_bytes": out_b, "alias_bytes": alias_b,
        "total_bytes": args_b + out_b - alias_b + temp_b,
    }
