"""BLIP-2: a frozen image encoder, the Querying Transformer (Q-Former) and a frozen decoder-only
LLM reading the projected query outputs as a soft prompt at its image-token positions.

    config = Blip2Config.from_variant("tiny")               # stage 2: vision + Q-Former + LLaMA
    model = Blip2(config)
    params = model.init(rng, tokens, images)["params"]
    logits = model.apply({"params": params}, tokens, images, input_mask=mask)   # [B, T, vocab]
    q = model.apply({"params": params}, images, method=Blip2.query_features)    # [B, Q, dim]
    # stage 1 / retrieval (retrieval_heads=True): Q-Former heads, no LLM needed
    sim = model.apply({"params": params}, images, text, text_mask, method=Blip2.itc)["sim"]
    itm = model.apply({"params": params}, images, text, text_mask, method=Blip2.itm_logits)
    itg = model.apply({"params": params}, images, text, text_mask, method=Blip2.itg_logits)

Image encoder: `mmjax.models.vit.ViT` with BLIP's layout (`BLIP_VISION_LAYOUT`: biased patch
conv, [CLS] + learned positions, no pre-norm, pre-norm blocks with fused q/k/v biases -- the
key bias is a parameter that HF initialises at zero --, the final LayerNorm over the whole
sequence). Its `final_hidden` [B, N, vision.dim] is what the Q-Former cross-attends to.

Q-Former (`QFormer`): BERT-style post-norm layers over [query tokens; text]; every
`cross_attention_frequency`-th layer (0, f, 2f, ...) has a cross-attention sub-block that only
the query positions run; the queries go through their own FFN (`query_mlp`), text through the
text FFN (`mlp`, present when `text_input=True`: HF's `use_qformer_text_input`). The input
embedding is LayerNorm(concat(query tokens, word + position embeddings of the text)); text
positions count from 0 after the queries. Self-attention masks come from
`mmjax.ops.masks.qformer_mask`: "unimodal" (ITC: queries and text do not see each other),
"bidirectional" (ITM), "causal" (ITG: queries see queries only; text sees every query and
earlier text).

Heads (`retrieval_heads=True`, HF `Blip2ForImageTextRetrieval`): `vision_projection` and
`text_projection` [dim -> embed_dim] for ITC (similarity = max over the query outputs of
cos(query_q, text [CLS])), `itm_head` [dim -> 2] averaged over the query outputs, and LAVIS's
learned ITC temperature `itc_temp` (init 0.07; the objective clips it; transformers has none). With
`qformer.lm_head=True` the Q-Former has BERT's LM head (ITG; not in transformers): LN(gelu(
dense(h))) times the tied word embedding plus a bias.

LLM (`text`: a config of a decoder family with input embeddings -- "llama" or "opt",
`text_family`): `language_projection` [qformer.dim -> LLM dim] maps the Q queries of each image
to Q soft-prompt embeddings that replace the prompt's `image_token_index` tokens in row-major
order (transformers' masked_scatter). A prompt with images must hold exactly
num_query_tokens image tokens per image: checked eagerly (before any compilation in
`mmjax.generate`), never silently ignored.

Param tree: vision/... (ViT), query_tokens [Q, qformer.dim], qformer/{embeddings/{word,
position, norm}, layers_{i}/{attn, attn_norm, [cross_attn, cross_norm,] [mlp, mlp_norm,]
query_mlp, query_mlp_norm}, [lm_transform, lm_norm, lm_bias]}, [vision_projection,
text_projection, itm_head], [language_projection, language_model/...].

Generation: `mmjax.generate.generate(model, params, prompts, gen, prefill_inputs={"images":
images})`, as for LLaVA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.blip import BLIP_VISION_LAYOUT
from mmjax.models.family import Family
from mmjax.models.llava import count_image_tokens, scatter_features
from mmjax.models.vit import ViT, ViTConfig, check_images
from mmjax.nn.attention import Attention
from mmjax.nn.cache import KVCache
from mmjax.nn.embeddings import Embed, LearnedPositions
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS, MLP
from mmjax.nn.norms import LayerNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.ops import masks as masks_lib
from mmjax.ops.blip2_losses import max_query_similarity

MODES = masks_lib.QFORMER_MODES


@dataclasses.dataclass(frozen=True)
class QFormerConfig(configs.Config):
    vocab_size: int = 30523  # bert-base-uncased + BLIP-2's [DEC]
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512  # text positions (HF max_position_embeddings)
    activation: str = "gelu"
    norm_eps: float = 1e-12
    cross_attention_frequency: int = 2  # layers 0, f, 2f, ... cross-attend to the image
    encoder_width: int = 1408  # the image encoder's width (keys/values of the cross-attention)
    text_input: bool = False  # the text FFN exists (HF use_qformer_text_input): text can enter
    lm_head: bool = False  # BERT's LM head on the text positions (ITG; not in transformers)
    pad_token_id: int | None = 0
    bos_token_id: int = 30522  # [DEC]: ITG captions start with it (LAVIS)
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    implementation: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "mlp_dim", "max_len",
                     "cross_attention_frequency", "encoder_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"QFormerConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"QFormerConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"QFormerConfig.activation {self.activation!r}"
                              f"{configs.closest_name(str(self.activation), ACTIVATIONS)}; "
                              f"known: {', '.join(ACTIVATIONS)}")
        if self.lm_head and not self.text_input:
            raise ConfigError("QFormerConfig: lm_head=True decodes text, which needs the text FFN; "
                              "set text_input=True")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"QFormerConfig.{name} {value} is outside the vocabulary [0, "
                                  f"{self.vocab_size})")
        self.check_dtypes("dtype", "param_dtype")

    @property
    def head_size(self) -> int:
        return self.dim // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


QFormerConfig.NAME = "Q-Former"


def _default_vision() -> ViTConfig:  # EVA ViT-g/14 at 224 px, as BLIP-2 uses it
    return ViTConfig(**BLIP_VISION_LAYOUT, image_size=224, patch_size=14, dim=1408, num_layers=39,
                     num_heads=16, mlp_dim=6144, norm_eps=1e-6)


@dataclasses.dataclass(frozen=True)
class Blip2Config(configs.Config):
    vision: ViTConfig = dataclasses.field(default_factory=_default_vision)
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    text: Any = None  # the LLM's config (family `text_family`); None = stage 1 (no LLM)
    text_family: str = "llama"
    num_query_tokens: int = 32
    image_token_index: int | None = None  # the LLM's image token (required with an LLM)
    embed_dim: int = 256  # ITC projection width (HF image_text_hidden_size)
    retrieval_heads: bool = False  # vision/text projections + ITM head (stage 1, retrieval)
    instruct: bool = False  # InstructBLIP: the instruction enters the Q-Former beside the queries

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ViTConfig.from_dict(self.vision))
        if isinstance(self.qformer, dict):
            object.__setattr__(self, "qformer", QFormerConfig.from_dict(self.qformer))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", self._text_class().from_dict(self.text))
        v, q = self.vision, self.qformer
        if v.num_classes or v.representation or not v.class_token:
            raise ConfigError("Blip2Config.vision: the image encoder is a feature encoder with a [CLS] "
                              "token (num_classes=0, representation=None, class_token=True)")
        if q.encoder_width != v.dim:
            raise ConfigError(f"Blip2Config: qformer.encoder_width={q.encoder_width} does not match the "
                              f"image encoder's width vision.dim={v.dim}; set them equal")
        if isinstance(self.num_query_tokens, bool) or not isinstance(self.num_query_tokens, int) \
                or self.num_query_tokens <= 0:
            raise ConfigError(f"Blip2Config.num_query_tokens must be a positive int, got {self.num_query_tokens!r}")
        if self.num_query_tokens + (q.max_len if q.text_input else 0) <= 0:
            raise ConfigError("Blip2Config: empty Q-Former input")
        if self.embed_dim <= 0:
            raise ConfigError(f"Blip2Config.embed_dim must be positive, got {self.embed_dim}")
        if self.instruct and not q.text_input:
            raise ConfigError("Blip2Config: instruct=True (InstructBLIP) feeds the instruction through the "
                              "Q-Former; set qformer.text_input=True")
        if self.instruct and self.text is None:
            raise ConfigError("Blip2Config: instruct=True (InstructBLIP) conditions an LLM; set text")
        if self.retrieval_heads and not q.text_input:
            raise ConfigError("Blip2Config: retrieval_heads=True reads text through the Q-Former; set "
                              "qformer.text_input=True")
        if self.text is None:
            if self.image_token_index is not None:
                raise ConfigError("Blip2Config.image_token_index is the LLM's image token, but there is no "
                                  "LLM (text=None)")
            return
        cls = self._text_class()
        if not isinstance(self.text, cls):
            raise ConfigError(f"Blip2Config.text must be a {cls.__name__} (text_family={self.text_family!r}), "
                              f"got {type(self.text).__name__}; set text_family to its family")
        idx = self.image_token_index
        if idx is None:
            raise ConfigError("Blip2Config.image_token_index is unset: the query outputs go to the prompt's "
                              "image tokens; add an image token to the LLM's vocabulary and set its id")
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or not 0 <= idx < self.vocab_size:
            raise ConfigError(f"Blip2Config.image_token_index={idx!r} must be a token id in [0, "
                              f"text vocab_size={self.vocab_size})")

    def _text_class(self) -> type:
        from mmjax.models import family_record

        if self.text_family not in TEXT_FAMILIES:
            raise ConfigError(f"Blip2Config.text_family {self.text_family!r}"
                              f"{configs.closest_name(str(self.text_family), TEXT_FAMILIES)}; the LLM must be "
                              f"one of {', '.join(TEXT_FAMILIES)}")
        return family_record(self.text_family).config_class

    def _needs_text(self, what: str):
        if self.text is None:
            raise ConfigError(f"Blip2Config: {what} needs an LLM; this config has none (text=None)")
        return self.text

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image in the LLM's prompt (= num_query_tokens)."""
        return self.num_query_tokens

    @property
    def vocab_size(self) -> int:
        return self._needs_text("vocab_size").vocab_size

    @property
    def max_len(self) -> int:
        return self._needs_text("max_len").max_len

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self._needs_text("eos_ids").eos_ids)

    @property
    def dim(self) -> int:
        return self._needs_text("dim").dim

    @property
    def pad_token_id(self) -> int | None:
        return self._needs_text("pad_token_id").pad_token_id


