"""`mmjax bench train`: training tokens/s of one LLaMA config, mmjax vs transformers + torch AdamW.

Both sides train the same architecture (the main job's model by default: dim 256, 4 layers,
GQA 8/4 heads, SwiGLU 688, vocab 2048, tied embeddings) on the same random token batches,
float32, with AdamW (same betas, eps, weight decay, lr) and global-norm clipping at 1.0. mmjax
runs its real train step (`mmjax.train.step.make_train_step`: jit, donated state); the
reference runs `LlamaForCausalLM(labels=...)`, `loss.backward()`,
`clip_grad_norm_`, `torch.optim.AdamW.step()`. Throughput is the median over `repeats`
windows of `steps` steps, after warm-up steps (mmjax's first step includes compilation,
reported separately).

Peak memory: each side is also run alone in a child process, and the growth of its peak
resident set size (VmHWM, reset first via /proc/self/clear_refs) from just before building the model to after 4 steps is reported
(CPU has no allocator statistics common to both); for mmjax the compiled step's own buffer
sizes from XLA's memory analysis are reported too.

mmjax's step is what `mmjax train` runs for a float32 LM on CPU: compiled with mmjax's XLA
options (`mmjax.xla_options`) and with the loss taken on `parallel_chains` slices of the batch
side by side (`mmjax.train.step.parallel_chains_for`); `xla_options=False` drops both. The same
step without them (XLA's defaults, one chain) is timed in turn with the other two
(`xla_options_ab`), which gives their A/B speed-up in the same run (`cpu_defaults_speedup`).

MFU uses the 6ND rule (6 x non-embedding params x tokens, plus attention's 12 x layers x dim x
seq per token) against the measured float32 matmul throughput of this machine (a 2048^3
`jnp.dot`), which is stated in the result as `peak_flops`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

DEFAULT_MODEL = dict(
    vocab_size=2048, dim=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=688,
    max_len=512, tie_embeddings=True, norm_eps=1e-5,
)
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.95, 1e-8, 0.1


def run(
    batch: int = 16, seq_len: int = 128, steps: int = 5, repeats: int = 3, warmup: int = 2,
    model: dict[str, Any] | None = None, seed: int = 0, memory: bool = True,
    xla_options: bool = True, xla_options_ab: bool = True,
) -> dict[str, Any]:
    import torch
    import transformers

    spec = {**DEFAULT_MODEL, **(model or {})}
    rng = np.random.default_rng(seed)
    batches = [rng.integers(0, spec["vocab_size"], size=(batch, seq_len + 1), dtype=np.int64)
               for _ in range(4)]

    from mmjax.xla_options import step_compiler_options

    from mmjax.train.step import parallel_chains_for

    options = step_compiler_options("float32") if xla_options else None
    chains = parallel_chains_for(batch, sums_over_examples=True) if xla_options else 1
    ours_step, ours_first, analysis, n_params, n_embed = _mmjax_trainer(spec, batches, seed, options,
                                                                        chains)
    ref_step = _torch_trainer(spec, batches, seed)
    # the same step compiled without mmjax's XLA options: their A/B, timed in turn with the rest
    plain_step = (_mmjax_trainer(spec, batches, seed, None, 1)[0]
                  if (options or chains > 1) and xla_options_ab else None)
    sides = [ours_step, ref_step] + ([plain_step] if plain_step else [])
    for _ in range(warmup):
        for side in sides:
            side()
    times = [[] for _ in sides]
    for _ in range(repeats):  # alternate, so every side sees the same background load
        for t, side in zip(times, sides):
            t.append(_timed(side, steps))
    t_ours, t_ref = statistics.median(times[0]), statistics.median(times[1])
    tokens = batch * seq_len
    peak = measure_matmul_peak()
    flops_per_token = 6 * (n_params - n_embed) + 12 * spec["num_layers"] * spec["dim"] * seq_len
    ours_tps, ref_tps = tokens / t_ours, tokens / t_ref
    case = {
        "batch": batch, "seq_len": seq_len, "dtype": "float32",
        "mmjax_tokens_per_s": ours_tps, "reference_tokens_per_s": ref_tps,
        "ratio": ours_tps / ref_tps, "mmjax_step_s": t_ours, "reference_step_s": t_ref,
        "mmjax_first_step_s": ours_first,
        "mmjax_mfu": ours_tps * flops_per_token / peak,
        "reference_mfu": ref_tps * flops_per_token / peak,
        "mmjax_xla_buffers_mb": analysis,
        "mmjax_compiler_options": options, "mmjax_parallel_chains": chains,
    }
    if plain_step:
        t_plain = statistics.median(times[2])
        case["mmjax_without_options_tokens_per_s"] = tokens / t_plain
        case["cpu_defaults_speedup"] = t_plain / t_ours
    if memory:
        case["mmjax_peak_rss_growth_mb"] = _child_peak_rss("mmjax", spec, batch, seq_len, seed)
        case["reference_peak_rss_growth_mb"] = _child_peak_rss("torch", spec, batch, seq_len, seed)
    return {
        "name": "train",
        "reference": f"transformers {transformers.__version__} LlamaForCausalLM + torch.optim.AdamW "
                     f"(torch {torch.__version__}, {torch.get_num_threads()} threads, eager attention)",
        "model": {**spec, "num_params": n_params},
        "peak_flops": peak,
        "peak_flops_source": "measured float32 2048x2048x2048 jnp.dot on this machine",
        "ratio": case["ratio"],
        "cases": [case],
    }


def _timed(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready(), 1) for _ in range(reps))
    return 2 * n**3 / best


def _mmjax_trainer(spec, batches, seed, compiler_options=None, parallel_chains=1):
    import jax
    import jax.numpy as jnp

    from mmjax.models.llama import Llama, LlamaConfig
    from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
    from mmjax.train.experiment import OptimizerConfig
    from mmjax.train.optimizer import make_optimizer
    from mmjax.train.state import abstract_boxed_params, count_params, create_train_state
    from mmjax.train.step import make_train_step

    seq_len = batches[0].shape[1] - 1
    config = LlamaConfig(**spec, dtype="float32", param_dtype="float32")
    model = Llama(config)
    opt = OptimizerConfig(learning_rate=LR, warmup_steps=0, end_lr_ratio=1.0, b1=B1, b2=B2,
                          eps=EPS, weight_decay=WD, grad_clip=1.0, no_decay=())
    init_fn = lm_init_fn(model, seq_len)
    tx, schedule = make_optimizer(opt, 1000, abstract_boxed_params(init_fn))
    state, _ = create_train_state(init_fn, tx, seed=seed)
    step_fn = make_train_step(lm_loss_fn(model), tx, schedule, compiler_options=compiler_options,
                              parallel_chains=parallel_chains)
    host = []
    for b in batches:
        bsz = b.shape[0]
        host.append({
            "inputs": jnp.asarray(b[:, :-1], jnp.int32), "targets": jnp.asarray(b[:, 1:], jnp.int32),
            "segment_ids": jnp.ones((bsz, seq_len), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (bsz, seq_len)),
            "loss_mask": jnp.ones((bsz, seq_len), jnp.float32),
        })
    analysis = None
    try:
        mem = step_fn.lower(state, host[0]).compile().memory_analysis()
        analysis = {
            "arguments": mem.argument_size_in_bytes / 2**20, "outputs": mem.output_size_in_bytes / 2**20,
            "temporaries": mem.temp_size_in_bytes / 2**20,
        }
    except Exception:  # noqa: BLE001 - memory analysis is optional per backend
        pass
    box = {"state": state, "i": 0}

    def step():
        box["state"], metrics = step_fn(box["state"], host[box["i"] % len(host)])
        box["i"] += 1
        jax.block_until_ready(metrics["loss"])

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    n_params = count_params(box["state"].params)
    return step, first, analysis, n_params, spec["vocab_size"] * spec["dim"]


def _torch_trainer(spec, batches, seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["dim"], intermediate_size=spec["mlp_dim"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=spec["max_len"],
        tie_word_embeddings=spec["tie_embeddings"], rms_norm_eps=spec["norm_eps"],
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    data = [torch.from_numpy(b) for b in batches]
    box = {"i": 0}

    def step():
        b = data[box["i"] % len(data)]
        box["i"] += 1
        logits = model(input_ids=b[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss.detach())

    return step


_CHILD = r"""
import json, sys
import numpy as np
import jax, torch, transformers, flax, optax
from mmjax.bench import train as T

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024

side, spec, batch, seq_len, seed = json.loads(sys.argv[1])
rng = np.random.default_rng(seed)
batches = [rng.integers(0, spec["vocab_size"], size=(batch, seq_len + 1), dtype=np.int64) for _ in range(4)]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
from mmjax.train.step import parallel_chains_for
from mmjax.xla_options import step_compiler_options
step = (T._mmjax_trainer(spec, batches, seed, step_compiler_options("float32"),
                         parallel_chains_for(batch, sums_over_examples=True))[0]
        if side == "mmjax" else T._torch_trainer(spec, batches, seed))
for _ in range(4):
    step()
print(json.dumps({"growth_mb": status("VmHWM") - before}))
"""


def _child_peak_rss(side: str, spec, batch: int, seq_len: int, seed: int) -> float | None:
    arg = json.dumps([side, spec, batch, seq_len, seed])
    p = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])["growth_mb"]
