"""LoRA (low-rank adaptation) on any `DenseGeneral` of any mmjax model, with no model edits.

    cfg = LoraConfig(targets=(r"attn/(query|key|value|out)$", r"mlp/(gate|up|down)$"), r=8, alpha=16)
    params = init_lora(module, base_params, cfg, jax.random.key(0), tokens)   # base + 2 leaves/target
    with lora(cfg, deterministic=False):                                        # training forward
        logits = module.apply({"params": params}, tokens, rngs={"dropout": key})
    merged = merge(params, cfg)            # kernel += scale * A.B, LoRA leaves removed

How: `lora(cfg)` is a Flax method interceptor (`flax.linen.intercept_methods`). While it is
active, every `DenseGeneral.__call__` whose module path ("layers_0/attn/query", the module
names joined by "/") is a target gets `scale * ((dropout(x) . A) . B)` added to its output.
The two params live in that module's own scope beside `kernel`:

    lora_a: in_shape + (r,)    (the kernel's input dims, e.g. [embed, r]; [heads, head_dim, r]
                                for an attention output projection)
    lora_b: (r,) + features    (e.g. [r, heads, head_dim] for a query projection)

so the param tree is the model's own tree plus two leaves per target: checkpoints, sharding
rules and freezing regexes (`.*/lora_[ab]$`) work unchanged. Created under `module.init`, they
carry logical axis names (A the kernel's input names + an unsharded rank, B an unsharded rank +
the kernel's output names), so a mesh lays them out like their kernel. Merged, the model is the base
model with new kernels: zero added latency.

Which modules are targets: while params are being created (`init_lora`, or `module.init`
under `lora(cfg)`), those whose path matches one of `cfg.targets` (`re.search`); when the
params already exist, those that hold `lora_a` (so a merged tree runs as the plain model, and
an adapter loaded from peft runs wherever it has weights). A target pattern that matches no
`DenseGeneral` raises `InputError` naming the pattern and the closest module paths.

Initialisation as peft does it: A kaiming-uniform with a = sqrt(5) (torch's `nn.Linear`
default, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = prod(in_shape)) or, with
`init="gaussian"`, N(0, (1/r)^2); B zero, so the adapted model equals the base model exactly
at initialisation. Scale alpha / r, or alpha / sqrt(r) with `use_rslora`. Dropout acts on the
LoRA path's input only (as peft's `lora_dropout`), when `deterministic=False` and a "dropout"
rng is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmjax.errors import ConfigError, InputError
from mmjax.nn.linear import DenseGeneral, _as_tuple

LORA_A, LORA_B = "lora_a", "lora_b"
INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """targets: regexes over module paths ("layers_0/attn/query"), `re.search` semantics.
    r: rank; alpha: the scale numerator; use_rslora: scale alpha/sqrt(r) instead of alpha/r.
    dropout: on the LoRA path's input only. init: A's init, "kaiming" (peft's default) or
    "gaussian". dtype: the LoRA params' dtype (fp32 under a bf16 base, QLoRA-style)."""

    targets: tuple[str, ...]
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    dtype: Any = "float32"  # a dtype name (stored as one: the config is JSON-able)

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not targets:
            raise ConfigError("LoraConfig.targets is empty: name at least one module-path regex")
        for t in targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"LoraConfig.targets: {t!r} is not a valid regex ({e})") from None
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        try:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError:
            raise ConfigError(f"LoraConfig.dtype {self.dtype!r} is not a dtype") from None
        if self.init not in INITS:
            raise ConfigError(f"LoraConfig.init {self.init!r}: one of {', '.join(INITS)}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, path: str) -> list[str]:
        """The target patterns that select module path `path`."""
        return [t for t in self.targets if re.search(t, path)]


def _a_init(cfg: LoraConfig, fan_in: int):
    if cfg.init == "gaussian":
        return nn.initializers.normal(1.0 / cfg.r)
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3/fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class _Trace:
    """What one interceptor run saw: every DenseGeneral path, the patterns that matched."""

    def __init__(self):
        self.paths: list[str] = []
        self.matched: set[str] = set()


def _interceptor(cfg: LoraConfig, deterministic: bool, trace: _Trace):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, DenseGeneral) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        path = "/".join(module.path)
        trace.paths.append(path)
        has = module.has_variable("params", LORA_A)
        hits = cfg.matches(path)
        trace.matched.update(hits)
        if not has and not (hits and module.is_mutable_collection("params")):
            return y
        x = args[0] if args else kwargs["x"]
        axis = tuple(a % x.ndim for a in _as_tuple(module.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        features = _as_tuple(module.features)
        fan_in = int(np.prod(in_shape))
        # logical names: A keeps the kernel's input names, B its output names, rank unsharded
        names = tuple(module.kernel_axes)
        a = module.param(LORA_A, nn.with_logical_partitioning(
            _a_init(cfg, fan_in), names[:len(axis)] + (None,)), in_shape + (cfg.r,), cfg.dtype)
        b = module.param(LORA_B, nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None,) + names[len(axis):]), (cfg.r,) + features,
            cfg.dtype)
        h = x.astype(module.dtype)
        if cfg.dropout > 0.0 and not deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - cfg.dropout), jnp.zeros_like(h))
        # [..., r]: x's free dims, then r
        h = lax.dot_general(h, a.astype(module.dtype), ((axis, tuple(range(len(axis)))), ((), ())),
                            precision=module.precision)
        h = lax.dot_general(h, b.astype(module.dtype), (((h.ndim - 1,), (0,)), ((), ())),
                            precision=module.precision)
        return y + (cfg.scale * h).astype(y.dtype)

    return intercept


