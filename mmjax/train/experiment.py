"""Experiment configs: a dataclass tree, loaded from a Python file, overridden by `--set k=v`.

An experiment file (e.g. `experiments/llm_text.py`) defines `get_config() -> ExperimentConfig`
and a docstring giving the command, the expected runtime and the expected result.

    cfg = load_experiment("experiments/llm_text.py", ["optimizer.learning_rate=1e-3"])
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any, Sequence

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class InitSource:
    """One pretrained source: the params at `path` (training workdir, mmjax model dir or HF
    dir), their subtree `prefix` ("" = all), copied onto the new model's subtree `into`."""

    path: str
    prefix: str = ""
    into: str = ""

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"init_from: a source needs a path, got {self.path!r}")
        for name in ("prefix", "into"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"init_from: {name} must be a '/'-joined path string, got "
                                  f"{getattr(self, name)!r}")

    def label(self) -> str:
        return (self.path + (f" [{self.prefix}]" if self.prefix else "")
                + (f" -> {self.into}" if self.into else ""))


def init_sources(init_from: Any, prefix: str = "") -> tuple[InitSource, ...]:
    """`ExperimentConfig.init_from` in its accepted forms (None, a path, an InitSource, a dict
    with its fields, or a tuple/list of those; `prefix` = `init_from_prefix` for a bare path) as
    a tuple of InitSource."""
    if init_from is None or init_from == "":
        return ()
    items = init_from if isinstance(init_from, (tuple, list)) else (init_from,)
    out = []
    for item in items:
        if isinstance(item, InitSource):
            out.append(item)
        elif isinstance(item, str):
            out.append(InitSource(item, prefix if len(items) == 1 else ""))
        elif isinstance(item, dict):
            unknown = set(item) - {"path", "prefix", "into"}
            if unknown:
                raise ConfigError(f"init_from: unknown key(s) {sorted(unknown)} in {item!r}; "
                                  "a source has path, prefix, into")
            out.append(InitSource(**item))
        else:
            raise ConfigError(f"init_from: expected a path, an InitSource or a dict, got "
                              f"{type(item).__name__}")
    intos = [s.into for s in out]
    if len(set(intos)) != len(intos):
        raise ConfigError(f"init_from: two sources fill the same subtree: {intos}")
    return tuple(out)


FROZEN_DTYPES = ("bfloat16", "int8")  # ExperimentConfig.frozen_base_dtype (mmjax.train.peft)


def peft_methods() -> dict[str, type]:
    """PEFT method name -> its config class (`ExperimentConfig.peft`)."""
    from mmjax.nn import peft_methods as P
    from mmjax.nn.lora import LoraConfig

    return {"lora": LoraConfig, "prompt_tuning": P.PromptTuningConfig,
            "prefix_tuning": P.PrefixTuningConfig, "llama_adapter": P.LlamaAdapterConfig,
            "adapter_tuning": P.AdapterTuningConfig}


def method_name(peft: Any) -> str:
    """The PEFT method of a method config instance ("lora", "prompt_tuning", ...)."""
    for name, cls in peft_methods().items():
        if isinstance(peft, cls):
            return name
    raise ConfigError(f"peft={type(peft).__name__}(...) is not a PEFT method config; use one of "
                      f"{', '.join(c.__name__ for c in peft_methods().values())} "
                      "(mmjax.nn.lora, mmjax.nn.peft_methods)")


def peft_from_dict(d: dict[str, Any]) -> Any:
    """A PEFT method config from its dict form (`--set "peft={'method': 'lora', 'targets':
    ['attn/query$'], 'r': 8}"`; "method" defaults to "lora"); ConfigError for unknown keys."""
    import dataclasses as dc

    d = dict(d)
    method = d.pop("method", "lora")
    methods = peft_methods()
    if method not in methods:
        raise ConfigError(f"peft method {method!r}{configs.closest_name(str(method), methods)}; "
                          f"known: {', '.join(methods)}")
    cls = methods[method]
    fields = {f.name for f in dc.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"peft: unknown {method} key(s) {unknown}; {cls.__name__} has "
                          f"{', '.join(sorted(fields))}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    try:
        return cls(**d)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"peft={{'method': {method!r}, ...}}: {e}") from None


