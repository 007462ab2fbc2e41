"""`mmjax bench attention`: attention time, TFLOP/s and memory vs sequence length.

Implementations: mmjax.ops.attention with `xla`, `flash` (Pallas kernel), `cudnn` (GPU only),
and PyTorch's `torch.nn.functional.scaled_dot_product_attention` as the outside reference,
all in one process on the same inputs ([batch, seq, heads, head_dim], MHA, causal and not).

Per case (sequence length x causal x implementation):
  fwd_ms, fwd_bwd_ms   medians of `repeats` timed calls after a warm-up (compile excluded);
                       fwd_bwd = forward + vjp w.r.t. q, k, v with a random cotangent.
  fwd_tflops, fwd_bwd_tflops
                       forward FLOPs = 4 * batch * heads * seq^2 * head_dim (two matmuls),
                       halved when causal; backward counted as 2.5x forward (FlashAttention's
                       convention: five matmuls against two, recomputation not counted).
  max_abs_diff_vs_first  output difference from the first implementation listed (xla).
  error                a case that failed (e.g. xla's [seq, seq] scores out of GPU memory).
  peak_bytes           JAX: argument + output + temporary bytes of the compiled program
                       (`jax.jit(f).lower(...).compile().memory_analysis()`, both for forward
                       and forward+backward); torch on CUDA: max_memory_allocated during
                       the call plus its inputs; torch on CPU: not measured (null).
Memory table (`memory`): the compiled programs' temporary bytes at longer lengths (compiled,
never run), with `growth_exponent` = least-squares slope of log(temp bytes) vs log(seq): ~1 for
flash (linear), ~2 for xla (the [seq, seq] score matrix).

`ratio` (INTERFACES.md: mmjax throughput / reference throughput, worst case): here mmjax =
`ops.attention(implementation=None)`, i.e. what the models run on this platform (xla on CPU;
cuDNN or flash on GPU), reference = torch SDPA, forward+backward, worst case over lengths and
causal/non-causal. `flash_vs_cudnn` (GPU) gives the kernel's forward TFLOP/s over cuDNN's.

On CPU the flash kernel runs in Pallas interpret mode: its times there measure the interpreter,
not the kernel (`interpret: true` in its cases); only its memory growth is meaningful.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

GPU_DEFAULTS = {
    "seq_lens": (1024, 2048, 4096, 8192, 16384),
    "batch_tokens": 16384,
    "heads": 16,
    "head_dim": 128,
    "dtype": "bfloat16",
    "memory_seq_lens": (1024, 2048, 4096, 8192, 16384, 32768),
}
CPU_DEFAULTS = {
    "seq_lens": (256, 512, 1024),
    "batch_tokens": 1024,
    "heads": 4,
    "head_dim": 64,
    "dtype": "float32",
    "memory_seq_lens": (512, 1024, 2048, 4096, 8192),
}


def run(
    seq_lens: Sequence[int] | None = None,
    batch_tokens: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    dtype: str | None = None,
    causal: Sequence[bool] = (False, True),
    impls: Sequence[str] | None = None,
    memory_seq_lens: Sequence[int] | None = None,
    repeats: int = 5,
    torch_reference: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    import jax

    platform = jax.default_backend()
    defaults = GPU_DEFAULTS if platform == "gpu" else CPU_DEFAULTS
    seq_lens = tuple(seq_lens or defaults["seq_lens"])
    batch_tokens = batch_tokens or defaults["batch_tokens"]
    heads = heads or defaults["heads"]
    head_dim = head_dim or defaults["head_dim"]
    dtype = dtype or defaults["dtype"]
    memory_seq_lens = tuple(memory_seq_lens or defaults["memory_seq_lens"])
    if impls is None:
        impls = ("xla", "flash") + (("cudnn",) if platform == "gpu" else ())
    impls = tuple(impls)
    default_impl = _default_impl_name(platform, dtype, head_dim)

    cases = []
    for seq in seq_lens:
        batch = max(1, batch_tokens // seq)
        for c in causal:
            inputs = _inputs(batch, seq, heads, head_dim, seed)
            runners = [(impl, functools.partial(_time_jax, impl)) for impl in impls]
            if torch_reference:
                runners.append(("torch_sdpa", _time_torch))
            ref_out = None
            for impl, runner in runners:
                case = {
                    "impl": impl,
                    "batch": batch,
                    "seq": seq,
                    "causal": c,
                    "heads": heads,
                    "head_dim": head_dim,
                    "dtype": dtype,
                    "interpret": impl == "flash" and platform == "cpu",
                }
                try:
                    case.update(runner(inputs, dtype, c, repeats))
                except (RuntimeError, ValueError, MemoryError) as e:  # e.g. xla OOM on GPU
                    case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    cases.append(case)
                    continue
                _add_tflops(case, batch, seq, heads, head_dim, c)
                out = case.pop("_out")
                ref_out = out if ref_out is None else ref_out
                case["max_abs_diff_vs_first"] = float(np.max(np.abs(out - ref_out)))
                cases.append(case)

    memory = _memory_table(impls, memory_seq_lens, heads, head_dim, dtype)
    result: dict[str, Any] = {
        "name": "attention",
        "reference": _torch_name() if torch_reference else None,
        "ratio_means": (
            f"fwd+bwd throughput of mmjax.ops.attention(implementation=None) (= {default_impl!r} "
            "here) / torch SDPA's, worst case over lengths and causal"
        ),
        "cases": cases,
        "memory": memory,
    }
    if torch_reference:
        ratios = []
        for seq in seq_lens:
            for c in causal:
                ours = _find(cases, default_impl, seq, c)
                ref = _find(cases, "torch_sdpa", seq, c)
                if ours and ref and "error" not in ours and "error" not in ref:
                    ratios.append(ref["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
        result["ratio"] = min(ratios) if ratios else None
    if "cudnn" in impls and "flash" in impls:
        pairs = [
            (_find(cases, "flash", s, c), _find(cases, "cudnn", s, c))
            for s in seq_lens
            for c in causal
        ]
        vals = [
            f["fwd_tflops"] / d["fwd_tflops"]
            for f, d in pairs
            if "error" not in f and "error" not in d
        ]
        result["flash_vs_cudnn"] = min(vals) if vals else None
    return result


def _default_impl_name(platform: str, dtype: str, head_dim: int) -> str:
    if platform == "cpu":
        return "xla"
    if (
        platform == "gpu"
        and dtype in ("bfloat16", "float16")
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "flash"


def _find(cases, impl, seq, causal):
    for c in cases:
        if c["impl"] == impl and c["seq"] == seq and c["causal"] == causal:
            return c
    return None


def _inputs(batch, seq, heads, head_dim, seed):
    rng = np.random.default_rng(seed)
    shape = (batch, seq, heads, head_dim)
    return [rng.standard_normal(shape, np.float32) for _ in range(4)]  # q, k, v, d_out


def _add_tflops(case, batch, seq, heads, head_dim, causal):
    fwd = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    case["fwd_tflops"] = fwd / (case["fwd_ms"] * 1e-3) / 1e12
    case["fwd_bwd_tflops"] = 3.5 * fwd / (case["fwd_bwd_ms"] * 1e-3) / 1e12


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _attention_fns(impl: str, causal: bool):
    import jax

    from mmjax.ops import attention

    def fwd(q, k, v):
        return attention(q, k, v, causal=causal, implementation=impl)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _compiled_bytes(jitted, *args) -> dict[str, int]:
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return {}
    temp = int(m.temp_size_in_bytes)
    peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + temp - m.alias_size_in_bytes)
    return {"temp": temp, "peak": peak}


def _time_jax(impl: str, inputs, dtype: str, causal: bool, repeats: int) -> dict[str, Any]:
    """Times and compiled memory of ops.attention(implementation=impl), forward and fwd+bwd."""
    import jax
    import jax.numpy as jnp

    q, k, v, do = (jnp.asarray(x, jnp.dtype(dtype)) for x in inputs)
    fwd, fwd_bwd = _attention_fns(impl, causal)
    t0 = time.perf_counter()
    out = fwd(q, k, v).block_until_ready()
    jax.block_until_ready(fwd_bwd(q, k, v, do))
    first_call_s = time.perf_counter() - t0
    fwd_ms = _median_ms(lambda: fwd(q, k, v).block_until_ready(), repeats)
    fwd_bwd_ms = _median_ms(lambda: jax.block_until_ready(fwd_bwd(q, k, v, do)), repeats)
    mem_f = _compiled_bytes(fwd, q, k, v)
    mem_fb = _compiled_bytes(fwd_bwd, q, k, v, do)
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "first_call_s": first_call_s,
        "fwd_peak_bytes": mem_f.get("peak"),
        "fwd_bwd_peak_bytes": mem_fb.get("peak"),
        "_out": np.asarray(out, np.float32),
    }


def _torch_name() -> str:
    import torch

    dev = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} scaled_dot_product_attention ({dev})"


def _time_torch(inputs, dtype: str, causal: bool, repeats: int) -> dict[str, Any]:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    # [B, T, N, H] -> [B, N, T, H]
    q, k, v, do = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(dev, tdtype)
        for x in inputs
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            out = sdpa(q, k, v, is_causal=causal)
        sync()
        return out

    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

    def fwd_bwd():
        out = sdpa(qg, kg, vg, is_causal=causal)
        grads = torch.autograd.grad(out, (qg, kg, vg), do)
        sync()
        return grads

    t0 = time.perf_counter()
    out = fwd()
    fwd_bwd()
    first_call_s = time.perf_counter() - t0
    peak = {}
    if dev == "cuda":
        # new allocations during the call + its inputs (q, k, v [, d_out]), like JAX's
        # argument + output + temp bytes
        one = q.numel() * q.element_size()
        for name, fn, n_in in (("fwd_peak_bytes", fwd, 3), ("fwd_bwd_peak_bytes", fwd_bwd, 4)):
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak[name] = int(torch.cuda.max_memory_allocated() - base) + n_in * one
    return {
        "fwd_ms": _median_ms(fwd, repeats),
        "fwd_bwd_ms": _median_ms(fwd_bwd, repeats),
        "first_call_s": first_call_s,
        "fwd_peak_bytes": peak.get("fwd_peak_bytes"),
        "fwd_bwd_peak_bytes": peak.get("fwd_bwd_peak_bytes"),
        "_out": out.float().cpu().numpy().transpose(0, 2, 1, 3),
    }


def _memory_table(impls, seq_lens, heads, head_dim, dtype) -> dict[str, Any]:
    """Temporary bytes of the compiled fwd and fwd+bwd programs (batch 1, causal), never run."""
    import jax

    rows = []
    for impl in impls:
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue
        fwd, fwd_bwd = _attention_fns(impl, True)
        for seq in seq_lens:
            x = jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype)
            f = _compiled_bytes(fwd, x, x, x)
            fb = _compiled_bytes(fwd_bwd, x, x, x, x)
            rows.append(
                {
                    "impl": impl,
                    "seq": seq,
                    "fwd_temp_bytes": f.get("temp"),
                    "fwd_bwd_temp_bytes": fb.get("temp"),
                    "fwd_bwd_peak_bytes": fb.get("peak"),
                }
            )
    growth = {}
    for impl in {r["impl"] for r in rows}:
        pts = [
            (r["seq"], r["fwd_bwd_temp_bytes"])
            for r in rows
            if r["impl"] == impl and r["fwd_bwd_temp_bytes"]
        ]
        if len(pts) >= 2:
            xs, ys = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            growth[impl] = float(np.polyfit(xs, ys, 1)[0])
    return {
        "batch": 1,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "causal": True,
        "rows": rows,
        "growth_exponent": growth,
    }
