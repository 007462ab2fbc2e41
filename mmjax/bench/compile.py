"""`mmjax bench compile`: compile time of a deep LLaMA train step, Python loop vs `nn.scan`.

    mmjax bench compile --json
    mmjax bench compile --json --set num_layers=48 --set remat=dots

The same LLaMA (default: 24 layers, dim 256, 4 heads, SwiGLU 688, vocab 4096, tied embeddings,
float32), batch 4 x 128, is built twice: `scan_layers=False` (the reference: a Python loop over
layers, `layers_0 .. layers_{n-1}`, so XLA sees n copies of the block) and `scan_layers=True`
(one block under `nn.scan`, params `[layers, ...]` under `layers/block/...`). Both run the
project's real train step (`mmjax.train.step.make_train_step` over `mmjax.tasks.lm.lm_loss_fn`:
forward, next-token cross-entropy, `jax.grad`, global-norm clipping, optax AdamW), jitted with
the state donated. For each, timed separately:

  trace_lower_s   `jax.jit(step).lower(state, batch)` (Python tracing of the model + StableHLO)
  compile_s       `lowered.compile()` (XLA optimisation and code generation)
  first_step_s    the first call of the compiled executable (buffers allocated)
  step_s          the median of `steps` further calls (what scan costs at run time)

Before anything is timed a 1-layer loop and a 1-layer scan step of the same width are compiled
once, so neither timed program pays JAX's first-use costs. Both programs start from the same
weights (the loop model's params converted with `mmjax.nn.transformer.stack_layer_params`) and
see the same batch: `losses_match` says the first step's loss agrees within float32 rounding
(relative `LOSS_RTOL`), `grad_norm_rel_diff` compares the two gradients' global norms, and the
loss after the remaining steps is reported too (AdamW normalises tiny gradients, so it may drift
a little more than the first-step loss).

`ratio` = loop compile seconds / scan compile seconds (higher = scan compiles faster; the
reference is the loop); `total_ratio` the same for trace+lower+compile and `step_ratio` =
loop step seconds / scan step seconds (below 1 = the scanned program runs slower).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

DEFAULT_MODEL = dict(vocab_size=4096, dim=256, num_layers=24, num_heads=4, num_kv_heads=None,
                     mlp_dim=688, max_len=512, tie_embeddings=True, norm_eps=1e-5)
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.95, 1e-8, 0.1
LOSS_RTOL = 1e-5  # float32 rounding of two orderings of the same sums, losses ~ln(vocab)
REFERENCE = "Python loop over layers, same model and step"


def run(
    num_layers: int = 24, dim: int = 256, num_heads: int = 4, num_kv_heads: int | None = None,
    mlp_dim: int = 688, vocab_size: int = 4096, seq_len: int = 128, batch: int = 4,
    remat: str = "none", steps: int = 3, seed: int = 0, warmup: bool = True,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Loop vs scan compile/step figures (see the module docstring). `remat`: "none", "full",
    "dots" or "dots_no_batch" (both programs use it); `model` overrides other LlamaConfig
    fields."""
    import jax

    from mmjax.errors import ConfigError

    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    config = bench_config(num_layers=num_layers, dim=dim, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, mlp_dim=mlp_dim, vocab_size=vocab_size,
                          seq_len=seq_len, remat=remat, model=model)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq_len + 1), dtype=np.int64)
    host_batch = _lm_batch(tokens)

    if warmup:  # JAX's first-use costs (lowering rules, backend init) outside the timings
        small = config.replace(num_layers=1)
        loop_w = _Trainer(small.replace(scan_layers=False), seq_len, seed)
        scan_w = _Trainer(small.replace(scan_layers=True), seq_len, seed,
                          loop_params=loop_w.state.params)
        for w in (loop_w, scan_w):
            w.step_fn.lower(w.state, host_batch).compile()

    loop = _Trainer(config.replace(scan_layers=False), seq_len, seed)
    scan = _Trainer(config.replace(scan_layers=True), seq_len, seed,
                    loop_params=loop.state.params)
    cases = [t.measure(mode, host_batch, steps) for mode, t in (("loop", loop), ("scan", scan))]
    lc, sc = cases
    loss_diff = abs(lc["first_loss"] - sc["first_loss"])
    last_diff = abs(lc["last_loss"] - sc["last_loss"])
    gn_diff = (abs(lc["first_grad_norm"] - sc["first_grad_norm"])
               / max(abs(lc["first_grad_norm"]), 1e-30))
    losses_match = bool(loss_diff <= LOSS_RTOL * max(abs(lc["first_loss"]), 1.0))
    return {
        "name": "compile",
        "reference": REFERENCE,
        "ratio": lc["compile_s"] / sc["compile_s"],
        "ratio_definition": "loop compile_s / scan compile_s (higher = scan compiles faster)",
        "total_ratio": lc["total_s"] / sc["total_s"],
        "step_ratio": lc["step_s"] / sc["step_s"],
        "losses_match": losses_match,
        "loss_abs_diff": loss_diff,
        "loss_rtol": LOSS_RTOL,
        "last_loss_abs_diff": last_diff,
        "grad_norm_rel_diff": gn_diff,
        "cases": cases,
        "model": {**config.to_dict(), "num_params": config.num_params()},
        "batch": batch, "seq_len": seq_len, "remat": remat, "steps": steps,
        "step": "mmjax.train.step.make_train_step(mmjax.tasks.lm.lm_loss_fn) with AdamW "
                f"(lr {LR}, b1 {B1}, b2 {B2}, wd {WD}) + global-norm clipping 1.0, state donated",
        "cpu": cpu_info(),
        "load_average": _loadavg(),
        "jax_devices": [str(d) for d in jax.devices()[:1]],
    }


