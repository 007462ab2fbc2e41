"""Named parallelism presets: a rules table for params and activations, one for the optimizer
state, and (Flamingo) a dtype policy. The mesh says how many devices each axis has; the preset
says which arrays each axis splits.

    preset = get_preset("zero1")            # ExperimentConfig.parallelism / --set parallelism=
    mesh = make_mesh("data=8")              # --mesh data=8
    check_mesh(mesh, preset)                # every mesh axis > 1 is used by the preset

| preset   | params                         | optimizer state        | batch rows          | example mesh (8) |
|----------|--------------------------------|------------------------|---------------------|------------------|
| data     | replicated                     | replicated             | data                | data=8           |
| zero1    | replicated                     | `embed` over data      | data                | data=8           |
| fsdp     | `embed` over fsdp              | as params              | data, fsdp          | fsdp=8           |
| fsdp_tp  | `embed` over fsdp; heads, MLP, vocab over tensor; experts over expert | as params | data, fsdp | fsdp=4,tensor=2 |
| tp_sp    | heads, MLP, vocab over tensor  | as params              | data; residual length over seq x tensor | data=2,tensor=4 |
| context  | `embed` over fsdp              | as params              | data, fsdp; every activation's length over seq, ring attention | seq=8 |
| expert   | experts over expert; `embed` over fsdp | as params      | data, fsdp, expert  | expert=8         |
| flamingo | embeddings, attention, FFW over tensor; fp32 | + `embed` over data (ZeRO-1) | data | data=2,tensor=4 |

Tensor parallelism is Megatron's: query/key/value kernels `[embed, heads, head_dim]` and the MLP's
gate/up kernels `[embed, mlp]` are split along their outputs (column parallel), the attention
output `[heads, head_dim, embed]` and MLP down `[mlp, embed]` along their inputs (row parallel), so
each block needs one all-reduce (or, with `tp_sp`, a reduce-scatter / all-gather pair around the
sequence-split residual stream). XLA's SPMD partitioner inserts the collectives; no model code
names a device.

`flamingo` reproduces Flamingo's training setup (Alayrac et al. 2022, appendix): 16-way model
parallelism of embeddings, self/cross-attention and FFW (`--mesh data=-1,tensor=16` on a pod),
ZeRO-1 sharding of the optimizer state over the data axis, float32 params and optimizer
accumulators, bfloat16 activations and gradients (`model.dtype="bfloat16"`,
`model.param_dtype="float32"`; the backward pass runs in bfloat16 and each gradient is cast to
float32 at its param).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.parallel.rules import DEFAULT_RULES, Rules, mesh_axes_used, rule_targets, validate_rules


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named parallelism layout.

    rules: logical-axis rules for params and activations (batch rows follow `act_batch`).
    opt_rules: rules for the optimizer state (each Adam moment takes the layout its param would
      have under these rules); None = the same as `rules`.
    dtype / param_dtype: the model's compute / storage dtypes this preset implies (None: keep the
      experiment's).
    example_mesh: a typical mesh on 8 devices (docs, tests, the memory benchmark).
    """

    name: str
    summary: str
    rules: Rules
    opt_rules: Rules | None = None
    dtype: str | None = None
    param_dtype: str | None = None
    implementation: str | None = None  # e.g. "ring" for context parallelism (None: keep)
    example_mesh: str = ""

    def __post_init__(self):
        validate_rules(self.rules)
        if self.opt_rules is not None:
            validate_rules(self.opt_rules)

    @property
    def optimizer_rules(self) -> Rules:
        return self.rules if self.opt_rules is None else self.opt_rules

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes that split the batch's rows (the first `act_batch` rule)."""
        for name, target in self.rules:
            if name == "act_batch":
                return rule_targets(target)
        return ()

    def mesh_axes(self) -> set[str]:
        return mesh_axes_used(self.rules) | mesh_axes_used(self.optimizer_rules)

    def configure_model(self, model_config: Any, *, on_mesh: bool = True) -> Any:
        """`model_config` with this preset's dtypes and attention implementation (unchanged
        when the preset sets none; the attention implementation only `on_mesh`: ring attention
        needs the mesh's seq axis).

        The settings reach every nested model config (a dataclass field that is itself a
        config: CLIP's `vision` / `text` towers, a VLM's vision encoder and LLM), each config
        taking those of the settings it has a field for. ConfigError when no config in the tree
        has a field for one of them."""
        fields = [("dtype", self.dtype), ("param_dtype", self.param_dtype)]
        if on_mesh:
            fields.append(("implementation", self.implementation))
        changes = {k: v for k, v in fields if v is not None}
        if not changes:
            return model_config
        used: set[str] = set()
        out = _configure_tree(model_config, changes, used)
        missing = [k for k in changes if k not in used]
        if missing:
            raise ConfigError(
                f"parallelism={self.name!r} sets the model's {', '.join(missing)}, but neither "
                f"{type(model_config).__name__} nor any config nested in it has such a field")
        return out