TEXT_FAMILIES = ("llama", "opt")
ITC_TEMPERATURE_INIT = 0.07


def _tiny() -> dict[str, Any]:
    from mmjax.models.llama import LlamaConfig

    return dict(
        vision=ViTConfig(**BLIP_VISION_LAYOUT, image_size=16, patch_size=4, dim=48, num_layers=2, num_heads=4,
                         mlp_dim=96, norm_eps=1e-6),
        qformer=QFormerConfig(vocab_size=120, dim=64, num_layers=3, num_heads=4, mlp_dim=128, max_len=32,
                              encoder_width=48, text_input=True, bos_token_id=119),
        text=LlamaConfig(vocab_size=100, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=64),
        num_query_tokens=4, image_token_index=99, embed_dim=16, retrieval_heads=True)


def _tiny_stage1() -> dict[str, Any]:
    d = _tiny()
    return dict(d, text=None, image_token_index=None, qformer=d["qformer"].replace(lm_head=True))


Blip2Config.NAME = "BLIP-2"
Blip2Config.VARIANTS = {"tiny": _tiny, "tiny-stage1": _tiny_stage1}


def text_embed_width(text_config: Any) -> int:
    """Width of the LLM's input embeddings (OPT's word_embed_proj_dim may differ from its dim)."""
    return getattr(text_config, "embed_width", text_config.dim)


