"""LLaMA-family decoder-only language models (LLaMA 1/2/3, Llama 3.1 rope scaling, Mistral,
Mixtral-style sparse MoE).

Pre-norm blocks: x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)); RoPE positions;
MHA / GQA / MQA; optional sliding-window attention (Mistral); tied or untied output head.

    config = LlamaConfig.from_variant("tiny")
    model = Llama(config)
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens)                        # [B, T, vocab]
    logits, out = model.apply({"params": params}, tokens, return_intermediates=True)
    cache = model.init_cache(batch, max_len)
    logits, cache = model.apply({"params": params}, tokens, cache=cache)  # decoding

Param tree: embed/embedding, layers_{i}/{attn_norm, attn/{query,key,value,out},
mlp_norm, mlp/{gate,up,down}}, final_norm, lm_head (absent when tied). With
`num_experts > 0` every layer's MLP is a sparse MoE (`mmjax.nn.moe.MoE`):
layers_{i}/moe/{router, gate, up, down}; its auxiliary losses are sown into the "losses"
collection (`model.apply(..., mutable=["losses"])`). With `mod_capacity` (Mixture-of-Depths,
`mmjax.nn.mod`) every `mod_every`-th layer is routed: layers_{i}/{router, block/{attn_norm, ...}};
its router BCE is sown into "losses" as `mod_router_bce`.
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
from mmjax.nn.cache import KVCache
from mmjax.nn.embeddings import Embed
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mod import make_mod_layers, run_mod_layers
from mmjax.nn.moe import DISPATCH_MODES
from mmjax.nn.norms import RMSNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.transformer import BlockSpec, check_remat_policy, make_layers, run_layers
from mmjax.ops import masks as masks_lib
from mmjax.ops.rope import RopeScaling


@dataclasses.dataclass(frozen=True)
class LlamaConfig(configs.Config):
    RENAMED = {"attention_impl": "implementation"}  # dicts written before the rename
    vocab_size: int = 32000
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA
    head_dim: int | None = None  # None = dim // num_heads
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_len: int = 2048
    sliding_window: int | None = None  # Mistral: keys at most this many positions back
    attention_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    implementation: str | None = None  # ops.attention implementation (None = best for platform)
    remat: bool = False  # recompute each block in the backward pass
    remat_policy: str = "full"  # with remat: "full" (save nothing), "dots", "dots_no_batch"
    scan_layers: bool = False  # nn.scan over layers: one compiled block (params [layers, ...])
    dropout: float = 0.0  # residual dropout (embeddings, attention and MLP outputs) in training
    # Mixture of Experts (mmjax.nn.moe): num_experts > 0 replaces every MLP by a sparse MoE
    num_experts: int = 0
    experts_per_token: int = 2  # top-k
    moe_dispatch: str = "dropless"  # "dropless" (sort + grouped matmul) | "capacity" (drops)
    capacity_factor: float = 1.25  # "capacity": slots per expert = cf * tokens * k / experts
    router_noise: float = 0.0  # training only: router input x uniform[1 - noise, 1 + noise]
    router_renormalize: bool = True  # top-k weights sum to 1 (Mixtral); False: Switch's probs
    aux_loss_weight: float = 0.01  # load-balancing loss (Switch / Mixtral form)
    router_z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
    # Mixture-of-Depths (mmjax.nn.mod): a fraction of each sequence's tokens goes through
    # every `mod_every`-th block (layers mod_every-1, 2*mod_every-1, ...), the rest skip it
    mod_capacity: float | None = None  # None = dense; e.g. 0.125 = top 12.5% of tokens
    mod_every: int = 2  # 2 = every other block is routed
    mod_aux_weight: float = 0.01  # BCE of the router logits vs the top-k choice (causal decoding)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "mlp_dim", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ConfigError(
                f"LlamaConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"LlamaConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.kv_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LlamaConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_experts < 0:
            raise ConfigError(f"LlamaConfig.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            if self.mlp_bias:
                raise ConfigError("LlamaConfig: mlp_bias is not supported with num_experts > 0 "
                                  "(the MoE experts have no biases)")
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ConfigError(
                    f"LlamaConfig.experts_per_token={self.experts_per_token} must be in "
                    f"[1, num_experts={self.num_experts}]")
            if self.moe_dispatch not in DISPATCH_MODES:
                raise ConfigError(
                    f"LlamaConfig.moe_dispatch {self.moe_dispatch!r}"
                    f"{configs.closest_name(self.moe_dispatch, DISPATCH_MODES)}; known: "
                    f"{', '.join(DISPATCH_MODES)}")
            if self.capacity_factor <= 0:
                raise ConfigError(
                    f"LlamaConfig.capacity_factor must be positive, got {self.capacity_factor}")
            if not 0.0 <= self.router_noise < 1.0:
                raise ConfigError(
                    f"LlamaConfig.router_noise must be in [0, 1), got {self.router_noise}")
            for name in ("aux_loss_weight", "router_z_loss_weight"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"LlamaConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.mod_capacity is not None:
            if not 0.0 < self.mod_capacity <= 1.0:
                raise ConfigError(f"LlamaConfig.mod_capacity must be in (0, 1] (the fraction of "
                                  f"tokens a routed block processes), got {self.mod_capacity}")
            if not 1 <= self.mod_every <= self.num_layers:
                raise ConfigError(f"LlamaConfig.mod_every must be in [1, num_layers="
                                  f"{self.num_layers}] (2 = every other block), got "
                                  f"{self.mod_every}")
            if self.mod_aux_weight < 0:
                raise ConfigError(f"LlamaConfig.mod_aux_weight must be >= 0, got "
                                  f"{self.mod_aux_weight}")
            if self.num_experts:
                raise ConfigError("LlamaConfig: mod_capacity (Mixture-of-Depths) cannot be "
                                  "combined with num_experts > 0; set one of them")
            if self.scan_layers:
                raise ConfigError("LlamaConfig: mod_capacity (Mixture-of-Depths) needs "
                                  "scan_layers=False (routed and dense blocks differ)")
        check_remat_policy("LlamaConfig", self.remat_policy)
        if self.head_size % 2:
            raise ConfigError(f"LlamaConfig: RoPE needs an even head_dim, got {self.head_size}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", configs.from_dict(RopeScaling, self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.check_dtypes("dtype", "param_dtype")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        return self.dim // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def num_params(self) -> int:
        e, h, kv, hd = self.dim, self.num_heads, self.kv_heads, self.head_size
        attn = e * h * hd * 2 + e * kv * hd * 2
        mlp = 3 * e * self.mlp_dim
        if self.num_experts:
            mlp = self.num_experts * (3 * e * self.mlp_dim + e)
        per_layer = attn + mlp + 2 * e
        head = 0 if self.tie_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * per_layer + e + head

    def kv_cache_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_size * itemsize


VARIANTS: dict[str, dict[str, Any]] = {
    # small configs for tests, demos and CPU experiments
    "tiny": dict(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=172,
                 max_len=256),
    "small": dict(vocab_size=4096, dim=256, num_layers=6, num_heads=8, num_kv_heads=4, mlp_dim=688,
                  max_len=512),
    # published shapes
    "llama-7b": dict(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, mlp_dim=11008,
                     max_len=2048, norm_eps=1e-6),
    "llama-13b": dict(vocab_size=32000, dim=5120, num_layers=40, num_heads=40, mlp_dim=13824,
                      max_len=2048, norm_eps=1e-6),
    "llama2-7b": dict(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, mlp_dim=11008,
                      max_len=4096, norm_eps=1e-5),
    "llama2-13b": dict(vocab_size=32000, dim=5120, num_layers=40, num_heads=40, mlp_dim=13824,
                       max_len=4096, norm_eps=1e-5),
    "llama2-70b": dict(vocab_size=32000, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                       mlp_dim=28672, max_len=4096, norm_eps=1e-5),
    "llama3-8b": dict(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      mlp_dim=14336, max_len=8192, norm_eps=1e-5, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_id=128001),
    "llama3.1-8b": dict(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        mlp_dim=14336, max_len=131072, norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                        bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
    "mistral-7b": dict(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       mlp_dim=14336, max_len=32768, norm_eps=1e-5, sliding_window=4096),
}


LlamaConfig.NAME = "LLaMA"
LlamaConfig.VARIANTS = VARIANTS


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its packed document: [batch, seq] -> [batch, seq]."""
    seq = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def check_token_ids(tokens: jax.Array, vocab_size: int) -> None:
    """Raise InputError for ids outside [0, vocab_size) (only when the values are concrete)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    if tokens.size == 0:
        raise InputError("token ids: empty input")
    host = np.asarray(tokens)  # concrete: check on the host (jnp ops would trace under jit)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def block_spec(c: LlamaConfig) -> BlockSpec:
    """The shared transformer block (`mmjax.nn.transformer`) a LLaMA-family layer is: pre-norm
    RMSNorm, RoPE attention (MHA / GQA / MQA), SwiGLU MLP or sparse MoE."""
    return BlockSpec(
        num_heads=c.num_heads, num_kv_heads=c.kv_heads, head_dim=c.head_size, mlp_dim=c.mlp_dim,
        norm="rms", norm_eps=c.norm_eps, norm_position="pre",
        mlp="moe" if c.num_experts else "gated", activation=c.activation,
        qkv_bias=c.attention_bias, out_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, dropout=c.dropout,
        initializer_range=c.initializer_range, implementation=c.implementation,
        dtype=c.dtype, param_dtype=c.param_dtype,
        num_experts=c.num_experts, experts_per_token=c.experts_per_token,
        moe_dispatch=c.moe_dispatch, capacity_factor=c.capacity_factor,
        router_noise=c.router_noise, router_renormalize=c.router_renormalize,
        aux_loss_weight=c.aux_loss_weight, router_z_loss_weight=c.router_z_loss_weight,
    )


def _prefill_mask(cache_mask: jax.Array, input_mask: jax.Array, mask_ar: jax.Array,
                  cache_index: jax.Array) -> jax.Array:
    """The cache's attention mask [batch, 1, T, max_len] with the new tokens' own block
    replaced by the `mask_ar` pattern (a bidirectional prefix sees its later tokens)."""
    cumsum = jnp.cumsum(mask_ar.astype(jnp.int32), axis=1)
    block = (cumsum[:, None, :] <= cumsum[:, :, None]) & input_mask.astype(bool)[:, None, :]
    return jax.lax.dynamic_update_slice(cache_mask, block[:, None], (0, 0, 0, cache_index))


class Llama(nn.Module):
    """Decoder-only LM. See the module docstring for the call forms."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        self.embed = Embed(c.vocab_size, c.dim, dtype, pdtype, init, name="embed")
        self.embed_dropout = nn.Dropout(c.dropout)
        remat = c.remat_policy if c.remat else "none"
        if c.mod_capacity is not None:
            self.layers = make_mod_layers(block_spec(c), c.num_layers, capacity=c.mod_capacity,
                                          every=c.mod_every, aux_weight=c.mod_aux_weight,
                                          remat=remat)
        else:
            self.layers = make_layers(block_spec(c), c.num_layers, scan=c.scan_layers,
                                      remat=remat)
        self.final_norm = RMSNorm(c.norm_eps, dtype, pdtype, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = DenseGeneral(c.vocab_size, ("embed", "vocab"), dtype=dtype,
                                        param_dtype=pdtype, kernel_init=init, name="lm_head")

    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (default config.max_len);
        stacked over layers for a scanned stack (`scan_layers`)."""
        c = self.config
        return KVCache.create(
            c.num_layers, batch, max_len or c.max_len, c.kv_heads, c.head_size,
            jnp.dtype(dtype or c.dtype), stacked=c.scan_layers,
            routed=c.mod_capacity is not None,
        )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token ids [batch, seq] -> input embeddings [batch, seq, dim] (what `__call__` feeds
        its first block). `model.apply(variables, tokens, method="embed_tokens")`."""
        c = self.config
        if getattr(tokens, "ndim", None) != 2:
            raise InputError(f"Llama: tokens must be [batch, seq], got shape "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"Llama: tokens must be integer ids, got dtype {tokens.dtype}")
        check_token_ids(tokens, c.vocab_size)
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
        layer_hook: Any = None,
        mod_routing: str | None = None,
    ):
        """
        Args:
          tokens: [batch, seq] int token ids; or, instead,
          embeddings: [batch, seq, dim] input embeddings (`embed_tokens(tokens)`, a soft prompt,
            projected image features, or a concatenation of them).
          positions: [batch, seq] position ids; default: 0.. per row, counting only real tokens
            (input_mask), restarting at each packed document (segment_ids), or continuing the
            cache.
          input_mask: [batch, seq] bool, False for padding (padding keys are never attended).
          mask_ar: [batch, seq] int/bool autoregressive-block mask (`ops.masks.
            make_attention_mask`): zeros = one bidirectional block (a prefix: image tokens, a
            prompt), a one starts a new causal block; None = causal everywhere (all ones).
            With a cache it shapes the new tokens' block; cached tokens stay visible.
          segment_ids: [batch, seq] int, packed documents (no attention across documents).
          attention_mask: extra bool mask broadcastable to [batch, heads, seq, kv_len]
            (any custom pattern), ANDed with the rest.
          cache: a KVCache from `init_cache`; the new tokens are appended and attend the cache.
          return_intermediates: also return a dict of named activations.
          deterministic: False applies `config.dropout` (pass `rngs={"dropout": key}`).
          layer_hook: `hook(i, x) -> x` run before layer i and after the last (i = num_layers):
            a model that inserts its own blocks between this frozen stack's layers (Flamingo)
            passes them here (`mmjax.nn.transformer.run_layers`; not with scan_layers).
          mod_routing: Mixture-of-Depths only: "topk" (training; the default without a cache)
            or "predictor" (causal per-token decisions; the default, and required, with a
            cache). See `mmjax.nn.mod`.
        Returns:
          logits [batch, seq, vocab] float32; then the new cache if `cache` was given; then the
          intermediates dict if asked: `hidden_states` (embeddings and each layer's output,
          num_layers + 1 arrays, as Hugging Face orders them but unnormalised), `final_hidden`
          (after the final norm).
        """
        c = self.config
        if (tokens is None) == (embeddings is None):
            raise InputError("Llama: pass exactly one of tokens [batch, seq] or embeddings "
                             "[batch, seq, dim]")
        if tokens is not None:
            x = self.embed_tokens(tokens)
        else:
            if getattr(embeddings, "ndim", None) != 3 or embeddings.shape[-1] != c.dim:
                raise InputError(f"Llama: embeddings must be [batch, seq, dim={c.dim}], got shape "
                                 f"{tuple(getattr(embeddings, 'shape', ()))}")
            if not jnp.issubdtype(embeddings.dtype, jnp.floating):
                raise InputError(f"Llama: embeddings must be floating point, got {embeddings.dtype}")
            x = embeddings.astype(jnp.dtype(c.dtype))
        b, t = x.shape[:2]
        for name, arr in (("positions", positions), ("input_mask", input_mask),
                          ("mask_ar", mask_ar), ("segment_ids", segment_ids)):
            if arr is not None and tuple(arr.shape) != (b, t):
                raise InputError(f"Llama: {name} must have shape {(b, t)}, got {tuple(arr.shape)}")
        if cache is None and t > c.max_len:
            raise InputError(f"Llama: sequence length {t} exceeds max_len={c.max_len}")
        x = constrain(x, BATCH_LEN_EMBED)
        if c.dropout > 0.0 and not deterministic:
            x = self.embed_dropout(x, deterministic=False)

        if cache is not None:
            if segment_ids is not None:
                raise InputError("Llama: segment_ids (packing) cannot be combined with a KV cache")
            if input_mask is None:
                input_mask = jnp.ones((b, t), bool)
            cache_index = cache.index
            cache, default_pos, mask = cache.advance(input_mask)
            if mask_ar is not None:
                mask = _prefill_mask(mask, input_mask, mask_ar, cache_index)
            if positions is None:
                positions = default_pos
            else:  # caller's positions win: keep the cache's record of them in step
                cache = cache.replace(positions=jax.lax.dynamic_update_slice(
                    cache.positions, positions.astype(jnp.int32), (0, cache_index)))
            kv_positions = cache.positions
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
                elif input_mask is not None:
                    positions = jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)
                else:
                    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_positions = positions
        if c.sliding_window is not None:
            window = masks_lib.sliding_window_mask(positions, kv_positions, c.sliding_window)
            mask = masks_lib.and_masks(mask, window[:, None])
        mask = masks_lib.and_masks(mask, attention_mask)

        embedded = x
        if c.mod_capacity is not None:
            if input_mask is not None:
                valid = input_mask.astype(bool)
            elif segment_ids is not None:
                valid = segment_ids != 0
            else:
                valid = jnp.ones((b, t), bool)
            if cache is not None and cache.routed is None:
                raise InputError("Llama: a Mixture-of-Depths model needs a cache from its own "
                                 "init_cache (with per-layer routing slots)")
            x, hidden, new_kv, new_routed = run_mod_layers(
                self.layers, x, valid=valid, mask=mask, segment_ids=segment_ids,
                positions=positions, cache_kv=None if cache is None else (cache.k, cache.v),
                cache_index=cache_index, routed_cache=None if cache is None else cache.routed,
                causal=causal, deterministic=deterministic, layer_hook=layer_hook,
                routing=mod_routing or ("topk" if cache is None else "predictor"))
            if cache is not None:
                cache = cache.replace(routed=new_routed)
        else:
            x, hidden, new_kv = run_layers(
                self.layers, x, mask=mask, segment_ids=segment_ids, positions=positions,
                cache_kv=None if cache is None else (cache.k, cache.v), cache_index=cache_index,
                causal=causal, deterministic=deterministic, keep_hidden=return_intermediates,
                layer_hook=layer_hook)
        h = self.final_norm(x)
        logits = self.embed.attend(h) if c.tie_embeddings else self.lm_head(h)
        logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

        outputs: tuple = (logits,)
        if cache is not None:
            outputs += (cache.replace(k=new_kv[0], v=new_kv[1]),)
        if return_intermediates:
            outputs += ({"hidden_states": (embedded,) + hidden, "final_hidden": h},)
        return outputs[0] if len(outputs) == 1 else outputs


FAMILIES = (Family("llama", LlamaConfig, Llama, token_inputs,
                   "LLaMA 1/2/3, Llama 3.1, Mistral, Mixtral (decoder-only LM, dense or MoE)",
                   tasks=("lm",)),)