@contextlib.contextmanager
def lora(cfg: LoraConfig, deterministic: bool = True, trace: _Trace | None = None) -> Iterator[_Trace]:
    """Context manager: LoRA active on the targets of `cfg` for every init/apply inside it
    (jit tracing included). Yields the run's trace (module paths seen)."""
    trace = trace if trace is not None else _Trace()
    with nn.intercept_methods(_interceptor(cfg, deterministic, trace)):
        yield trace


def _closest(pattern: str, paths: Sequence[str], n: int = 3) -> list[str]:
    unique = list(dict.fromkeys(paths))
    # a pattern usually names a leaf ("q_proj"): rank the paths by their last name first
    def score(p):
        leaf = p.rsplit("/", 1)[-1]
        return max(difflib.SequenceMatcher(None, pattern, leaf).ratio(),
                   difflib.SequenceMatcher(None, pattern, p).ratio())
    best = sorted(unique, key=score, reverse=True)
    shown, leaves = [], set()
    for p in best:  # one path per leaf name, so the hint lists different modules
        leaf = p.rsplit("/", 1)[-1]
        if leaf not in leaves:
            leaves.add(leaf)
            shown.append(p)
        if len(shown) == n:
            break
    return shown


def check_targets(cfg: LoraConfig, paths: Sequence[str]) -> None:
    """InputError for each pattern of `cfg.targets` that selects none of `paths`."""
    for t in cfg.targets:
        if not any(re.search(t, p) for p in paths):
            if not paths:
                raise InputError(f"LoRA target {t!r}: the model has no DenseGeneral layers")
            raise InputError(f"LoRA target {t!r} matches no DenseGeneral module path; closest: "
                             f"{', '.join(_closest(t, paths))} ({len(set(paths))} paths in all)")