def check_query_tokens(tokens: Any, n_images: int, config: Blip2Config, input_mask: Any = None) -> None:
    """InputError unless `tokens` hold exactly n_images * num_query_tokens image tokens (on
    concrete values; under jit only that they can fit)."""
    per = config.num_query_tokens
    want = n_images * per
    have = count_image_tokens(tokens, config.image_token_index, input_mask)
    if have is None:
        if want > int(np.prod(tokens.shape)):
            raise InputError(f"BLIP-2: {n_images} image(s) give {want} query outputs, more than the "
                             f"{int(np.prod(tokens.shape))} token slots of tokens {tuple(tokens.shape)}")
        return
    if have == 0:
        raise InputError(f"BLIP-2: images were given but the prompt holds no image tokens "
                         f"(image_token_index={config.image_token_index}); put {per} image tokens per image "
                         "where the image goes (transformers would silently ignore the image)")
    if have != want:
        raise InputError(f"BLIP-2: the prompt holds {have} image tokens (image_token_index="
                         f"{config.image_token_index}), the {n_images} image(s) give {want} query outputs "
                         f"({per} per image = num_query_tokens); expand each image to {per} image tokens")


class QFormerLayer(nn.Module):
    """One Q-Former layer over x = [queries (the first `num_queries` rows); text]."""

    config: QFormerConfig
    cross: bool

    def _dense_kw(self):
        c = self.config
        return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                    kernel_init=nn.initializers.normal(c.initializer_range))

    def _norm(self, name):
        c = self.config
        return LayerNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), name=name)

    @nn.compact
    def __call__(self, x, mask, num_queries: int, cross_input=None, cross_mask=None):
        c = self.config
        kw = self._dense_kw()
        attn = dict(num_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=c.head_size, qkv_bias=True,
                    out_bias=True, implementation=c.implementation, **kw)
        x = self._norm("attn_norm")(x + Attention(name="attn", **attn)(x, mask=mask))
        x = constrain(x, BATCH_LEN_EMBED)
        q, t = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross:
                if cross_input is None:
                    raise InputError("Q-Former: the query tokens cross-attend to image embeddings; pass "
                                     "encoder_hidden_states")
                q = self._norm("cross_norm")(
                    q + Attention(name="cross_attn", **attn)(q, cross_input, mask=cross_mask))
            q = self._norm("query_mlp_norm")(q + MLP(c.mlp_dim, c.activation, True, name="query_mlp", **kw)(q))
            parts.append(q)
        if t.shape[1]:
            if not c.text_input:
                raise InputError("Q-Former: this Q-Former has no text FFN (text_input=False, HF "
                                 "use_qformer_text_input=False): it reads query tokens only")
            parts.append(self._norm("mlp_norm")(t + MLP(c.mlp_dim, c.activation, True, name="mlp", **kw)(t)))
        return constrain(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], BATCH_LEN_EMBED)


