"""Text in, text out: `mmjax generate` for a training workdir (model + checkpoint + tokenizer).

    texts = generate_text("workdirs/llm_text", "The with statement", max_new_tokens=80,
                          temperature=0.8, top_k=40)

The prompt is encoded with the workdir's sentencepiece tokenizer (BOS prepended), continued by
`mmjax.generate.generate` (one jit-compiled loop over a preallocated KV cache) and decoded up to
the first EOS. Returns one string per returned sequence: the prompt followed by its continuation.

A workdir trained on conversations (its `experiment.json` names a chat template in
`data.template`, e.g. a LLaVA from the `visual_sft` task) gets the prompt as the user's turn of
that template, generation stops at the template's end-of-turn token, and the answer alone is
returned. A vision-language model takes `images` (file paths or arrays), one per `<image>` in
the prompt, preprocessed as CLIP does at the image tower's size; each `<image>` becomes the
model's `image_seq_length` image tokens. A different number of images and `<image>`s is an
InputError ("Image features and image tokens do not match ..."; exit 2 at the CLI).

    answers = generate_text("workdirs/llava_digits", "<image>\nIs the digit even or odd?",
                            images=["seven.png"])

An image captioner (a BLIP with task="caption", e.g. a `blip` task workdir, which loads as its
captioner: `mmjax.train.inference`) takes the image into its prefill instead of image tokens:
one image per prompt (one prompt goes with every image), the prompt the caption's prefix as in
BLIP ("" or "a picture of"), after [DEC]; the caption stops at [SEP] or at the model's context
(max_new_tokens is capped there). Returns prefix + continuation, the words joined by spaces.

    captions = generate_text("workdirs/blip_capfilt/noisy", "", images=["seven.png"], num_beams=3)
"""

from __future__ import annotations

import os
import sys

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
    images: list | None = None,
) -> list[str]:
    """Continue `prompt` (one string or a batch) with the model in `workdir`; `images` go with
    a vision-language model (see the module docstring)."""
    from mmjax.generate import GenerationConfig, generate
    from mmjax.train import load_for_inference
    from mmjax.train.inference import resolve_workdir

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

    workdir = resolve_workdir(workdir, log=lambda m: print(m, file=sys.stderr))  # a pipeline: its last phase
    model, params, tokenizer = load_for_inference(workdir)
    if tokenizer is None:
        from mmjax.checkpoint import WORKDIR_TOKENIZER_FILE

        raise InputError(f"{workdir} has no {WORKDIR_TOKENIZER_FILE}: generating text needs the "
                         "tokenizer the run was trained with (copy it back into the workdir)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if _is_captioner(model):
        return _caption(model, params, tokenizer, prompts, images, seed,
                        dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, num_beams=num_beams))
    template, system = _chat_template(workdir)
    vision = getattr(model.config, "image_seq_length", None)
    if images and vision is None:
        raise InputError(f"--image: the model in {workdir} takes no images "
                         f"({type(model).__name__})")
    if vision is not None and len(prompts) != 1 and images:
        raise InputError("images go with one prompt at a time")
    pixels = _load_images(images or [], model.config) if vision is not None else None
    bos = tokenizer.bos_id
    if template is not None:
        ids = [_chat_prompt(p, tokenizer, template, system, vision or 1) for p in prompts]
        stop = _stop_ids(template, tokenizer)
    else:
        ids = [([bos] if bos >= 0 else []) + list(tokenizer.encode(p)) for p in prompts]
        stop = (tokenizer.eos_id,)
    extra = {}
    if vision is not None:
        image_id = model.config.image_token_index
        if template is None:  # each <image> piece -> the model's image tokens
            ids = [[t for i in row for t in ([i] * vision if i == image_id else [i])] for row in ids]
        slots = sum(row.count(image_id) for row in ids)
        n = 0 if pixels is None else len(pixels)
        if slots != n * vision:
            raise InputError(
                f"Image features and image tokens do not match: the prompt has "
                f"{slots // max(vision, 1)} <image> placeholder(s) ({slots} image tokens) but "
                f"{n} image(s) were given ({n * vision} features); put one <image> in the "
                "prompt per --image")
        if n:
            extra = {"prefill_inputs": {"images": pixels}}
    pad = tokenizer.pad_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        num_beams=num_beams, eos_token_id=stop, pad_token_id=max(pad, 0),
    )
    out = generate(model, params, ids, config, rng=jax.random.key(seed), **extra)
    texts = []
    if template is not None:  # the answer alone, up to the end of the turn
        for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
            new = [int(t) for t in row[: int(n)]]
            texts.append(tokenizer.decode([t for t in new if t not in stop]).strip())
        return texts
    for prompt_ids, row, n in zip(ids, np.asarray(out.tokens), np.asarray(out.lengths)):
        new = [int(t) for t in row[: int(n)]]
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        # Decode prompt and continuation together: sentencepiece drops the word-boundary
        # space of a sequence's first piece, which would glue the continuation to the prompt.
        texts.append(tokenizer.decode([t for t in prompt_ids if t != bos] + new))
    return texts


