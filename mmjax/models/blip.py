"""BLIP: a ViT image encoder and a BERT text side reading the image through cross-attention --
an image-grounded text decoder (captioning, `task="caption"`) or an image-grounded / unimodal
text encoder with matching and contrastive heads (retrieval, `task="retrieval"`).

    config = BlipConfig.from_variant("tiny")                       # task="caption"
    model = Blip(config)
    params = model.init(rng, tokens, images)["params"]             # tokens [B, T] int, images [B, H, W, C]
    logits = model.apply({"params": params}, tokens, images)       # [B, T, vocab]: next-token logits
    embeds = model.apply({"params": params}, images, method="encode_image")  # [B, N, vision.dim]
    # captioning with the generation loop (the image goes into the prompt's prefill only):
    out = generate(model, params, [[config.bos_token_id]] * B, GenerationConfig(max_new_tokens=20),
                   prefill_inputs={"images": images})              # stops at [SEP] (eos_ids)

    config = BlipConfig.from_variant("tiny-retrieval")             # task="retrieval"
    itm = model.apply({"params": params}, images, tokens, mask, method="itm_logits")  # [B, 2]
    image_feat, text_feat, sim = model.apply({"params": params}, images, tokens, mask, method="itc")
    itm, out = model.apply({"params": params}, tokens, images, input_mask=mask, return_intermediates=True)

Image side: `mmjax.models.vit.ViT` with BLIP's layout (`BLIP_VISION_LAYOUT`: a biased patch
projection, [CLS] + learned positions over every token, pre-norm blocks with q/k/v biases, no
pre-norm on the embeddings, the final LayerNorm over the whole sequence). The image embeddings
every head reads are the ViT's `final_hidden` [B, N = patches + 1, vision.dim] (Hugging Face's
`vision_model(...).last_hidden_state`).

Text side: `mmjax.models.bert.Bert` (post-norm, word + position embeddings, no token types,
cross-attention in every layer with keys/values from `vision.dim`-wide image embeddings).
  * caption: the causal decoder (`text.causal=True`) attends to every image embedding; the LM
    head is BERT's: LN(gelu(dense(h))) then the tied word embedding plus a bias [vocab]. Logits
    at position t predict token t+1. Captions start with `bos_token_id` ([DEC]) in place of the
    tokenizer's [CLS] and stop at `sep_token_id` ([SEP]); `eos_ids` is (sep_token_id,).
  * retrieval: the bidirectional encoder (`text.causal=False`). `itm_logits`: with
    cross-attention to the image, itm_head(h[:, 0]) [B, 2] (index 1 = "match"). `itc`: the text
    alone (no cross-attention, `input_mask` only), image_feat = normalize(vision_proj(image[:, 0])),
    text_feat = normalize(text_proj(h[:, 0])), sim = image_feat @ text_feat.T [B_img, B_txt]
    (cosine, no temperature). The caller writes the first token: the BLIP processor's [CLS] as
    Hugging Face's `BlipForImageTextRetrieval` takes it (the original BLIP puts [ENC] there for
    ITM; the model does not rewrite it).

VQA (`task="vqa"`, transformers' `BlipForQuestionAnswering`): the question encoder (`text`
with causal=False, cross-attending to the image embeddings) and the answer decoder (`text`, its
cross-attention reading the question states, so text.dim == vision.dim) with the caption LM head.

    config = BlipConfig.from_variant("tiny-vqa")                   # task="vqa"
    logits = model.apply({"params": params}, images, question, answer, question_mask, answer_mask,
                         method="vqa_logits")                      # [B, T_a, vocab]
    q = model.apply({"params": params}, images, question, question_mask, method="encode_question")
    out = answer_vqa(model, params, images, question, question_mask)  # from mmjax.generate.vqa

Generation: the module's `__call__` follows the `Llama` convention. `init_cache(batch, max_len)`
gives a `BlipCache`: the decoder's self-attention `KVCache` plus the image embeddings, which the
prefill call (with `images=`) computes and stores; the decoding steps (no images) read them
back and recompute the cross-attention keys/values from them (an equivalent of caching those
keys/values: the same numbers). Positions count each row's real tokens, so a left-padded prompt
gives transformers' numbers for the unpadded one.

Intermediates (`return_intermediates=True`): `vision_hidden_states` (the ViT's embeddings and
every block's output, before the final norm, as transformers' `hidden_states`),
`image_embeds`, `text_hidden_states` / `text_last_hidden_state` (caption: the decoder's;
retrieval: the image-grounded encoder's) and, retrieval, `itc_text_last_hidden_state`,
`image_feat`, `text_feat`, `sim`.

Param tree: vision/... (ViT), caption: text_decoder/... (Bert), lm_transform/{kernel, bias},
lm_norm/{scale, bias}, lm_bias [vocab] (the output matrix is text_decoder's word embedding); retrieval: text_encoder/... (Bert), vision_proj,
text_proj, itm_head (each {kernel, bias}); vqa: text_encoder/... and the caption tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.family import Family
from mmjax.models.vit import ViT, ViTConfig, check_images
from mmjax.nn.cache import KVCache
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.norms import LayerNorm

TASKS = ("caption", "retrieval", "vqa")
# ViTConfig fields fixed by BLIP's image encoder
BLIP_VISION_LAYOUT = dict(pool="cls", posemb="learned", class_token=True, pre_norm=False, patch_bias=True,
                          qkv_bias=True, num_classes=0, representation=None)


def _default_vision() -> ViTConfig:  # BLIP ViT-B/16 at 384 px
    return ViTConfig(**BLIP_VISION_LAYOUT, image_size=384, patch_size=16, norm_eps=1e-5)


def _default_text() -> BertConfig:  # BLIP's BERT-base decoder (bert-base-uncased + [DEC], [ENC])
    return BertConfig(vocab_size=30524, type_vocab_size=0, pooler=False, causal=True, cross_attention=True,
                      encoder_width=768)


@dataclasses.dataclass(frozen=True)
class BlipConfig(configs.Config):
    vision: ViTConfig = dataclasses.field(default_factory=_default_vision)
    text: BertConfig = dataclasses.field(default_factory=_default_text)
    # "caption" (decoder + LM head), "retrieval" (encoder + ITM / ITC heads) or "vqa" (question
    # encoder over the image + answer decoder over the question; `text` is the decoder's config,
    # the encoder is `text` with causal=False)
    task: str = "caption"
    embed_dim: int = 256  # ITC projection width (HF image_text_hidden_size)
    head_activation: str = "gelu"  # the LM head transform's activation (HF text hidden_act)
    bos_token_id: int = 30522  # [DEC]: a caption's first token
    sep_token_id: int = 102  # [SEP]: ends a caption
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ViTConfig.from_dict(self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", BertConfig.from_dict(self.text))
        v, t = self.vision, self.text
        if self.task not in TASKS:
            raise ConfigError(f"BlipConfig.task {self.task!r}{configs.closest_name(str(self.task), TASKS)}; "
                              f"known: {', '.join(TASKS)}")
        differ = [f"{k}={getattr(v, k)!r}" for k, want in BLIP_VISION_LAYOUT.items() if getattr(v, k) != want]
        if differ:
            raise ConfigError(f"BlipConfig.vision: BLIP's image encoder needs {BLIP_VISION_LAYOUT}; "
                              f"got {', '.join(differ)}")
        if not t.cross_attention or t.cross_width != v.dim:
            raise ConfigError(f"BlipConfig.text: the text side reads the image through cross-attention: "
                              f"set cross_attention=True and encoder_width={v.dim} (vision.dim), got "
                              f"cross_attention={t.cross_attention}, encoder_width={t.encoder_width}")
        if t.causal != (self.task != "retrieval"):
            raise ConfigError(f"BlipConfig: task={self.task!r} needs text.causal={self.task != 'retrieval'} "
                              "(the caption / answer decoder is causal, the retrieval encoder bidirectional)")
        if self.task == "vqa" and t.dim != v.dim:
            raise ConfigError(f"BlipConfig: task='vqa' needs text.dim == vision.dim (the answer decoder's "
                              f"cross-attention reads the question states through the encoder_width={v.dim} "
                              f"projections, as transformers' does), got text.dim={t.dim}")
        if t.pooler:
            raise ConfigError("BlipConfig.text: BLIP's text models have no pooler; set pooler=False")
        if self.embed_dim <= 0:
            raise ConfigError(f"BlipConfig.embed_dim must be positive, got {self.embed_dim}")
        if self.head_activation not in ACTIVATIONS:
            raise ConfigError(f"BlipConfig.head_activation {self.head_activation!r}; known: "
                              f"{', '.join(ACTIVATIONS)}")
        for name in ("bos_token_id", "sep_token_id", "pad_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < t.vocab_size:
                raise ConfigError(f"BlipConfig.{name}={value!r} must be a token id in [0, "
                                  f"text.vocab_size={t.vocab_size})")

    # what mmjax.generate reads
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def max_len(self) -> int:
        return self.text.max_len

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (self.sep_token_id,)

    @property
    def dim(self) -> int:
        return self.text.dim

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.vision.image_hw

    @property
    def channels(self) -> int:
        return self.vision.channels


def _tiny(task: str) -> Any:
    def make() -> dict[str, Any]:
        width = 48 if task == "vqa" else 32  # vqa: the question states feed encoder_width projections
        vision = ViTConfig(**BLIP_VISION_LAYOUT, image_size=16, patch_size=4, dim=width, num_layers=2, num_heads=4,
                           mlp_dim=64, norm_eps=1e-5)
        text = BertConfig(vocab_size=128, dim=48, num_layers=2, num_heads=4, mlp_dim=96, max_len=40,
                          type_vocab_size=0, pooler=False, causal=task != "retrieval", cross_attention=True,
                          encoder_width=width)
        return dict(vision=vision, text=text, task=task, embed_dim=24, bos_token_id=126, sep_token_id=127)
    return make


BlipConfig.NAME = "BLIP"
BlipConfig.VARIANTS = {"tiny": _tiny("caption"), "tiny-retrieval": _tiny("retrieval"), "tiny-vqa": _tiny("vqa")}


@struct.dataclass
class BlipCache:
    """Decoding state of the caption / answer decoder: its self-attention KV cache and what its
    cross-attention reads (written by the prefill): caption, the image embeddings [batch, N,
    vision.dim]; vqa, the question encoder's states [batch, T_q, text.dim] (the field keeps its
    name) and `context_mask` [batch, T_q] (None for captions: every image embedding is read)."""

    kv: KVCache
    image_embeds: jax.Array
    context_mask: jax.Array | None = None

    def map_rows(self, fn) -> "BlipCache":
        mask = None if self.context_mask is None else fn(self.context_mask, 0)
        return self.replace(kv=self.kv.map_rows(fn), image_embeds=fn(self.image_embeds, 0), context_mask=mask)


def _check_tokens(tokens: Any, who: str) -> None:
    if getattr(tokens, "ndim", None) != 2:
        raise InputError(f"BLIP {who}: tokens must be [batch, seq], got shape {tuple(getattr(tokens, 'shape', ()))}")


class Blip(nn.Module):
    """BLIP (caption or retrieval). See the module docstring for the call forms."""

    config: BlipConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.text.dtype), jnp.dtype(c.text.param_dtype)
        init = nn.initializers.normal(c.text.initializer_range)
        dense = dict(use_bias=True, dtype=dtype, param_dtype=pdtype, kernel_init=init)
        self.vision = ViT(c.vision)
        if c.task == "vqa":
            self.text_encoder = Bert(c.text.replace(causal=False))
        if c.task in ("caption", "vqa"):
            self.text_decoder = Bert(c.text)
            self.lm_transform = DenseGeneral(c.text.dim, ("embed", "mlp"), name="lm_transform", **dense)
            self.lm_norm = LayerNorm(c.text.norm_eps, dtype=dtype, param_dtype=pdtype, name="lm_norm")
            self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                      (c.text.vocab_size,), pdtype)
        else:
            self.text_encoder = Bert(c.text)
            self.vision_proj = DenseGeneral(c.embed_dim, ("embed", "mlp"), **dense)
            self.text_proj = DenseGeneral(c.embed_dim, ("embed", "mlp"), **dense)
            self.itm_head = DenseGeneral(2, ("embed", "vocab"), **dense)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> BlipCache:
        """An empty decoding cache (caption and vqa tasks; works on an unbound module). vqa: the
        context placeholder is one position; the prefill (with images and question) replaces it
        by the question states, so the decoding steps carry [batch, T_q, dim]."""
        c = self.config
        if c.task == "retrieval":
            raise ConfigError("BLIP: only the caption / answer decoders (task='caption' or 'vqa') decode "
                              "with a cache")
        kv = Bert(c.text).init_cache(batch, max_len, dtype)
        dt = jnp.dtype(dtype or c.text.dtype)
        if c.task == "vqa":
            return BlipCache(kv=kv, image_embeds=jnp.zeros((batch, 1, c.text.dim), dt),
                             context_mask=jnp.ones((batch, 1), bool))
        embeds = jnp.zeros((batch, c.vision.num_tokens, c.vision.dim), dt)
        return BlipCache(kv=kv, image_embeds=embeds)

    def encode_image(self, images: jax.Array, return_intermediates: bool = False):
        """images [B, H, W, C] NHWC -> image embeddings [B, N, vision.dim] (after the final norm);
        then the ViT's intermediates if asked."""
        check_images(images, self.config.vision, who="BLIP")
        _, out = self.vision(images, return_intermediates=True)
        embeds = out["final_hidden"].astype(jnp.float32)
        return (embeds, out) if return_intermediates else embeds

    def _lm_logits(self, h: jax.Array) -> jax.Array:
        c = self.config
        h = self.lm_norm(ACTIVATIONS[c.head_activation](self.lm_transform(h)))
        table = nn.unbox(self.text_decoder.variables["params"]["embeddings"]["word"]["embedding"])
        logits = jnp.einsum("btd,vd->btv", h, table.astype(h.dtype)) + self.lm_bias.astype(h.dtype)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, images: jax.Array | None = None, *,
                 input_mask: jax.Array | None = None, cache: BlipCache | None = None,
                 return_intermediates: bool = False, deterministic: bool = True,
                 question: jax.Array | None = None, question_mask: jax.Array | None = None,
                 context_mask: jax.Array | None = None):
        """caption: next-token logits [B, T, vocab] (then the new cache with `cache=`; then the
        intermediates). `images` is needed unless a filled cache is given (decoding steps).
        retrieval: `itm_logits` [B, 2] (the intermediates also hold the ITC outputs).
        vqa: `tokens` are the answer's (starting with bos_token_id), the logits, cache and
        intermediates as for captions; the prefill (or a cacheless call) takes `images` and
        `question` [B, T_q] ids with `question_mask` (the question encoder's padding mask);
        `context_mask` [B, T_q] is which question states the answer decoder reads (default:
        every one, as transformers 5.23's forward and `generate` compute: measured, its decoder's
        cross-attention reads the padded question positions whatever mask it is given)."""
        c = self.config
        _check_tokens(tokens, "call")
        if c.task == "retrieval":
            if images is None or cache is not None:
                raise InputError("BLIP retrieval: pass images (and no cache)")
            return self._retrieval(images, tokens, input_mask, return_intermediates, deterministic)
        if c.task == "vqa":
            return self._vqa(tokens, images, question, question_mask, context_mask, input_mask, cache,
                             return_intermediates, deterministic)
        if question is not None or question_mask is not None or context_mask is not None:
            raise InputError("BLIP caption: question / question_mask / context_mask are vqa inputs")
        out: dict[str, Any] = {}
        if images is not None:
            embeds, vis = self.encode_image(images, return_intermediates=True)
            out.update(vision_hidden_states=vis["hidden_states"], image_embeds=embeds)
            if cache is not None:
                cache = cache.replace(image_embeds=embeds.astype(cache.image_embeds.dtype))
        elif cache is None:
            raise InputError("BLIP caption: pass images (or a cache filled by a call with images)")
        else:
            embeds = cache.image_embeds
        if tokens.shape[0] != embeds.shape[0]:
            raise InputError(f"BLIP caption: {tokens.shape[0]} token rows but {embeds.shape[0]} images")
        return self._decode(tokens, input_mask, embeds, None, cache, out, deterministic,
                            return_intermediates)

    def encode_question(self, images: jax.Array, question: jax.Array, question_mask: jax.Array | None = None,
                        deterministic: bool = True, return_intermediates: bool = False):
        """vqa: the question encoder's states [B, T_q, text.dim] (bidirectional, cross-attending
        to every image embedding); then the intermediates if asked."""
        if self.config.task != "vqa":
            raise ConfigError("BLIP: encode_question needs the question encoder (task='vqa')")
        _check_tokens(question, "encode_question")
        embeds, vis = self.encode_image(images, return_intermediates=True)
        if question.shape[0] != embeds.shape[0]:
            raise InputError(f"BLIP vqa: {question.shape[0]} question rows but {embeds.shape[0]} images")
        q, q_out = self.text_encoder(question, None, question_mask, embeds, None, deterministic=deterministic,
                                     return_intermediates=True)
        if not return_intermediates:
            return q
        return q, {"vision_hidden_states": vis["hidden_states"], "image_embeds": embeds,
                   "question_hidden_states": q_out["hidden_states"], "question_last_hidden_state": q}

    def _vqa(self, tokens, images, question, question_mask, context_mask, input_mask, cache,
             return_intermediates, deterministic):
        out: dict[str, Any] = {}
        if question is None and images is not None and self.is_initializing():
            question = tokens  # init from the family's positional example inputs (tokens, images)
        if images is not None or question is not None:
            if images is None or question is None:
                raise InputError("BLIP vqa: pass images and question together (the prefill / a full call)")
            q, out = self.encode_question(images, question, question_mask, deterministic, True)
            if context_mask is None:
                context_mask = jnp.ones(question.shape, bool)
            if cache is not None:
                cache = cache.replace(image_embeds=q.astype(cache.image_embeds.dtype),
                                      context_mask=jnp.asarray(context_mask, bool))
        elif cache is None:
            raise InputError("BLIP vqa: pass images and question (or a cache filled by a call with them)")
        else:
            if question_mask is not None or context_mask is not None:
                raise InputError("BLIP vqa: question_mask / context_mask go with the question (prefill)")
            q, context_mask = cache.image_embeds, cache.context_mask
        if tokens.shape[0] != q.shape[0]:
            raise InputError(f"BLIP vqa: {tokens.shape[0]} answer rows but {q.shape[0]} questions")
        return self._decode(tokens, input_mask, q, context_mask, cache, dict(out), deterministic,
                            return_intermediates)

    def _decode(self, tokens, input_mask, context, context_mask, cache, out, deterministic,
                return_intermediates):
        """The text decoder over `context` (image embeddings for captions, question states for
        vqa) + the LM head: logits (, the advanced cache) (, intermediates `out` completed)."""
        result = self.text_decoder(tokens, None, input_mask, context, context_mask,
                                   cache=None if cache is None else cache.kv, deterministic=deterministic,
                                   return_intermediates=True)
        if cache is not None:
            h, kv, text_out = result
            cache = cache.replace(kv=kv)
        else:
            h, text_out = result
        out.update(text_hidden_states=text_out["hidden_states"], text_last_hidden_state=h)
        outputs: tuple = (self._lm_logits(h),)
        if cache is not None:
            outputs += (cache,)
        if return_intermediates:
            outputs += (out,)
        return outputs[0] if len(outputs) == 1 else outputs

    def vqa_logits(self, images: jax.Array, question: jax.Array, answer: jax.Array,
                   question_mask: jax.Array | None = None, answer_mask: jax.Array | None = None):
        """vqa: next-token logits [B, T_a, vocab] of the answer decoder on `answer` (teacher
        forcing) given the images and questions (`question_mask` masks the question encoder; the
        decoder reads every question state, as transformers' does)."""
        if self.config.task != "vqa":
            raise ConfigError("BLIP: vqa_logits needs the answer decoder (task='vqa')")
        return self(answer, images, input_mask=answer_mask, question=question, question_mask=question_mask)

    def caption_logits(self, images: jax.Array, tokens: jax.Array, input_mask: jax.Array | None = None):
        """Next-token logits [B, T, vocab] of the caption decoder on `tokens` given `images`."""
        return self(tokens, images, input_mask=input_mask)

    def _retrieval(self, images, tokens, input_mask, return_intermediates, deterministic):
        embeds, vis = self.encode_image(images, return_intermediates=True)
        itm, text_out = self._itm(embeds, tokens, input_mask, deterministic)
        image_feat, text_feat, sim, itc_h = self._itc(embeds, tokens, input_mask, deterministic)
        if not return_intermediates:
            return itm
        return itm, {"vision_hidden_states": vis["hidden_states"], "image_embeds": embeds,
                     "text_hidden_states": text_out["hidden_states"],
                     "text_last_hidden_state": text_out["last_hidden_state"],
                     "itc_text_last_hidden_state": itc_h, "image_feat": image_feat, "text_feat": text_feat,
                     "sim": sim}

    def _require_retrieval(self, what: str) -> None:
        if self.config.task != "retrieval":
            raise ConfigError(f"BLIP: {what} needs the retrieval heads (task='retrieval'); this model "
                              "is a captioner")

    def _itm(self, embeds, tokens, input_mask, deterministic=True):
        if tokens.shape[0] != embeds.shape[0]:
            raise InputError(f"BLIP itm: {tokens.shape[0]} token rows but {embeds.shape[0]} images")
        h, text_out = self.text_encoder(tokens, None, input_mask, embeds, None, deterministic=deterministic,
                                        return_intermediates=True)
        return self.itm_head(h[:, 0]).astype(jnp.float32), text_out

    def _itc(self, embeds, tokens, input_mask, deterministic=True):
        h = self.text_encoder(tokens, None, input_mask, deterministic=deterministic)
        image_feat = _normalize(self.vision_proj(embeds[:, 0]))
        text_feat = _normalize(self.text_proj(h[:, 0].astype(embeds.dtype)))
        return image_feat, text_feat, image_feat @ text_feat.T, h

    def itm_logits(self, images: jax.Array, tokens: jax.Array, input_mask: jax.Array | None = None):
        """Image-text matching logits [B, 2] (row i: image i with text i; index 1 = match)."""
        self._require_retrieval("itm_logits")
        _check_tokens(tokens, "itm_logits")
        return self._itm(self.encode_image(images), tokens, input_mask)[0]

    def itc(self, images: jax.Array, tokens: jax.Array, input_mask: jax.Array | None = None):
        """(image_feat [B_img, embed_dim], text_feat [B_txt, embed_dim], both unit norm, and their
        cosine similarities [B_img, B_txt])."""
        self._require_retrieval("itc")
        _check_tokens(tokens, "itc")
        image_feat, text_feat, sim, _ = self._itc(self.encode_image(images), tokens, input_mask)
        return image_feat, text_feat, sim


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def blip_inputs(config: BlipConfig) -> tuple:
    """Example inputs creating every param: one token and one zero image (vqa: `init` without a
    question runs the token as the question too)."""
    h, w = config.vision.image_hw
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, h, w, config.vision.channels), jnp.float32)


FAMILIES = (Family("blip", BlipConfig, Blip, blip_inputs,
                   "BLIP (ViT image encoder + BERT text decoder for captions, or encoder with ITM/ITC heads)",
                   tasks=("blip",)),)