class QFormer(nn.Module):
    """The Q-Former. Call `qformer(query_embeds, tokens, text_mask, encoder_hidden_states,
    encoder_mask, mode=...)`:

      query_embeds [B, Q, dim] (the learned query tokens, broadcast) or None (text only);
      tokens [B, T] int or None (queries only), text_mask [B, T] bool (True = real);
      encoder_hidden_states [B, N, encoder_width] (needed whenever there are queries),
      encoder_mask [B, N] bool; mode one of "unimodal", "bidirectional", "causal".
    Returns the last hidden state [B, Q + T, dim] float32 and, with `return_intermediates`,
    {"hidden_states": (embedding output, each layer's output), "last_hidden_state"}.
    `lm_logits(hidden)` applies the LM head (lm_head=True) to text positions' states.
    """

    config: QFormerConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        self.word = Embed(c.vocab_size, c.dim, dtype, pdtype, init, name="word")
        self.position = LearnedPositions(c.max_len, c.dim, dtype, pdtype, init, name="position")
        self.norm = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")
        self.layers = [QFormerLayer(c, c.has_cross_attention(i), name=f"layers_{i}") for i in range(c.num_layers)]
        if c.lm_head:
            self.lm_transform = DenseGeneral(c.dim, ("embed", "mlp"), dtype=dtype, param_dtype=pdtype,
                                             kernel_init=init, name="lm_transform")
            self.lm_norm = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="lm_norm")
            self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                      (c.vocab_size,), pdtype)

    def __call__(self, query_embeds=None, tokens=None, text_mask=None, encoder_hidden_states=None,
                 encoder_mask=None, *, mode: str = "unimodal", return_intermediates: bool = False):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if mode not in MODES:
            raise InputError(f"Q-Former: mode {mode!r} is not one of {', '.join(MODES)}")
        if query_embeds is None and tokens is None:
            raise InputError("Q-Former: give query_embeds, tokens or both")
        parts = []
        batch = (query_embeds if query_embeds is not None else tokens).shape[0]
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        if query_embeds is not None:
            if query_embeds.ndim != 3 or query_embeds.shape[-1] != c.dim:
                raise InputError(f"Q-Former: query_embeds must be [batch, queries, dim={c.dim}], got shape "
                                 f"{tuple(query_embeds.shape)}")
            parts.append(query_embeds.astype(dtype))
        if tokens is not None:
            _check_text(c, tokens, text_mask, batch)
            t = tokens.shape[1]
            parts.append(self.word(tokens) + self.position(jnp.arange(t))[None])
            if text_mask is None:
                text_mask = jnp.ones(tokens.shape, bool)
        else:
            text_mask = jnp.ones((batch, 0), bool)
        x = self.norm(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        x = constrain(x, BATCH_LEN_EMBED)
        mask = masks_lib.qformer_mask(text_mask, num_queries, mode)
        cross_mask = None
        if num_queries:
            if encoder_hidden_states is None:
                raise InputError("Q-Former: the query tokens cross-attend to image embeddings; pass "
                                 "encoder_hidden_states")
            es = tuple(encoder_hidden_states.shape)
            if len(es) != 3 or es[0] != batch or es[2] != c.encoder_width:
                raise InputError(f"Q-Former: encoder_hidden_states must be [batch={batch}, tokens, "
                                 f"encoder_width={c.encoder_width}], got shape {es}")
            encoder_hidden_states = encoder_hidden_states.astype(dtype)
            if encoder_mask is not None:
                cross_mask = masks_lib.padding_mask(encoder_mask)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask, num_queries, encoder_hidden_states, cross_mask)
            hidden.append(x)
        last = x.astype(jnp.float32)
        if return_intermediates:
            return last, {"hidden_states": tuple(hidden), "last_hidden_state": last}
        return last

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """BERT's LM head: [B, T, dim] -> [B, T, vocab] float32 (lm_head=True)."""
        c = self.config
        if not c.lm_head:
            raise ConfigError("Q-Former: no LM head (qformer.lm_head=False); ITG needs it")
        h = self.lm_norm(ACTIVATIONS[c.activation](self.lm_transform(hidden.astype(jnp.dtype(c.dtype)))))
        table = self.word.embedding
        logits = jnp.einsum("btd,vd->btv", h, table.astype(h.dtype)) + self.lm_bias.astype(h.dtype)
        return logits.astype(jnp.float32)


