"""OPT (Meta's Open Pre-trained Transformers, facebook/opt-125m ... opt-66b): decoder-only LMs
with learned absolute positions, LayerNorm and a plain ReLU MLP; BLIP-2's frozen language model.

    config = OPTConfig.from_variant("tiny")
    model = OPT(config)
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens, input_mask=mask)       # [B, T, vocab]
    logits, out = model.apply({"params": params}, tokens, return_intermediates=True)
    # input embeddings instead of ids (a soft prompt, BLIP-2's projected query outputs):
    emb = model.apply({"params": params}, tokens, method="embed_tokens")     # [B, T, embed_dim]
    logits = model.apply({"params": params}, embeddings=jnp.concatenate([prefix, emb], 1),
                         input_mask=mask)
    cache = model.init_cache(batch, max_len)
    logits, cache = model.apply({"params": params}, tokens, input_mask=mask, cache=cache)
    logits, cache = model.apply({"params": params}, next_tokens[:, None], cache=cache)

The calling convention is `mmjax.models.llama.Llama`'s (tokens or `embeddings=`, `positions`,
`input_mask`, `mask_ar`, `segment_ids`, `attention_mask`, `cache`), so `mmjax.generate`
(greedy, sampling, beam search, `prefix_embeddings=`) and the "lm" task drive it unchanged.

Layers (the shared stack, `mmjax.nn.transformer`): pre-LN blocks x = x + Attn(LN(x));
x = x + MLP(LN(x)) (opt-125m, 1.3b and up), or post-LN x = LN(x + Attn(x)); x = LN(x + MLP(x))
(opt-350m, `norm_position="post"`); biases on every projection (`bias`), MHA, no RoPE.

Positions: a learned table of `max_len + 2` rows indexed by position + 2 (OPT's offset: fairseq
reserved the first two rows). Default positions count a row's real tokens
(cumsum(input_mask) * input_mask - 1, as transformers' `OPTDecoder` computes them, so a
left-padded row starts at 0 and its padding looks up row 1); with a cache they continue the
row's count.

Widths: token embeddings are `embed_dim` wide (HF `word_embed_proj_dim`); when that differs from
`dim` (opt-350m: 512 vs 1024), `project_in` maps them to `dim` before the positions are added
and `project_out` maps the last hidden state back before the output head. `embeddings=` inputs
are `embed_dim` wide (what `embed_tokens` returns, as HF's `inputs_embeds`). The final LayerNorm
exists for pre-LN models unless `remove_final_norm` (HF `_remove_final_layer_norm`); post-LN
models have none.

Outputs: logits [batch, seq, vocab] float32; then the new cache when `cache` was given; then,
with `return_intermediates`, a dict: `hidden_states` (the stack's input -- embeddings after
project_in plus positions -- and each layer's output, num_layers + 1 arrays [B, T, dim], as
HF's `hidden_states` before its last entry), `final_hidden` (after the final norm and
project_out [B, T, embed_dim]: HF's `last_hidden_state`, what the head reads).

Bad input raises `mmjax.errors.InputError` naming the limit: token ids outside [0, vocab_size)
and positions >= max_len (checked when concrete), a sequence longer than max_len
(max_position_embeddings), embeddings of the wrong width.

Param tree: embed/embedding [vocab, embed_dim], embed_positions/embedding [max_len + 2, dim],
project_in/kernel [embed_dim, dim] and project_out/kernel [dim, embed_dim] (when the widths
differ), layers_{i}/{attn_norm, attn/{query,key,value,out}, mlp_norm, mlp/{fc1,fc2}} (or
layers/block/... with `scan_layers`), final_norm (pre-LN), lm_head/kernel [embed_dim, vocab]
(absent when tied). Every param carries logical axis names.
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
from mmjax.models.family import Family, token_inputs
from mmjax.models.llama import _prefill_mask, check_token_ids, segment_positions
from mmjax.nn.cache import KVCache
from mmjax.nn.embeddings import Embed, LearnedPositions
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.norms import LayerNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.transformer import BlockSpec, check_remat_policy, make_layers, run_layers
from mmjax.ops import masks as masks_lib

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclasses.dataclass(frozen=True)
class OPTConfig(configs.Config):
    """HF `OPTConfig` keys in brackets."""

    vocab_size: int = 50272
    dim: int = 768  # [hidden_size]
    embed_dim: int | None = None  # token-embedding width [word_embed_proj_dim]; None = dim
    mlp_dim: int = 3072  # [ffn_dim]
    num_layers: int = 12  # [num_hidden_layers]
    num_heads: int = 12  # [num_attention_heads]
    max_len: int = 2048  # [max_position_embeddings]; the table holds max_len + 2 rows
    norm_position: str = "pre"  # "pre" [do_layer_norm_before=True] | "post" (opt-350m)
    remove_final_norm: bool = False  # [_remove_final_layer_norm]: pre-LN without a final norm
    activation: str = "relu"  # [activation_function]
    bias: bool = True  # biases on q/k/v/out and fc1/fc2 [enable_bias]
    norm_affine: bool = True  # LayerNorm scale and bias [layer_norm_elementwise_affine]
    norm_eps: float = 1e-5  # torch.nn.LayerNorm's default (HF OPT fixes it)
    tie_embeddings: bool = True  # [tie_word_embeddings]
    initializer_range: float = 0.02  # [init_std]
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 1
    dropout: float = 0.0  # residual dropout on attention and MLP outputs in training [dropout]
    dtype: str = "float32"
    param_dtype: str = "float32"
    implementation: str | None = None  # ops.attention implementation (None = best for platform)
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "mlp_dim", "num_layers", "num_heads", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"OPTConfig.{name} must be a positive int, got {value!r}")
        e = self.embed_dim
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e <= 0):
            raise ConfigError(f"OPTConfig.embed_dim must be a positive int or None (= dim), got "
                              f"{self.embed_dim!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"OPTConfig: dim={self.dim} is not divisible by "
                              f"num_heads={self.num_heads}; change one of them")
        if self.norm_position not in ("pre", "post"):
            raise ConfigError(f"OPTConfig.norm_position {self.norm_position!r}; choose 'pre' "
                              "(do_layer_norm_before=True) or 'post' (opt-350m)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"OPTConfig.activation {self.activation!r}"
                              f"{configs.closest_name(str(self.activation), ACTIVATIONS)}; "
                              f"known: {', '.join(ACTIVATIONS)}")
        if not self.norm_eps > 0:
            raise ConfigError(f"OPTConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"OPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        check_remat_policy("OPTConfig", self.remat_policy)
        self.check_dtypes("dtype", "param_dtype")

    @property
    def embed_width(self) -> int:
        """Width of the token embeddings and of `embeddings=` inputs (embed_dim or dim)."""
        return self.dim if self.embed_dim is None else self.embed_dim

    @property
    def projects(self) -> bool:
        """Whether project_in / project_out exist (embed_width != dim)."""
        return self.embed_width != self.dim

    @property
    def final_norm(self) -> bool:
        """Whether the stack ends with a LayerNorm (pre-LN models unless remove_final_norm)."""
        return self.norm_position == "pre" and not self.remove_final_norm

    @property
    def head_size(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads  # OPT is MHA

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def num_params(self) -> int:
        d, e, m, b = self.dim, self.embed_width, self.mlp_dim, int(self.bias)
        norm = 2 * d if self.norm_affine else 0
        per_layer = 4 * d * d + 4 * d * b + 2 * d * m + (m + d) * b + 2 * norm
        total = self.vocab_size * e + (self.max_len + POSITION_OFFSET) * d
        total += self.num_layers * per_layer + (norm if self.final_norm else 0)
        total += 2 * d * e if self.projects else 0
        return total + (0 if self.tie_embeddings else self.vocab_size * e)

    def kv_cache_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.num_layers * self.dim * itemsize


_OPT = dict(vocab_size=50272, max_len=2048)
VARIANTS: dict[str, dict[str, Any]] = {
    # small configs for tests, demos and CPU experiments
    "tiny": dict(vocab_size=256, dim=64, mlp_dim=128, num_layers=2, num_heads=4, max_len=256),
    # published shapes (facebook/opt-*)
    "opt-125m": dict(_OPT, dim=768, mlp_dim=3072, num_layers=12, num_heads=12),
    "opt-350m": dict(_OPT, dim=1024, embed_dim=512, mlp_dim=4096, num_layers=24, num_heads=16,
                     norm_position="post"),
    "opt-1.3b": dict(_OPT, dim=2048, mlp_dim=8192, num_layers=24, num_heads=32),
    "opt-2.7b": dict(_OPT, dim=2560, mlp_dim=10240, num_layers=32, num_heads=32),
    "opt-6.7b": dict(_OPT, dim=4096, mlp_dim=16384, num_layers=32, num_heads=32),
    "opt-13b": dict(_OPT, dim=5120, mlp_dim=20480, num_layers=40, num_heads=40),
}

OPTConfig.NAME = "OPT"
OPTConfig.VARIANTS = VARIANTS


def block_spec(c: OPTConfig) -> BlockSpec:
    """The shared transformer block an OPT layer is: LayerNorm (pre or post), MHA without RoPE,
    plain MLP fc1/fc2, biases everywhere (`bias`)."""
    return BlockSpec(
        num_heads=c.num_heads, head_dim=c.head_size, mlp_dim=c.mlp_dim, norm="layer",
        norm_eps=c.norm_eps, norm_position=c.norm_position, norm_affine=c.norm_affine,
        mlp="plain", activation=c.activation, qkv_bias=c.bias, out_bias=c.bias, mlp_bias=c.bias,
        rope_theta=None, dropout=c.dropout, initializer_range=c.initializer_range,
        implementation=c.implementation, dtype=c.dtype, param_dtype=c.param_dtype,
    )


def _check_positions(positions: jax.Array, max_len: int) -> None:
    """InputError for a position >= max_len (only when the values are concrete)."""
    if isinstance(positions, jax.core.Tracer) or positions.size == 0:
        return
    hi = int(np.asarray(positions).max())
    if hi >= max_len:
        raise InputError(f"OPT: position {hi} is outside the learned position table "
                         f"[0, max_len={max_len}) (max_position_embeddings)")


class OPT(nn.Module):
    """Decoder-only OPT LM. See the module docstring for the call forms."""

    config: OPTConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        self.embed = Embed(c.vocab_size, c.embed_width, dtype, pdtype, init, name="embed")
        self.embed_positions = LearnedPositions(c.max_len + POSITION_OFFSET, c.dim, dtype, pdtype,
                                                init, name="embed_positions")
        if c.projects:
            kw = dict(use_bias=False, dtype=dtype, param_dtype=pdtype, kernel_init=init)
            self.project_in = DenseGeneral(c.dim, ("mlp", "embed"), name="project_in", **kw)
            self.project_out = DenseGeneral(c.embed_width, ("embed", "mlp"), name="project_out",
                                            **kw)
        self.layers = make_layers(block_spec(c), c.num_layers, scan=c.scan_layers,
                                  remat=c.remat_policy if c.remat else "none")
        if c.final_norm:
            self.final_norm = LayerNorm(c.norm_eps, use_bias=c.norm_affine, use_scale=c.norm_affine,
                                        dtype=dtype, param_dtype=pdtype, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = DenseGeneral(c.vocab_size, ("embed", "vocab"), use_bias=False,
                                        dtype=dtype, param_dtype=pdtype, kernel_init=init,
                                        name="lm_head")

    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` slots (default config.max_len);
        stacked over layers for a scanned stack (`scan_layers`)."""
        c = self.config
        return KVCache.create(c.num_layers, batch, max_len or c.max_len, c.num_heads, c.head_size,
                              jnp.dtype(dtype or c.dtype), stacked=c.scan_layers)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token ids [batch, seq] -> token embeddings [batch, seq, embed_width] (what
        `embeddings=` takes). `model.apply(variables, tokens, method="embed_tokens")`."""
        if getattr(tokens, "ndim", None) != 2:
            raise InputError(f"OPT: tokens must be [batch, seq], got shape "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"OPT: tokens must be integer ids, got dtype {tokens.dtype}")
        check_token_ids(tokens, self.config.vocab_size)
        return self.embed(tokens)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        input_mask: jax.Array | None = None,
        mask_ar: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        return_intermediates: bool = False,
        deterministic: bool = True,
    ):
        """
        Args:
          tokens: [batch, seq] int token ids; or, instead,
          embeddings: [batch, seq, embed_width] token embeddings (`embed_tokens(tokens)`, a soft
            prompt, projected image features, or a concatenation of them); positions are added
            here, as for token ids.
          positions: [batch, seq] position ids in [0, max_len) (the table row is position + 2);
            default: count of the row's real tokens (input_mask) - 1, restarting at each packed
            document (segment_ids), or continuing the cache.
          input_mask: [batch, seq] bool, False for padding (padding keys are never attended).
          mask_ar: [batch, seq] autoregressive-block mask (`ops.masks.make_attention_mask`):
            zeros = one bidirectional block, a one starts a causal block; None = causal.
          segment_ids: [batch, seq] int, packed documents (no attention across documents).
          attention_mask: extra bool mask broadcastable to [batch, heads, seq, kv_len].
          cache: a KVCache from `init_cache`; the new tokens are appended and attend the cache.
          return_intermediates: also return the dict of named activations.
          deterministic: False applies `config.dropout` (pass `rngs={"dropout": key}`).
        Returns:
          logits [batch, seq, vocab] float32; then the new cache if `cache` was given; then the
          intermediates dict if asked (module docstring).
        """
        c = self.config
        if (tokens is None) == (embeddings is None):
            raise InputError("OPT: pass exactly one of tokens [batch, seq] or embeddings "
                             f"[batch, seq, embed_width={c.embed_width}]")
        if tokens is not None:
            x = self.embed_tokens(tokens)
        else:
            if getattr(embeddings, "ndim", None) != 3 or embeddings.shape[-1] != c.embed_width:
                raise InputError(f"OPT: embeddings must be [batch, seq, "
                                 f"embed_width={c.embed_width}] (word_embed_proj_dim), got shape "
                                 f"{tuple(getattr(embeddings, 'shape', ()))}")
            if not jnp.issubdtype(embeddings.dtype, jnp.floating):
                raise InputError(f"OPT: embeddings must be floating point, got {embeddings.dtype}")
            x = embeddings.astype(jnp.dtype(c.dtype))
        b, t = x.shape[:2]
        for name, arr in (("positions", positions), ("input_mask", input_mask),
                          ("mask_ar", mask_ar), ("segment_ids", segment_ids)):
            if arr is not None and tuple(arr.shape) != (b, t):
                raise InputError(f"OPT: {name} must have shape {(b, t)}, got {tuple(arr.shape)}")
        if cache is None and t > c.max_len:
            raise InputError(f"OPT: sequence length {t} exceeds max_len={c.max_len} "
                             "(max_position_embeddings)")

        if cache is not None:
            if segment_ids is not None:
                raise InputError("OPT: segment_ids (packing) cannot be combined with a KV cache")
            if input_mask is None:
                input_mask = jnp.ones((b, t), bool)
            cache_index = cache.index
            cache, default_pos, mask = cache.advance(input_mask)
            if mask_ar is not None:
                mask = _prefill_mask(mask, input_mask, mask_ar, cache_index)
            if positions is None:  # padding looks up row 1, as transformers' cumsum gives
                positions = jnp.where(input_mask.astype(bool), default_pos, -1)
            else:  # caller's positions win: keep the cache's record of them in step
                cache = cache.replace(positions=jax.lax.dynamic_update_slice(
                    cache.positions, positions.astype(jnp.int32), (0, cache_index)))
            causal = False
        else:
            cache_index = None
            if mask_ar is not None:
                valid = jnp.ones((b, t), bool) if input_mask is None else input_mask.astype(bool)
                mask = masks_lib.make_attention_mask(valid, mask_ar)
                causal = False
            else:
                mask = None if input_mask is None else masks_lib.padding_mask(input_mask)
                causal = True
            if positions is None:
                if segment_ids is not None:
                    positions = segment_positions(segment_ids)
                elif input_mask is not None:  # transformers: cumsum(mask) * mask - 1
                    m = input_mask.astype(jnp.int32)
                    positions = jnp.cumsum(m, axis=1) * m - 1
                else:
                    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is not None:
            _check_positions(positions, c.max_len)
        mask = masks_lib.and_masks(mask, attention_mask)

        if c.projects:
            x = self.project_in(x)
        x = x + self.embed_positions(positions.astype(jnp.int32) + POSITION_OFFSET)
        x = constrain(x, BATCH_LEN_EMBED)  # (no dropout here: transformers' OPT has none)

        embedded = x
        x, hidden, new_kv = run_layers(
            self.layers, x, mask=mask, segment_ids=segment_ids, positions=positions,
            cache_kv=None if cache is None else (cache.k, cache.v), cache_index=cache_index,
            causal=causal, deterministic=deterministic, keep_hidden=return_intermediates)
        h = self.final_norm(x) if c.final_norm else x
        if c.projects:
            h = self.project_out(h)
        logits = self.embed.attend(h) if c.tie_embeddings else self.lm_head(h)
        logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

        outputs: tuple = (logits,)
        if cache is not None:
            outputs += (cache.replace(k=new_kv[0], v=new_kv[1]),)
        if return_intermediates:
            outputs += ({"hidden_states": (embedded,) + hidden, "final_hidden": h},)
        return outputs[0] if len(outputs) == 1 else outputs


FAMILIES = (Family("opt", OPTConfig, OPT, token_inputs,
                   "OPT (Meta's decoder-only LM, pre- or post-LN; BLIP-2's language model)",
                   tasks=("lm",)),)
