"""Text in, text out: `mmjax generate` for a training workdir (model + checkpoint + tokenizer).

    texts = generate_text("workdirs/llm_text", "The with statement", max_new_tokens=80,
                          temperature=0.8, top_k=40)

The prompt is encoded with the workdir's sentencepiece tokenizer (BOS prepended), continued by
`mmjax.generate.generate` (one jit-compiled loop over a preallocated KV cache) and decoded up to
the first EOS. Returns one string per returned sequence: the prompt followed by its continuation.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mmjax.errors import InputError


def generate_text(
    workdir: str,
    prompt: str | list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    seed: int = 0,
) -> list[str]:
    """Continue `prompt` (one string or a batch) with the model in `workdir`."""
    from mmjax.generate import GenerationConfig, generate
    from mmjax.train import load_for_inference

    if not os.path.isdir(workdir):
        raise InputError(f"--workdir {workdir!r} does not exist (train first: mmjax train CONFIG)")
    if max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise InputError(f"--top-k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise InputError(f"--num-beams must be >= 1, got {num_beams}")

    model, params, tokenizer = load_for_inference(workdir)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    bos = tokenizer.bos_id
    ids = [([bos] if bos >= 0 else []) + list(tokenizer.encode(p)) for p in prompts]
    pad = tokenizer.pad_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        num_beams=num_beams, eos_token_id=tokenizer.eos_id, pad_token_id=max(pad, 0),
    )
    out = generate(model, params, ids, config, rng=jax.random.key(seed))
    texts = []
    for prompt_ids, row, n in zip(ids, np.asarray(out.tokens), np.asarray(out.lengths)):
        new = [int(t) for t in row[: int(n)]]
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        # Decode prompt and continuation together: sentencepiece drops the word-boundary
        # space of a sequence's first piece, which would glue the continuation to the prompt.
        texts.append(tokenizer.decode([t for t in prompt_ids if t != bos] + new))
    return texts