def _check_text(c: QFormerConfig, tokens, text_mask, batch: int) -> None:
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 2 or shape[0] != batch:
        raise InputError(f"Q-Former: tokens must be [batch={batch}, seq], got shape {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"Q-Former: tokens must be integer ids, got dtype {tokens.dtype}")
    if shape[1] > c.max_len:
        raise InputError(f"Q-Former: text length {shape[1]} exceeds max_position_embeddings {c.max_len}")
    if text_mask is not None and tuple(text_mask.shape) != shape:
        raise InputError(f"Q-Former: text_mask must have shape {shape}, got {tuple(text_mask.shape)}")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        if values.size and (values.min() < 0 or values.max() >= c.vocab_size):
            bad = int(values.max()) if values.max() >= c.vocab_size else int(values.min())
            raise InputError(f"Q-Former: token id {bad} is outside [0, {c.vocab_size})")


def _check_instruction(c: Blip2Config, images, qformer_tokens, qformer_mask) -> None:
    if qformer_tokens is None:
        if c.instruct and images is not None:
            raise InputError("InstructBLIP: pass qformer_tokens (the instruction in the Q-Former's vocabulary) "
                             "with the images")
        if qformer_mask is not None:
            raise InputError("BLIP-2: qformer_mask given without qformer_tokens")
        return
    if not c.instruct:
        raise InputError("BLIP-2: qformer_tokens (an instruction for the Q-Former) needs an InstructBLIP "
                         "model (instruct=True)")
    if images is None:
        raise InputError("InstructBLIP: qformer_tokens given without images")
    _check_text(c.qformer, qformer_tokens, qformer_mask, images.shape[0])


def _l2_normalize(x: jax.Array) -> jax.Array:  # torch.nn.functional.normalize (eps 1e-12)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Blip2(nn.Module):
    """Image encoder + Q-Former (+ heads) (+ LLM). See the module docstring."""

    config: Blip2Config

    def setup(self):
        c = self.config
        q = c.qformer
        dtype, pdtype = jnp.dtype(q.dtype), jnp.dtype(q.param_dtype)
        dense = dict(use_bias=True, dtype=dtype, param_dtype=pdtype, kernel_init=nn.initializers.normal(q.initializer_range))
        self.vision = ViT(c.vision)
        self.query_tokens = self.param(
            "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(q.initializer_range),
                                                         ("position", "embed")),
            (c.num_query_tokens, q.dim), pdtype)
        self.qformer = QFormer(q)
        if c.retrieval_heads:
            self.vision_projection = DenseGeneral(c.embed_dim, ("embed", "mlp"), name="vision_projection", **dense)
            self.text_projection = DenseGeneral(c.embed_dim, ("embed", "mlp"), name="text_projection", **dense)
            self.itm_head = DenseGeneral(2, ("embed", None), name="itm_head", **dense)
            # LAVIS's learned ITC temperature (transformers' port drops it; conversion sets 0.07)
            self.itc_temp = self.param("itc_temp", nn.with_logical_partitioning(
                nn.initializers.constant(ITC_TEMPERATURE_INIT), ()), (), jnp.float32)
        if c.text is not None:
            from mmjax.models import family_record

            t = c.text
            self.language_projection = DenseGeneral(
                text_embed_width(t), ("embed", "mlp"), use_bias=True, dtype=jnp.dtype(t.dtype), param_dtype=jnp.dtype(t.param_dtype),
                kernel_init=nn.initializers.normal(t.initializer_range), name="language_projection")
            self.language_model = family_record(c.text_family).module_class(t)

    # --- the parts ------------------------------------------------------------------------
    def encode_images(self, images: jax.Array, return_intermediates: bool = False):
        """images [B, H, W, C] -> image embeddings [B, N, vision.dim] (HF vision last_hidden_state)."""
        check_images(images, self.config.vision, who="BLIP-2")
        _, out = self.vision(images, return_intermediates=True)
        embeds = out["final_hidden"].astype(jnp.float32)
        return (embeds, out) if return_intermediates else embeds

    def _queries(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.query_tokens[None], (batch,) + self.query_tokens.shape)

    def query_features(self, images: jax.Array, qformer_tokens: jax.Array | None = None,
                       qformer_mask: jax.Array | None = None, return_intermediates: bool = False):
        """The Q-Former's query outputs [B, Q, qformer.dim] for images [B, H, W, C]; with
        `qformer_tokens` [B, T] (InstructBLIP's instruction, `qformer_mask` its real tokens) the
        queries and the instruction attend to each other (bidirectional) and the query part is
        returned."""
        embeds, vis = self.encode_images(images, return_intermediates=True)
        nq = self.config.num_query_tokens
        if qformer_tokens is None:
            out = self.qformer(self._queries(embeds.shape[0]), encoder_hidden_states=embeds, mode="unimodal",
                               return_intermediates=return_intermediates)
        else:
            out = self.qformer(self._queries(embeds.shape[0]), qformer_tokens, qformer_mask, embeds,
                               mode="bidirectional", return_intermediates=return_intermediates)
            out = (out[0][:, :nq], out[1]) if return_intermediates else out[:, :nq]
        if not return_intermediates:
            return out
        q, inter = out
        return q, {"image_embeds": embeds, "vision_hidden_states": vis["hidden_states"],
                   "qformer_hidden_states": inter["hidden_states"]}

    def text_features(self, tokens: jax.Array, text_mask: jax.Array | None = None) -> jax.Array:
        """Text-only Q-Former states [B, T, dim] (HF Blip2TextModelWithProjection's)."""
        return self.qformer(None, tokens, text_mask, mode="unimodal")

    def _heads(self):
        if not self.config.retrieval_heads:
            raise ConfigError("BLIP-2: ITC / ITM need the retrieval heads (retrieval_heads=True)")

    def itc(self, images: jax.Array, tokens: jax.Array, text_mask: jax.Array | None = None,
            image_embeds: jax.Array | None = None) -> dict[str, jax.Array]:
        """ITC features: `image_feats` [B, Q, embed_dim] and `text_feat` [B, embed_dim] (L2
        normalised), `sim` [B_images, B_texts] = max over queries of their cosines. One Q-Former
        call with the unimodal mask (= the separate query-only and text-only passes)."""
        self._heads()
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        b = image_embeds.shape[0]
        if tokens.shape[0] != b:
            raise InputError(f"BLIP-2 itc: {b} images but {tokens.shape[0]} texts; pair them one to one")
        h = self.qformer(self._queries(b), tokens, text_mask, image_embeds, mode="unimodal")
        nq = self.config.num_query_tokens
        image_feats = _l2_normalize(self.vision_projection(h[:, :nq]).astype(jnp.float32))
        text_feat = _l2_normalize(self.text_projection(h[:, nq]).astype(jnp.float32))
        return {"image_feats": image_feats, "text_feat": text_feat,
                "sim": max_query_similarity(image_feats, text_feat)}

    def itm_logits(self, images: jax.Array, tokens: jax.Array, text_mask: jax.Array | None = None,
                   image_embeds: jax.Array | None = None) -> jax.Array:
        """ITM logits [B, 2] (index 1 = match): bidirectional [queries; text], the head averaged
        over the query outputs."""
        self._heads()
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        h = self.qformer(self._queries(image_embeds.shape[0]), tokens, text_mask, image_embeds,
                         mode="bidirectional")
        return self.itm_head(h[:, :self.config.num_query_tokens]).astype(jnp.float32).mean(axis=1)

    def itg_logits(self, images: jax.Array, tokens: jax.Array, text_mask: jax.Array | None = None,
                   image_embeds: jax.Array | None = None) -> jax.Array:
        """ITG logits [B, T, qformer vocab] on the text positions (causal mask; position t
        predicts token t + 1; tokens start with qformer.bos_token_id, LAVIS's [DEC])."""
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        h = self.qformer(self._queries(image_embeds.shape[0]), tokens, text_mask, image_embeds, mode="causal")
        return self.qformer.lm_logits(h[:, self.config.num_query_tokens:])

    # --- the LLM side ---------------------------------------------------------------------
    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
        """An empty KV cache of the LLM (works on an unbound module)."""
        from mmjax.models import family_record

        c = self.config
        t = c._needs_text("init_cache")
        return family_record(c.text_family).module_class(t).init_cache(batch, max_len, dtype)

    @nn.nowrap
    def check_prefill_inputs(self, tokens: Any, input_mask: Any = None, images: Any = None,
                             qformer_tokens: Any = None, qformer_mask: Any = None) -> None:
        """Eager checks of a call with images (`mmjax.generate` runs them before compiling)."""
        if images is not None:
            check_images(images, self.config.vision, who="BLIP-2")
            check_query_tokens(tokens, images.shape[0], self.config, input_mask)
        _check_instruction(self.config, images, qformer_tokens, qformer_mask)

    def embed(self, tokens: jax.Array, images: jax.Array | None = None, *, input_mask: jax.Array | None = None,
              qformer_tokens: jax.Array | None = None, qformer_mask: jax.Array | None = None,
              return_intermediates: bool = False):
        """The LLM's input embeddings [B, T, dim]: token embeddings with the image tokens holding
        the projected query outputs."""
        c = self.config
        c._needs_text("the LLM forward")
        if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"BLIP-2: tokens must be integer ids [batch, seq], got shape "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if input_mask is not None and tuple(input_mask.shape) != tuple(tokens.shape):
            raise InputError(f"BLIP-2: input_mask must have shape {tuple(tokens.shape)}, got "
                             f"{tuple(input_mask.shape)}")
        inter: dict[str, Any] = {"image_features": None}
        if images is None:
            x = self.language_model.embed_tokens(tokens)
        else:
            check_images(images, c.vision, who="BLIP-2")
            check_query_tokens(tokens, images.shape[0], c, input_mask)
            _check_instruction(c, images, qformer_tokens, qformer_mask)
            slots = tokens == c.image_token_index
            if input_mask is not None:
                slots &= input_mask.astype(bool)
            x = self.language_model.embed_tokens(jnp.where(slots, 0, tokens))
            q, qi = self.query_features(images, qformer_tokens, qformer_mask, return_intermediates=True)
            feats = self.language_projection(q.astype(jnp.dtype(c.text.dtype)))
            x = scatter_features(x, slots, feats.reshape(-1, feats.shape[-1]))
            inter = {**qi, "query_output": q, "image_features": feats}
        return (x, inter) if return_intermediates else x

    def __call__(self, tokens: jax.Array, images: jax.Array | None = None, *,
                 qformer_tokens: jax.Array | None = None, qformer_mask: jax.Array | None = None,
                 input_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: KVCache | None = None, return_intermediates: bool = False,
                 deterministic: bool = True):
        """LLM logits [B, T, vocab] (then the cache, then intermediates: `image_embeds`,
        `query_output` [n, Q, qformer.dim], `image_features` [n, Q, dim], `inputs_embeds`, the
        LLM's `hidden_states` / `final_hidden`, `vision_hidden_states`, `qformer_hidden_states`).
        A stage-1 model (no LLM) is called through `itc` / `itm_logits` / `itg_logits`."""
        if self.is_initializing() and images is not None:
            self._init_heads(images)
            if self.config.instruct and qformer_tokens is None:
                qformer_tokens = jnp.zeros((images.shape[0], 2), jnp.int32)
        if self.config.text is None:
            if self.is_initializing():
                return None
            raise ConfigError("BLIP-2: this model has no LLM (text=None); call itc / itm_logits / itg_logits")
        x, inter = self.embed(tokens, images, input_mask=input_mask, qformer_tokens=qformer_tokens,
                              qformer_mask=qformer_mask, return_intermediates=True)
        out = self.language_model(embeddings=x, input_mask=input_mask, positions=positions, cache=cache,
                                  return_intermediates=return_intermediates, deterministic=deterministic)
        if not return_intermediates:
            return out
        *head, lm_inter = out if isinstance(out, tuple) else (out,)
        return (*head, {**inter, "inputs_embeds": x, **lm_inter})

    def _init_heads(self, images: jax.Array) -> None:
        """At init: run the Q-Former heads the config has, so that every param exists."""
        c = self.config
        text = jnp.zeros((images.shape[0], 2), jnp.int32)
        if c.retrieval_heads:
            self.itc(images, text)
            self.itm_logits(images, text)
        elif c.qformer.text_input:
            self.text_features(text)
        if c.qformer.lm_head:
            self.itg_logits(images, text)
        if c.text is None:
            self.query_features(images)


