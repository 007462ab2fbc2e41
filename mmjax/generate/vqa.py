"""BLIP's visual question answering through the generation loop: an answer starts at [DEC]
(bos) and stops at [SEP], conditioned on the image and the question (prefill inputs of a
`task="vqa"` `mmjax.models.blip.Blip`). It lives here, not in the model file, because models
sit below the generation loop.

    out = answer_vqa(model, params, images, question_ids, question_mask)   # GenerationOutput
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.generate.loop import GenerationConfig, generate


def answer_vqa(module: Any, params: Any, images: Any, question: Any, question_mask: Any = None,
               config: Any = None):
    """Greedy (or `config`'s) answers of a vqa `Blip` as transformers'
    `BlipForQuestionAnswering.generate`: each answer starts at bos_token_id ([DEC]) and stops at
    sep_token_id; the question encoder reads `question_mask`, the answer decoder every question
    state (transformers' generate passes an all-ones mask there). images [B, H, W, C], question
    [B, T_q] ids -> `mmjax.generate.GenerationOutput` (tokens [B, max_new_tokens], the answer
    without its [DEC], pad_token_id after [SEP])."""
    c = module.config
    if c.task != "vqa":
        raise ConfigError("BLIP: answer_vqa needs a vqa model (task='vqa')")
    question = jnp.asarray(question, jnp.int32)
    mask = jnp.ones(question.shape, bool) if question_mask is None else jnp.asarray(question_mask, bool)
    config = config or GenerationConfig(max_new_tokens=10, pad_token_id=c.pad_token_id)
    return generate(module, params, [[c.bos_token_id]] * question.shape[0], config,
                    prefill_inputs={"images": jnp.asarray(images), "question": question, "question_mask": mask})