def init_lora(module: nn.Module, params: Mapping[str, Any], cfg: LoraConfig, rng: jax.Array,
              *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`params` (the base model's) plus fresh `lora_a` / `lora_b` leaves on every target of
    `cfg`, found by one abstract forward pass of `module` on example inputs `args` / `kwargs`
    (shapes only matter; nothing runs). The A values are one draw from `rng`,
    cut into the targets in sorted module-path order. Base leaves are returned as given."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    def run(p, key):  # the example inputs are baked in as constants (shapes are what matter)
        variables = module.apply({"params": p}, *args, **kwargs, mutable=["params"],
                                 rngs={"params": key})[1]
        return lora_params(nn.meta.unbox(variables["params"]))  # only the new leaves come out

    # shapes only (nothing compiles): which modules get LoRA leaves, and their shapes; an XLA
    # compile of the whole init would take seconds for what is one random draw
    with lora(cfg) as trace:
        shapes = jax.eval_shape(run, params, rng)
    check_targets(cfg, trace.paths)
    modules = sorted(lora_modules(shapes))
    nodes = []
    for path in modules:
        node = shapes
        for k in path.split("/"):
            node = node[k]
        nodes.append((path, node[LORA_A], node[LORA_B]))
    # one draw for every A (one small compile), cut into the leaves in sorted-path order
    total = sum(int(np.prod(a.shape)) for _, a, _ in nodes)
    if cfg.init == "gaussian":  # N(0, (1/r)^2)
        flat = jax.random.normal(rng, (total,), jnp.float32) / cfg.r
    else:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        flat = jax.random.uniform(rng, (total,), jnp.float32, -1.0, 1.0)
    flat = np.asarray(flat)
    new: dict[str, Any] = {}
    start = 0
    for path, a, b in nodes:
        size = int(np.prod(a.shape))
        piece = flat[start:start + size].reshape(a.shape)
        start += size
        if cfg.init != "gaussian":  # fan_in: the kernel's input dims (a stack's layer dim aside)
            n = _stacked_dims(a.shape, b.shape, np.shape(_node(params, path)["kernel"])) or 0
            piece = piece / math.sqrt(int(np.prod(a.shape[n:-1])))
        leaf = new
        for k in path.split("/"):
            leaf = leaf.setdefault(k, {})
        leaf[LORA_A] = jnp.asarray(piece, a.dtype)
        leaf[LORA_B] = jnp.zeros(b.shape, b.dtype)
    return with_lora(params, new)


# --- param-tree helpers ----------------------------------------------------------------------

def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """(path, node) for every mapping node of a nested param tree."""
    yield prefix, tree
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _walk(v, prefix + (str(k),))


def _rebuild(tree: Mapping[str, Any], fn, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of `tree` whose every mapping node passes through `fn(path, dict) -> dict`."""
    node = {k: (_rebuild(v, fn, prefix + (str(k),)) if isinstance(v, Mapping) else v)
            for k, v in tree.items()}
    return fn(prefix, node)


def lora_modules(params: Mapping[str, Any]) -> list[str]:
    """Module paths ("layers_0/attn/query") of every module holding LoRA leaves."""
    return ["/".join(p) for p, node in _walk(params) if LORA_A in node]


def lora_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Only the LoRA leaves of `params`, in the same nesting (what an adapter file holds)."""
    def keep(path, node):
        return {k: v for k, v in node.items()
                if k in (LORA_A, LORA_B) or (isinstance(v, Mapping) and v)}
    return _rebuild(params, keep)


def without_lora(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with every LoRA leaf removed (the base model's tree)."""
    return _rebuild(params, lambda p, node: {k: v for k, v in node.items() if k not in (LORA_A, LORA_B)})


def _stacked_dims(a_shape, b_shape, k_shape) -> int | None:
    """How many leading dims `lora_a`, `lora_b` and the kernel share as a stack (0 for a plain
    layer, 1 for `scan_layers`' [layers, ...] params); None when the shapes do not fit
    (a: lead + in + (r,), b: lead + (r,) + out, kernel: lead + in + out)."""
    a_shape, b_shape, k_shape = tuple(a_shape), tuple(b_shape), tuple(k_shape)
    for n in range(min(len(a_shape), len(b_shape)) - 1):
        if (a_shape[:n] == b_shape[:n] == k_shape[:n] and a_shape[-1] == b_shape[n]
                and a_shape[n:-1] + b_shape[n + 1:] == k_shape[n:]):
            return n
    return None


def _node(tree: Mapping[str, Any], path: str) -> Any:
    for k in path.split("/"):
        tree = tree.get(k) if isinstance(tree, Mapping) else None
        if tree is None:
            return None
    return tree


def with_lora(base: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with the LoRA leaves of `adapter` (same nesting) added beside the kernels;
    InputError when an adapter module has no kernel in `base` or the shapes disagree."""
    out = jax.tree_util.tree_map(lambda x: x, dict(base))
    for path, node in _walk(adapter):
        if LORA_A not in node:
            continue
        target = out
        for k in path:
            target = target.get(k) if isinstance(target, Mapping) else None
            if target is None:
                break
        name = "/".join(path)
        if not isinstance(target, Mapping) or "kernel" not in target:
            raise InputError(f"LoRA weights for {name}, which has no kernel in the base params")
        a, b, kernel = node[LORA_A], node[LORA_B], target["kernel"]
        k_shape = tuple(np.shape(kernel))
        if _stacked_dims(np.shape(a), np.shape(b), k_shape) is None:
            raise InputError(f"LoRA weights for {name}: lora_a {tuple(np.shape(a))} x lora_b "
                             f"{tuple(np.shape(b))} do not fit the kernel {k_shape}")
        target[LORA_A], target[LORA_B] = a, b
    return out


def _delta(a, b, kernel, scale):
    """scale * A.B in the kernel's shape, in float32 (per layer for a stacked kernel)."""
    n = _stacked_dims(np.shape(a), np.shape(b), np.shape(kernel))
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lead, r = a.shape[:n], a.shape[-1]
    ab = jnp.matmul(a.reshape(lead + (-1, r)), b.reshape(lead + (r, -1)))
    return scale * ab.reshape(np.shape(kernel))


def merge(params: Mapping[str, Any], cfg: LoraConfig) -> dict[str, Any]:
    """Every target's kernel += scale * A.B (in float32, cast back to the kernel's dtype), LoRA
    leaves removed: the plain model's tree, with no added latency."""
    def fold(path, node):
        if LORA_A not in node:
            return node
        kernel = node["kernel"]
        new = jnp.asarray(kernel, jnp.float32) + _delta(node[LORA_A], node[LORA_B], kernel, cfg.scale)
        out = {k: v for k, v in node.items() if k not in (LORA_A, LORA_B)}
        out["kernel"] = new.astype(jnp.asarray(kernel).dtype)
        return out
    return _rebuild(params, fold)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any], cfg: LoraConfig) -> dict[str, Any]:
    """The inverse of `merge`: kernel -= scale * A.B with the LoRA leaves `adapter`
    (`lora_params` of the tree before merging), which are put back."""
    params = with_lora(merged, adapter)

    def unfold(path, node):
        if LORA_A not in node:
            return node
        kernel = node["kernel"]
        new = jnp.asarray(kernel, jnp.float32) - _delta(node[LORA_A], node[LORA_B], kernel, cfg.scale)
        return {**node, "kernel": new.astype(jnp.asarray(kernel).dtype)}
    return _rebuild(params, unfold)


__all__ = [
    "LORA_A",
    "LORA_B",
    "LoraConfig",
    "check_targets",
    "init_lora",
    "lora",
    "lora_modules",
    "lora_params",
    "merge",
    "unmerge",
    "with_lora",
    "without_lora",
]
