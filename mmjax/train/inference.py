"""Load a trained workdir for inference: (module, params, tokenizer or None).

A workdir of the `blip` task (ITC + ITM + LM over one shared param tree, `mmjax.tasks.blip`)
loads as its captioner: one `Blip` with task="caption" (BlipForConditionalGeneration's
layout), its `text_decoder` the shared BERT trunk with the decoder's own self-attention
swapped in (`blip_caption_params`), the vision tower and LM head as trained, and a word-level
tokenizer (`CaptionWordTokenizer`) over the task's caption vocabulary whose `bos_id` is
[DEC], the caption's first token, and `eos_id` [SEP]. `mmjax generate --workdir W --image
digit.png --prompt ""` then captions the image; a prompt is the caption's prefix ("a photo
of").
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn

from mmjax import checkpoint
from mmjax.errors import InputError

BLIP_VOCAB_FILE = "caption_vocab.json"  # a blip workdir's caption words ({"words", "enc_id", "dec_id"})
_LM_HEADS = ("lm_transform", "lm_norm", "lm_bias")


def resolve_workdir(workdir: str, log=None) -> str:
    """A pipeline's root (`DIR/pipeline.json`, no model of its own) -> the workdir of its last
    finished phase (BLIP-2's stage 2, CapFilt's retrain); any other path as it is."""
    from mmjax.train.pipeline import RECORD_FILE

    record = os.path.join(workdir, RECORD_FILE)
    if os.path.isfile(os.path.join(workdir, checkpoint.WORKDIR_MODEL_FILE)) or not os.path.isfile(record):
        return workdir
    with open(record) as f:
        stages = json.load(f).get("stages", {})
    phases = [name for name, rec in stages.items() if rec.get("done") and "fingerprint" in rec]
    if not phases:
        raise InputError(f"{workdir} is a pipeline root with no finished phase yet (see {record})")
    chosen = os.path.join(workdir, phases[-1])
    if log is not None:
        log(f"{workdir} is a pipeline: using its last finished phase, {chosen}")
    return chosen


def load_for_inference(workdir: str) -> tuple[nn.Module, Any, Any]:
    """The model module, the latest checkpoint's params and the workdir's sentencepiece
    tokenizer (None when the run had none, e.g. an image classifier); a `blip` task workdir:
    its captioner and caption tokenizer (see the module docstring); a pipeline's root: its
    last finished phase (`resolve_workdir`).

    Raises InputError when `workdir` is not a training workdir or holds no checkpoint.
    """
    workdir = resolve_workdir(workdir)
    if _experiment(workdir).get("task") == "blip":
        return load_blip_captioner(workdir)
    model, _, params = checkpoint.load_workdir(workdir)
    tok_path = os.path.join(workdir, checkpoint.WORKDIR_TOKENIZER_FILE)
    tokenizer = load_tokenizer(tok_path) if os.path.isfile(tok_path) else None
    return model, params, tokenizer


def load_tokenizer(path: str) -> Any:
    from mmjax.data.tokenizer import Tokenizer

    if not os.path.isfile(path):
        raise InputError(f"no tokenizer at {path}")
    return Tokenizer.load(path)


def _experiment(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "experiment.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# --- BLIP task workdirs ------------------------------------------------------------------------
def blip_caption_params(shared: Any, share_text: bool) -> dict[str, Any]:
    """The caption `Blip`'s param tree from the `blip` task's shared tree: vision, the LM head,
    and text_decoder = the text encoder's trunk with decoder/layers_i's own self-attention
    (share_text) or decoder/ itself (a whole BERT, share_text=False)."""
    if share_text:
        decoder = dict(shared["text_encoder"])
        for name, own in shared["decoder"].items():
            decoder[name] = {**shared["text_encoder"][name], **own}
    else:
        decoder = shared["decoder"]
    return {"vision": shared["vision"], "text_decoder": decoder, **{k: shared[k] for k in _LM_HEADS}}


class CaptionWordTokenizer:
    """Words <-> ids of a `blip` workdir's caption vocabulary, for `mmjax generate`: `encode`
    gives the words' ids (no [DEC], no [SEP]), `decode` the words of ids (special ids
    dropped). bos_id = [DEC] (a caption's first token), eos_id = [SEP], pad_id = 0."""

    pad_id = 0

    def __init__(self, words: Sequence[str], dec_id: int):
        from mmjax.data.digits import CaptionTokenizer

        self._tok = CaptionTokenizer(words)
        self.words = self._tok.words
        self.bos_id, self.eos_id = int(dec_id), self._tok.eos_id
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        words = self._tok.split(text)
        unknown = [w for w in words if w not in self._ids]
        if unknown:
            raise InputError(f"prompt {text!r}: word(s) {unknown} are not in this captioner's "
                             f"vocabulary of {len(self.words)} words (e.g. {', '.join(self.words[:8])})")
        return [self._ids[w] for w in words]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i - 2] for i in ids if 2 <= i < self.eos_id)