def bench_config(num_layers: int = 24, dim: int = 256, num_heads: int = 4,
                 num_kv_heads: int | None = None, mlp_dim: int = 688, vocab_size: int = 4096,
                 seq_len: int = 128, remat: str = "none", model: dict[str, Any] | None = None):
    """The (loop-layout) LlamaConfig the benchmark compiles; `remat` one of
    `mmjax.nn.transformer.REMAT_POLICIES` ("none" = no remat)."""
    from mmjax.errors import ConfigError
    from mmjax.models.llama import LlamaConfig
    from mmjax.nn.transformer import REMAT_POLICIES

    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat {remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
    spec = {**DEFAULT_MODEL, "num_layers": num_layers, "dim": dim, "num_heads": num_heads,
            "num_kv_heads": num_kv_heads, "mlp_dim": mlp_dim, "vocab_size": vocab_size,
            "max_len": max(DEFAULT_MODEL["max_len"], seq_len), **(model or {})}
    remat_kw = dict(remat=False) if remat == "none" else dict(remat=True, remat_policy=remat)
    return LlamaConfig(**spec, **remat_kw, dtype="float32", param_dtype="float32",
                       scan_layers=False)


def _lm_batch(tokens: np.ndarray) -> dict[str, Any]:
    import jax.numpy as jnp

    bsz, seq_len = tokens.shape[0], tokens.shape[1] - 1
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((bsz, seq_len), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (bsz, seq_len)),
        "loss_mask": jnp.ones((bsz, seq_len), jnp.float32),
    }


class _Trainer:
    """One config's model, optimizer, initial state and (uncompiled) jitted train step. With
    `loop_params` the state starts from those (loop-layout) params, stacked for a scanned
    model."""

    def __init__(self, config, seq_len: int, seed: int, loop_params=None):
        import jax

        from mmjax.models.llama import Llama
        from mmjax.nn.transformer import match_layer_layout
        from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
        from mmjax.train.experiment import OptimizerConfig
        from mmjax.train.optimizer import make_optimizer
        from mmjax.train.state import abstract_boxed_params, create_train_state, count_params
        from mmjax.train.step import make_train_step

        self.config = config
        model = Llama(config)
        opt = OptimizerConfig(learning_rate=LR, warmup_steps=0, end_lr_ratio=1.0, b1=B1, b2=B2,
                              eps=EPS, weight_decay=WD, grad_clip=1.0)
        init_fn = lm_init_fn(model, seq_len)
        boxed = abstract_boxed_params(init_fn)
        tx, schedule = make_optimizer(opt, 1000, boxed)
        state, _ = create_train_state(init_fn, tx, seed=seed)
        if loop_params is not None:
            import flax.linen as nn

            params = match_layer_layout(loop_params, nn.meta.unbox(boxed))
            # own copies: the loop state (embedding, final norm) is donated by its own step
            params = jax.tree_util.tree_map(lambda x: jax.numpy.array(x, copy=True), params)
            state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))
        self.state = state
        self.num_params = count_params(state.params)
        self.step_fn = make_train_step(lm_loss_fn(model), tx, schedule)

    def measure(self, mode: str, batch, steps: int) -> dict[str, Any]:
        import jax

        t0 = time.perf_counter()
        lowered = self.step_fn.lower(self.state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        temp_mb = None
        try:
            temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
        except Exception:  # noqa: BLE001 - memory analysis is optional per backend
            pass
        state = self.state
        self.state = None  # donated below
        t3 = time.perf_counter()
        state, metrics = compiled(state, batch)
        first_loss, first_gn = float(metrics["loss"]), float(metrics["grad_norm"])
        t4 = time.perf_counter()
        times, loss = [], first_loss
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            loss = float(metrics["loss"])  # blocks until the step is done
            times.append(time.perf_counter() - t)
        jax.block_until_ready(state)
        return {
            "mode": mode,
            "scan_layers": self.config.scan_layers,
            "trace_lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "total_s": t2 - t0,
            "first_step_s": t4 - t3,
            "step_s": statistics.median(times),
            "first_loss": first_loss,
            "first_grad_norm": first_gn,
            "last_loss": loss,
            "xla_temp_mb": temp_mb,
            "stablehlo_chars": len(lowered.as_text()),
            "num_params": self.num_params,
        }


def cpu_info() -> dict[str, Any]:
    """This machine's CPU model name (lscpu's `Model name`, from /proc/cpuinfo) and whether
    AVX-512 is present (the two CPU-2 kinds differ there)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
            "cpu_count": os.cpu_count()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