def _is_captioner(model) -> bool:
    """A model that reads its image in the prefill and has no image tokens (BLIP caption)."""
    c = model.config
    return (getattr(c, "task", None) == "caption" and hasattr(c, "vision")
            and getattr(c, "image_seq_length", None) is None)


def _caption(model, params, tokenizer, prompts, images, seed, gen) -> list[str]:
    """Captions of `images` continuing `prompts` (see the module docstring)."""
    from mmjax.generate import GenerationConfig, generate

    if not images:
        raise InputError(f"{type(model).__name__} (task='caption') captions images: give --image "
                         "(the prompt, possibly \"\", is the caption's beginning)")
    pixels = _load_images(images, model.config)
    if len(prompts) == 1:
        prompts = prompts * len(pixels)
    if len(prompts) != len(pixels):
        raise InputError(f"{len(prompts)} prompts and {len(pixels)} images: give one prompt per "
                         "image, or one for all")
    ids = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
    room = model.config.max_len - max(len(r) for r in ids)
    if room <= 0:
        raise InputError(f"the prompt leaves no room in the captioner's context of "
                         f"{model.config.max_len} tokens")
    eos = tokenizer.eos_id
    config = GenerationConfig(**{**gen, "max_new_tokens": min(gen["max_new_tokens"], room)},
                              eos_token_id=(eos,), pad_token_id=max(tokenizer.pad_id, 0))
    out = generate(model, params, ids, config, rng=jax.random.key(seed),
                   prefill_inputs={"images": pixels})
    texts = []
    for prompt_ids, row, n in zip(ids, np.asarray(out.tokens), np.asarray(out.lengths)):
        new = [int(t) for t in row[: int(n)]]
        if eos in new:
            new = new[: new.index(eos)]
        texts.append(tokenizer.decode(prompt_ids[1:] + new))
    return texts


def _chat_template(workdir: str) -> tuple[str | None, str | None]:
    """(template, system prompt) a workdir was trained with, or (None, None)."""
    import json

    path = os.path.join(workdir, "experiment.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        data = (json.load(f).get("data") or {})
    template = data.get("template") if isinstance(data, dict) else None
    return template, (data.get("system_prompt") if template else None)


def _chat_prompt(text: str, tokenizer, template: str, system: str | None,
                 image_seq_length: int) -> list[int]:
    from mmjax.data import chat

    has_system = bool(chat.get_template(template).system)
    turns = [] if system is None or not has_system else [{"role": "system", "content": system}]
    turns.append({"role": "user", "content": text})
    r = chat.render(turns, tokenizer, template, image_seq_length=image_seq_length, train=False,
                    add_generation_prompt=True)
    return [int(t) for t in r.tokens]


def _stop_ids(template: str, tokenizer) -> tuple[int, ...]:
    from mmjax.data import chat

    return tuple(chat.stop_ids(template, tokenizer))


def _load_images(images: list, config) -> np.ndarray | None:
    """File paths or arrays -> float32 [n, H, W, 3], CLIP-preprocessed at the tower's size."""
    from mmjax.data.images import clip_preprocess

    if not images:
        return None
    loaded = []
    for image in images:
        if isinstance(image, str):
            if not os.path.isfile(image):
                raise InputError(f"--image {image!r} does not exist")
            from PIL import Image

            try:
                with Image.open(image) as im:
                    image = im.convert("RGB")
            except OSError as e:
                raise InputError(f"--image {image!r} is not a readable image: {e}") from None
        loaded.append(image)
    h, w = config.vision.image_hw
    return clip_preprocess(loaded, size=min(h, w), crop_size=(h, w))
