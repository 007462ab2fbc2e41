"""Parameter-efficient fine-tuning through the training stack: any task, any family.

    ExperimentConfig(task="sft", model=..., init_from="workdirs/llm_text",
                     peft=LoraConfig(targets=(r"attn/(query|key|value|out)$",
                                              r"mlp/(gate|up|down)$"), r=8, alpha=16),
                     frozen_base_dtype="bfloat16")          # or "int8" (QLoRA-style), None

With `peft` set the run trains only the method's params: the task's model gets them at init
(LoRA: `lora_a` / `lora_b` beside every target kernel, with logical axis names, so meshes lay
them out like their kernels), every other param is frozen through the optimizer's freezing
(`optax.multi_transform` + `set_to_zero`: no Adam moments for the base), and the train step
differentiates the trainable leaves only (`make_train_step(trainable=...)`: no gradient buffers
for the base at all). The task's loss, evaluation and samples run with the method active
(`mmjax.nn.lora.lora`); the task itself is unchanged.

`frozen_base_dtype` stores the frozen params compactly in the train state and checkpoints:
"bfloat16" (every frozen param of 2+ dims; 1-D norm scales and biases stay float32), or "int8"
(frozen `DenseGeneral` kernels as int8 with a per-output-channel scale, `mmjax.nn.quant`; the
other frozen 2+-D params, e.g. embeddings, in bfloat16). The trainable params stay float32.
It applies to any frozen param, so `optimizer.freeze` without `peft` (LLaVA's frozen tower)
can use it too.

A pretrained source (`init_from`) is read in float32 and cast / quantized into that layout. The
workdir records the method in `peft.json`; `mmjax.checkpoint.load_workdir` (inference,
`mmjax generate`, `init_from` of a later run) folds it back into a plain float32 model:
int8 kernels dequantized, LoRA merged into its kernels (`kernel += alpha/r * A.B`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import threading
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.checkpoint import PEFT_FILE, fold_peft  # noqa: F401 (re-exported)
from mmjax.train.experiment import FROZEN_DTYPES, method_name  # noqa: F401 (re-exported)
from mmjax.train.experiment import validate_peft as validate
from mmjax.nn import lora as L
from mmjax.nn import quant
from mmjax.train.optimizer import path_str

TRAINABLE = {"lora": (r"(^|/)lora_[ab]$",)}


_ACTIVE = threading.local()


@contextlib.contextmanager
def _active(cfg: Any, deterministic: bool):
    """The method's context (`lora(cfg)`, `peft_method(cfg)`) unless an enclosing call already
    made it active (an evaluation's loss inside the evaluation): nested interceptors would
    apply the method twice."""
    if getattr(_ACTIVE, "on", False):
        yield
        return
    _ACTIVE.on = True
    try:
        if isinstance(cfg, L.LoraConfig):
            ctx = L.lora(cfg, deterministic=deterministic)
        else:
            from mmjax.nn.peft_methods import peft_method

            ctx = peft_method(cfg)
        with ctx:
            yield
    finally:
        _ACTIVE.on = False


class PeftRun:
    """The PEFT / frozen-dtype setup of one training run (see the module docstring).

    `wrap(task)` swaps the task's init_params / loss / evaluate / sample for versions with the
    method active; `trainable` (regexes) tells the optimizer and the step what trains."""

    def __init__(self, peft: Any, frozen_base_dtype: str | None, freeze: Sequence[str] = ()):
        validate(peft, frozen_base_dtype, freeze)
        self.peft = peft
        self.method = method_name(peft) if peft is not None else None
        self.frozen_base_dtype = frozen_base_dtype
        self.freeze = tuple(freeze)
        self.trainable: tuple[str, ...] | None = (
            None if self.method is None else TRAINABLE[self.method] if self.method in TRAINABLE
            else (peft.trainable,))

    # --- which params are frozen ---------------------------------------------------------
    def is_frozen(self, path: str) -> bool:
        if any(re.search(p, path) for p in self.freeze):
            return True
        if self.trainable is None:
            return False
        return not any(re.search(p, path) for p in self.trainable)

    # --- the wrapped task ----------------------------------------------------------------
    def context(self, deterministic: bool = True):
        if self.method is not None:
            return _active(self.peft, deterministic)
        return contextlib.nullcontext()

    def wrap(self, task) -> None:
        base_init = task.init_params
        layout: dict[str, tuple[int, int]] | None = None
        if self.frozen_base_dtype == "int8":
            from mmjax.models import family_record

            example = family_record(task.family).example_inputs(task.model_config)
            with self.context():
                layout = quant.dense_layout(task.model, *example)

        def init_params(rng):
            if self.method in (None, "lora"):  # LoRA creates its leaves during init
                with self.context():
                    boxed = base_init(rng)
            else:  # the other methods: their init_* function on the base params
                boxed = self._with_method_params(task, base_init, rng)
            return self.store_frozen(boxed, layout)

        if self.method == "lora":  # every target pattern must select some DenseGeneral
            with L.lora(self.peft) as trace:
                jax.eval_shape(base_init, jax.random.PRNGKey(0))
            L.check_targets(self.peft, trace.paths)
        task.init_params = init_params
        for name in ("loss", "state_loss"):
            fn = getattr(task, name, None)
            if fn is not None:
                setattr(task, name, self._in_context(fn, train_arg=-1))
        for name in ("evaluate", "sample", "refresh"):
            if getattr(task, name, None) is not None:
                setattr(task, name, self._in_context(getattr(task, name)))

    def _with_method_params(self, task, base_init, rng):
        """The base's boxed init tree plus the method's new leaves (`init_peft_method`)."""
        from mmjax.models import family_record
        from mmjax.nn.peft_methods import init_peft_method

        base_rng, method_rng = jax.random.split(rng)
        boxed = base_init(base_rng)
        plain = nn.meta.unbox(boxed)
        example = family_record(task.family).example_inputs(task.model_config)
        full = init_peft_method(task.model, plain, self.peft, method_rng, *example)

        def add(node, base):
            out = dict(base)
            for k, v in node.items():
                if k not in base:
                    out[k] = v
                elif isinstance(v, dict) and isinstance(base[k], dict):
                    out[k] = add(v, base[k])
            return out

        return add(full, boxed)

    def _in_context(self, fn: Callable, train_arg: int | None = None) -> Callable:
        """`fn` with the method active; with `train_arg` the argument at that index is the
        rng (None = evaluation: LoRA dropout off)."""

        @functools.wraps(fn)
        def run(*args, **kwargs):
            deterministic = True
            if train_arg is not None and args:
                deterministic = args[train_arg] is None
            with self.context(deterministic):
                return fn(*args, **kwargs)

        return run

    # --- frozen storage --------------------------------------------------------------------
    def store_frozen(self, boxed: Any, layout: dict[str, tuple[int, int]] | None) -> Any:
        """The boxed init tree with frozen params in `frozen_base_dtype` (module docstring)."""
        if self.frozen_base_dtype is None:
            return boxed
        if layout is not None:  # int8 DenseGeneral kernels (+ kernel_scale)
            boxed = quant.quantize_kernels(
                boxed, layout, select=lambda module: self.is_frozen(module + "/kernel"))

        def cast(path, leaf):
            value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
            if (value.dtype == jnp.float32 and value.ndim >= 2
                    and self.is_frozen(path_str(path))):
                value = value.astype(jnp.bfloat16)
                return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
            return leaf

        return jax.tree_util.tree_map_with_path(
            cast, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

    def trainable_mask(self, params: Any) -> Any | None:
        """Bool tree, True where the param trains; None when everything trains."""
        if self.trainable is None and not self.freeze:
            return None
        params = nn.meta.unbox(params)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not self.is_frozen(path_str(path)), params)

    # --- the workdir record ----------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "frozen_base_dtype": self.frozen_base_dtype}
        if self.method is not None:
            out[self.method] = dataclasses.asdict(self.peft)
        return out

    def write(self, workdir: str) -> None:
        with open(os.path.join(workdir, PEFT_FILE), "w") as f:
            json.dump(self.record(), f, indent=1, default=str)

    def describe(self, params: Any) -> str:
        mask = self.trainable_mask(params)
        sizes = [(int(x.size), x.dtype) for x in jax.tree_util.tree_leaves(params)]
        total = sum(n for n, _ in sizes)
        train = sum(int(x.size) for x, m in zip(jax.tree_util.tree_leaves(params),
                                                 jax.tree_util.tree_leaves(mask)) if m)
        nbytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
        what = self.method or "frozen params"
        if self.method not in (None, "lora"):
            what = f"{type(self.peft).__name__}"
        if self.method == "lora":
            what = f"LoRA r={self.peft.r} alpha={self.peft.alpha} (scale {self.peft.scale:g})"
        return (f"{what}: {train / 1e6:.3f}M of {total / 1e6:.2f}M params train "
                f"({100.0 * train / max(total, 1):.2f}%); frozen base stored as "
                f"{self.frozen_base_dtype or 'float32'}, params {nbytes / 2**20:.1f} MiB")


def run_for(cfg: Any) -> PeftRun | None:
    """The run's PeftRun (None without `peft` and `frozen_base_dtype`)."""
    if cfg.peft is None and cfg.frozen_base_dtype is None:
        return None
    return PeftRun(cfg.peft, cfg.frozen_base_dtype, cfg.optimizer.freeze)