def load_blip_captioner(workdir: str) -> tuple[nn.Module, Any, CaptionWordTokenizer]:
    """(caption `Blip`, its params, CaptionWordTokenizer) of a `blip` task workdir's latest
    checkpoint. InputError when it holds no (readable) checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    from mmjax.models import build_model

    spec = checkpoint.read_workdir_info(workdir)
    family = spec.get("family")
    _, retrieval = build_model(family, spec.get("config") or {})
    config = retrieval.replace(task="caption", text=retrieval.text.replace(causal=True))
    module, config = build_model(family, config)
    data = _experiment(workdir).get("data") or {}
    ckpt_dir = os.path.abspath(os.path.join(workdir, checkpoint.WORKDIR_CHECKPOINT_DIR))
    steps = checkpoint.checkpoint_steps(ckpt_dir)
    if not steps:
        raise InputError(f"{workdir!r} holds no checkpoint yet ({ckpt_dir})")
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    errors = []
    shared = None
    try:
        for step in steps:  # newest readable first (a read-only command moves nothing)
            try:
                meta = manager.item_metadata(step)["params"]
                tree = getattr(meta, "tree", meta)
                target = jax.tree_util.tree_map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
                shared = manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(target)))["params"]
                break
            except Exception as e:  # noqa: BLE001 - named below
                errors.append(f"step {step}: {checkpoint.one_line(e)}")
    finally:
        manager.close()
    if shared is None:
        raise InputError(f"no readable checkpoint in {ckpt_dir}: " + "; ".join(errors))
    params = blip_caption_params(shared, bool(data.get("share_text", True)))
    return module, params, _blip_tokenizer(workdir, data, config)


def _blip_tokenizer(workdir: str, data: dict[str, Any], config) -> CaptionWordTokenizer:
    """The workdir's caption vocabulary (BLIP_VOCAB_FILE, written by the task), else the one
    its data config rebuilds (workdirs trained before the file existed)."""
    path = os.path.join(workdir, BLIP_VOCAB_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            spec = json.load(f)
        tok = CaptionWordTokenizer(spec["words"], spec["dec_id"])
    else:
        from mmjax.data.photo_captions import load_caption_set

        cs = load_caption_set(data.get("image_size", 16), data.get("test_fraction", 0.2),
                              data.get("seed", 0), photos=bool(data.get("photos", False)))
        tok = CaptionWordTokenizer(cs.tokenizer.words, cs.tokenizer.vocab_size + 1)
    if tok.bos_id != config.bos_token_id or tok.eos_id != config.sep_token_id:
        raise InputError(f"{workdir}: the caption vocabulary ([DEC]={tok.bos_id}, [SEP]={tok.eos_id}) "
                         f"does not match the model's (bos {config.bos_token_id}, sep "
                         f"{config.sep_token_id}); was {BLIP_VOCAB_FILE} replaced?")
    return tok
