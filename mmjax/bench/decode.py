"""`mmjax bench decode`: greedy decoding tokens/s with the KV cache vs transformers' `generate`.

One random-weight LLaMA is built in PyTorch (`LlamaForCausalLM`, float32, eager attention),
saved with `save_pretrained` and converted with `mmjax.convert.from_hf`, so both sides run the
same weights on the same prompts in the same process. For each batch size both decode
`new_tokens` tokens greedily after a `prompt_len`-token prompt (EOS disabled so every run
produces exactly `new_tokens` tokens). Throughput = batch * new_tokens / wall time (prefill
included on both sides); the median of `repeats` timed runs after one warm-up run (the warm-up
compiles the mmjax loop; compile time is reported separately). `tokens_match` says whether the
two produced the same tokens (they should: same weights, fp32, greedy).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Sequence

import numpy as np

DEFAULT_MODEL = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def run(
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 128,
    prompt_len: int = 32,
    repeats: int = 3,
    model: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    import jax
    import torch
    import transformers

    from mmjax.convert import from_hf
    from mmjax.generate import GenerationConfig, generate

    hf_kwargs = {**DEFAULT_MODEL, **(model or {})}
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**hf_kwargs, attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        module, params = from_hf(tmp)
    n_params = sum(p.numel() for p in hf_model.parameters())

    rng = np.random.default_rng(seed)
    cases = []
    for batch in batch_sizes:
        prompts = rng.integers(3, hf_kwargs["vocab_size"], size=(batch, prompt_len), dtype=np.int64)

        # --- transformers ------------------------------------------------------------------
        def run_hf():
            with torch.no_grad():
                out = hf_model.generate(
                    torch.from_numpy(prompts), attention_mask=torch.ones_like(torch.from_numpy(prompts)),
                    do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    eos_token_id=None, pad_token_id=0, num_beams=1,
                )
            return out[:, prompt_len:].numpy()

        # --- mmjax ---------------------------------------------------------------------------
        gen_config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos_token_id=(),
                                      pad_token_id=0, prompt_bucket=prompt_len)
        tokens = np.asarray(prompts, np.int32)
        mask = np.ones_like(tokens, bool)

        def run_mmjax():
            out = generate(module, params, (tokens, mask), gen_config, rng=jax.random.key(seed))
            return np.asarray(out.tokens)

        t0 = time.perf_counter()
        ours = run_mmjax()  # compiles
        compile_s = time.perf_counter() - t0
        theirs = run_hf()  # warm-up
        t_ours = statistics.median(_timed(run_mmjax) for _ in range(repeats))
        t_hf = statistics.median(_timed(run_hf) for _ in range(repeats))
        tok = batch * new_tokens
        cases.append({
            "batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len,
            "mmjax_tokens_per_s": tok / t_ours, "reference_tokens_per_s": tok / t_hf,
            "ratio": t_hf / t_ours, "mmjax_s": t_ours, "reference_s": t_hf,
            "mmjax_first_call_s": compile_s,
            "tokens_match": bool(np.array_equal(ours, theirs)),
        })
    return {
        "name": "decode",
        "reference": f"transformers {transformers.__version__} LlamaForCausalLM.generate "
                     f"(torch {torch.__version__}, {torch.get_num_threads()} threads, eager attention)",
        "model": {**hf_kwargs, "num_params": n_params},
        "ratio": min(c["ratio"] for c in cases),
        "cases": cases,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