def blip2_inputs(config: Blip2Config) -> tuple:
    """(tokens, images): one zero image and, with an LLM, a prompt of exactly num_query_tokens
    image tokens then one text token (a stage-1 model ignores the tokens)."""
    h, w = config.vision.image_hw
    images = jnp.zeros((1, h, w, config.vision.channels), jnp.float32)
    if config.text is None:
        return jnp.zeros((1, 1), jnp.int32), images
    n = config.num_query_tokens
    tokens = jnp.concatenate([jnp.full((1, n), config.image_token_index, jnp.int32),
                              jnp.zeros((1, 1), jnp.int32)], axis=1)
    return tokens, images


FAMILIES = (Family("blip2", Blip2Config, Blip2, blip2_inputs,
                   "BLIP-2 / InstructBLIP / MiniGPT-4: image encoder + Q-Former (ITC / ITM / ITG) + frozen LLM "
                   "(LLaMA or OPT) on a soft prompt", tasks=("blip2", "visual_sft")),)


def qformer_from_bert(qformer_params: Any, bert_params: Any, bert_config: Any) -> dict[str, Any]:
    """Q-Former params initialised from a BERT's (`mmjax.models.bert.Bert` params, as BLIP-2
    starts from bert-base): embeddings, self-attention and its norm, and both FFNs (query and
    text) from BERT's FFN; the cross-attention layers keep their fresh initialisation. The
    token-type row 0 that BERT adds to every token is folded into the position table, so the
    text-only Q-Former computes exactly what the BERT encoder does. Word rows beyond BERT's
    vocabulary (BLIP-2's [DEC]) keep their fresh values.

    `qformer_params`: the `qformer` subtree of freshly initialised Blip2 params (plain arrays);
    returns a new subtree. ConfigError when the shapes do not match (width, heads, layers, MLP)."""
    q = dict(qformer_params)
    b = bert_params
    emb = b["embeddings"]
    d = emb["word"]["embedding"].shape[1]
    if q["norm"]["scale"].shape[0] != d:
        raise ConfigError(f"qformer_from_bert: BERT width {d} differs from the Q-Former's "
                          f"{q['norm']['scale'].shape[0]}")
    layers = sorted(k for k in q if k.startswith("layers_"))
    if bert_config.num_layers != len(layers):
        raise ConfigError(f"qformer_from_bert: BERT has {bert_config.num_layers} layers, the Q-Former {len(layers)}")
    q["norm"] = dict(emb["norm"])
    if "word" in q:
        word = np.array(q["word"]["embedding"])
        n = min(word.shape[0], emb["word"]["embedding"].shape[0])
        word[:n] = np.asarray(emb["word"]["embedding"])[:n]
        q["word"] = {"embedding": word}
        pos = np.asarray(emb["position"]["embedding"])
        if "token_type" in emb:
            pos = pos + np.asarray(emb["token_type"]["embedding"])[0]
        qpos = np.array(q["position"]["embedding"])
        if qpos.shape[0] > pos.shape[0]:
            raise ConfigError(f"qformer_from_bert: Q-Former max_len {qpos.shape[0]} exceeds BERT's {pos.shape[0]}")
        q["position"] = {"embedding": pos[:qpos.shape[0]]}
    for name in layers:
        src, dst = b[name], dict(q[name])
        for what, a, z in (("MLP", src["mlp"]["fc1"]["kernel"], dst["query_mlp"]["fc1"]["kernel"]),
                           ("attention (heads x head size)", src["attn"]["query"]["kernel"],
                            dst["attn"]["query"]["kernel"])):
            if np.shape(a) != np.shape(z):
                raise ConfigError(f"qformer_from_bert: {name} {what} shapes differ (BERT {np.shape(a)}, "
                                  f"Q-Former {np.shape(z)})")
        dst["attn"], dst["attn_norm"] = src["attn"], src["attn_norm"]
        dst["query_mlp"], dst["query_mlp_norm"] = src["mlp"], src["mlp_norm"]
        if "mlp" in dst:
            dst["mlp"], dst["mlp_norm"] = src["mlp"], src["mlp_norm"]
        q[name] = dst
    return q
