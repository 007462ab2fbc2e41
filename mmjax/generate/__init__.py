"""Decoding: greedy, temperature, top-k, top-p, beam search; one jit-compiled KV-cache loop.

    from mmjax.generate import GenerationConfig, generate
    out = generate(model, params, prompts, GenerationConfig(max_new_tokens=64, temperature=0.8, top_k=40))
"""

from mmjax.generate.loop import GenerationConfig, GenerationOutput, generate, prepare_prompts
from mmjax.generate.processors import (
    choose_next,
    no_repeat_ngram_mask,
    process_logits,
    top_k_mask,
    top_p_mask,
)
from mmjax.generate.speculative import SpeculativeOutput, speculative_generate

__all__ = [
    "GenerationConfig", "GenerationOutput", "choose_next", "generate", "no_repeat_ngram_mask",
    "prepare_prompts", "process_logits", "top_k_mask", "top_p_mask",
]
__all__ += ["SpeculativeOutput", "speculative_generate"]