def validate_peft(peft: Any, frozen_base_dtype: str | None, freeze: Sequence[str]) -> None:
    """ConfigError for an unknown method or frozen dtype, or a frozen dtype with nothing frozen."""
    if peft is not None:
        method_name(peft)
    if frozen_base_dtype is not None:
        if frozen_base_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"frozen_base_dtype={frozen_base_dtype!r}; one of "
                              f"{', '.join(FROZEN_DTYPES)} or None")
        if peft is None and not freeze:
            raise ConfigError(f"frozen_base_dtype={frozen_base_dtype!r} stores the frozen params "
                              "compactly, but nothing is frozen: set peft=LoraConfig(...) or "
                              "optimizer.freeze")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warmup + cosine decay, global-norm clipping, accumulation, masks."""

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1  # cosine decays to learning_rate * end_lr_ratio at the last step
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # None: constant weight_decay. A value: cosine from weight_decay at step 0 to this at the last
    # step (I-JEPA's 0.04 -> 0.4, `mmjax.ops.jepa_losses.cosine_weight_decay`)
    weight_decay_end: float | None = None
    grad_clip: float | None = 1.0  # global-norm clip; None = off
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide by it)
    # Regexes over '/'-joined param paths. Matching params get no weight decay: norm scales,
    # biases (1-D, decay only pulls them to 0 for no reason) and the embedding table (decay on
    # rare-token rows would shrink them just for being rare).
    no_decay: tuple[str, ...] = (r"(^|/)bias$", r"_norm/scale$", r"(^|/)norm/scale$", r"^embed/")
    freeze: tuple[str, ...] = ()  # params matching any regex are frozen (zero update)

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ConfigError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optimizer.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ConfigError(f"optimizer.weight_decay / weight_decay_end must be >= 0, got {self.weight_decay} / "
                              f"{self.weight_decay_end}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs. Intervals are in steps; 0 disables.

    `task` names what is trained (`mmjax.train.task.TASKS`: "lm", ...); `model` is that task's
    model config dataclass, `data` its data config and `sample` its sampling config (None = the
    task's defaults, filled in on construction; the task validates the whole config).
    """

    name: str = "experiment"
    task: str = "lm"
    model: Any = dataclasses.field(default_factory=lambda: LlamaConfig.from_variant("tiny"))
    data: Any = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sample: Any = None
    steps: int = 1000
    # wall-clock seconds the training steps may take: a fresh run times a few steps and, when
    # `steps` would not fit, trains fewer with the schedule re-spanned (mmjax.train.budget)
    time_budget_s: float | None = None
    budget_calibration_steps: int = 20
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the start and the end
    eval_at_start: bool = True
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the latest N ...
    keep_best_metric: str | None = "val_loss"  # ... plus the best one by this metric
    keep_best_mode: str = "min"  # "min" (a loss) or "max" (an accuracy)
    max_eval_batches: int | None = None  # None: the whole validation split
    # fine-tuning: a fresh run copies params from a workdir / mmjax model dir / HF dir
    # (mmjax.train.pretrained); the prefix picks a subtree of the source ("vision"). Several
    # sources (a tuple of InitSource(path, prefix, into) or dicts with
    # those keys) fill different subtrees of one model (LLaVA: image tower + LLM)
    init_from: Any = None
    init_from_prefix: str = ""
    # how `--mesh` is used: a preset of mmjax.parallel.presets (data, zero1, fsdp, fsdp_tp,
    # tp_sp, expert, flamingo); without --mesh training runs on one device
    parallelism: str = "fsdp_tp"
    # parameter-efficient fine-tuning (mmjax.train.peft): a method config (mmjax.nn.lora.
    # LoraConfig) trains only its own params, the rest frozen; frozen_base_dtype stores the
    # frozen params as "bfloat16" or "int8" (QLoRA-style), None = float32
    peft: Any = None
    frozen_base_dtype: str | None = None

    def __post_init__(self):
        from mmjax.parallel.presets import get_preset
        if isinstance(self.peft, dict):
            object.__setattr__(self, "peft", peft_from_dict(self.peft))
        validate_peft(self.peft, self.frozen_base_dtype, self.optimizer.freeze)

        get_preset(self.parallelism)  # ConfigError naming the closest preset
        sources = init_sources(self.init_from, self.init_from_prefix)  # ConfigError if malformed
        if len(sources) > 1 or (sources and sources[0].into):
            object.__setattr__(self, "init_from", sources)
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"time_budget_s must be positive (or None), got {self.time_budget_s}")
        if self.budget_calibration_steps < 1:
            raise ConfigError(
                f"budget_calibration_steps must be >= 1, got {self.budget_calibration_steps}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.keep_best_mode not in ("min", "max"):
            raise ConfigError(f"keep_best_mode must be 'min' or 'max', got {self.keep_best_mode!r}")
        # the task's default data / sample configs, then its own validation
        from mmjax.train.task import task_class

        task = task_class(self.task)
        if self.data is None and task.data_config_class is not None:
            object.__setattr__(self, "data", task.data_config_class())
        if self.sample is None and task.sample_config_class is not None:
            object.__setattr__(self, "sample", task.sample_config_class())
        task.validate_config(self)
        batch = getattr(self.data, "batch_size", None)
        if batch is not None and batch % self.optimizer.grad_accum_steps:
            raise ConfigError(
                f"data.batch_size={batch} is not divisible by "
                f"optimizer.grad_accum_steps={self.optimizer.grad_accum_steps}"
            )

    def replace(self, **kw) -> "ExperimentConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return configs.to_dict(self)


def load_module(path: str):
    """Import the experiment file `path` as a module (InputError when it is missing)."""
    if not os.path.isfile(path):
        raise InputError(f"experiment config {path!r} does not exist")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"mmjax_experiment_{name}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"experiment config {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(path: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Import `path`, call its `get_config()`, apply `--set key=value` overrides."""
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment config {path!r} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(
            f"{path}: get_config() must return an ExperimentConfig, got {type(cfg).__name__}"
        )
    return apply_overrides(cfg, overrides)


def parse_override(item: str) -> tuple[str, Any]:
    """'optimizer.learning_rate=1e-3' -> ('optimizer.learning_rate', 0.001).

    Values are Python literals (numbers, strings, None, tuples, lists, dicts, booleans); a value
    that is not a literal is taken as a plain string (`data.corpus=shakespeare`).
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key, value


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply `dotted.key=value` overrides to a (frozen) dataclass tree.

    All overrides of one config node are applied together (one `dataclasses.replace`), so a
    config is validated in its final state: `model.num_heads=6` with `model.num_kv_heads=3`
    works in either order. A later override of the same key wins.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_override(item)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            sub = node.get(part)
            if not isinstance(sub, _Group):
                sub = node[part] = _Group()
            node = sub
        node[parts[-1]] = (value, key)
    return _apply_group(cfg, tree, prefix="")


class _Group(dict):
    """Overrides below one dotted prefix: {field: (value, full_key) | _Group}."""


def _apply_group(obj: Any, group: dict[str, Any], prefix: str) -> Any:
    fields = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for head, item in group.items():
        full = prefix + head
        if head not in fields:
            choices = [prefix + f for f in fields]
            shown = full if not isinstance(item, _Group) else full + ".…"
            raise ConfigError(
                f"--set {shown}: unknown config key{configs.closest_name(full, choices)}; "
                f"{type(obj).__name__} has: {', '.join(sorted(fields))}"
            )
        current = getattr(obj, head)
        if isinstance(item, _Group):
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"--set {full}.…: {head!r} is a value, not a group of settings")
            changes[head] = _apply_group(current, item, full + ".")
        else:
            value, key = item
            changes[head] = _coerce(value, current, hints.get(head), key)
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError as e:
        raise ConfigError(f"--set {_describe(group, prefix)}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--set {_describe(group, prefix)}: {e}") from None


def _describe(group: dict[str, Any], prefix: str) -> str:
    """'model.num_heads=6, model.num_kv_heads=3' for an error message."""
    items = []
    for head, item in group.items():
        if isinstance(item, _Group):
            items.append(_describe(item, prefix + head + "."))
        else:
            items.append(f"{item[1]}={item[0]!r}")
    return ", ".join(items)


def _coerce(value: Any, current: Any, hint: Any, key: str) -> Any:
    """Make `value` fit the field: ints for floats, tuples for lists, dicts for dataclasses."""
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        return configs.from_dict(type(current), value)
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"--set {key}: expected True or False, got {value!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float)
            and (hint is None or float not in _hint_types(hint))):  # float fields take floats
        if value != int(value):
            raise ConfigError(f"--set {key}: expected an integer, got {value!r}")
        return int(value)
    if value is not None and hint is not None:
        allowed = _hint_types(hint)
        ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if allowed and not ok:
            raise ConfigError(
                f"--set {key}: expected {' or '.join(a.__name__ for a in allowed)}, "
                f"got {type(value).__name__} {value!r}"
            )
    return value


def _hint_types(hint: Any) -> tuple[type, ...]:
    """The classes a field's type hint admits (`float | None` -> (float, NoneType))."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if any(m is Any for m in members):  # the field checks its own values
        return ()
    return tuple(t for t in ((typing.get_origin(m) or m) for m in members) if isinstance(t, type))