def _configure_tree(config: Any, changes: dict[str, Any], used: set[str]) -> Any:
    """`config` (a dataclass) with `changes` applied to it and, recursively, to every field that
    is itself a dataclass; `used` collects the names some config accepted."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    names = {f.name for f in dataclasses.fields(config)}
    own = {k: v for k, v in changes.items() if k in names}
    used.update(own)
    nested = {}
    for name in names - set(own):
        value = getattr(config, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            new = _configure_tree(value, changes, used)
            if new is not value:
                nested[name] = new
    if not own and not nested:
        return config
    return dataclasses.replace(config, **own, **nested)


_TP_PARAMS: Rules = (("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                     ("mlp", "tensor"))
_TP_ACTS: Rules = (("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"),
                   ("act_vocab", "tensor"))

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "data", "pure data parallelism: every device holds all params and optimizer state",
        rules=(("act_batch", "data"),),
        example_mesh="data=8",
    ),
    Preset(
        "zero1", "ZeRO-1: params replicated, optimizer state sharded over the data axis",
        rules=(("act_batch", "data"),),
        opt_rules=(("embed", "data"),),
        example_mesh="data=8",
    ),
    Preset(
        "fsdp", "FSDP (ZeRO-3): params and optimizer state sharded over fsdp, gathered at use",
        rules=(("embed", "fsdp"), ("act_batch", ("data", "fsdp"))),
        example_mesh="fsdp=8",
    ),
    Preset(
        "fsdp_tp", "FSDP over fsdp + Megatron tensor parallelism over tensor (+ experts over "
        "expert, sequence over seq)",
        rules=DEFAULT_RULES,
        example_mesh="fsdp=4,tensor=2",
    ),
    Preset(
        "tp_sp", "Megatron tensor parallelism + sequence parallelism: the residual stream's "
        "length split over seq x tensor between the tensor-parallel blocks",
        rules=_TP_PARAMS + (("act_batch", "data"),) + _TP_ACTS
        + (("act_len", ("seq", "tensor")), ("act_len", "seq")),
        example_mesh="data=2,tensor=4",
    ),
    Preset(
        "context", "context (ring) parallelism: every activation's length split over seq, "
        "attention by ring attention (K/V blocks travel round the seq axis), params FSDP over fsdp",
        rules=(("embed", "fsdp"), ("act_batch", ("data", "fsdp")), ("act_len", "seq")),
        implementation="ring",
        example_mesh="seq=8",
    ),
    Preset(
        "expert", "expert parallelism: MoE experts over expert (tokens travel by all-to-all), "
        "other weights shared (FSDP over fsdp when fsdp > 1), batch over data x fsdp x expert",
        rules=(("expert", "expert"), ("embed", "fsdp"), ("act_batch", ("data", "fsdp", "expert"))),
        example_mesh="expert=8",
    ),
    Preset(
        "flamingo", "Flamingo: model parallelism of embeddings, attention and FFW over tensor, "
        "ZeRO-1 optimizer state over data, fp32 params, bf16 activations and gradients",
        rules=_TP_PARAMS + (("act_batch", "data"),) + _TP_ACTS,
        opt_rules=_TP_PARAMS + (("embed", "data"),),
        dtype="bfloat16", param_dtype="float32",
        example_mesh="data=2,tensor=4",
    ),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ConfigError suggesting the closest name otherwise."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ConfigError(
            f"unknown parallelism {name!r}{configs.closest_name(str(name), PRESETS)}; "
            f"known: {', '.join(PRESETS)}")
    return PRESETS[name]


def check_mesh(mesh: Mesh, preset: Preset) -> None:
    """ConfigError when a mesh axis with more than one device is one the preset never shards
    over: those devices would all repeat the same work."""
    used = preset.mesh_axes()
    idle = [(a, s) for a, s in mesh.shape.items() if s > 1 and a not in used]
    if idle:
        axis, size = idle[0]
        users = [p.name for p in PRESETS.values() if axis in p.mesh_axes()]
        raise ConfigError(
            f"parallelism={preset.name!r} does not use mesh axis {axis!r} (size {size}): the "
            f"{size} devices along it would repeat the same work. Use a mesh over "
            f"{', '.join(sorted(used))} only (e.g. --mesh {preset.example_mesh}) or a preset "
            f"that shards over {axis!r} ({', '.join(users)})")


def describe_mesh(mesh: Mesh) -> str:
    """'fsdp=4,tensor=2' (axes larger than 1; 'single device' when none)."""
    parts = [f"{a}={s}" for a, s in mesh.shape.items() if s > 1]
    return ",".join(parts) or "1 device"
