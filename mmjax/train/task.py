"""What an experiment trains: the one interface between the training loop and a model family.

The loop (`mmjax.train.loop`) knows nothing of LLMs, images or captions. An experiment config
names a task (`ExperimentConfig.task`, e.g. "lm", "contrastive", "classification"); the task
builds the model from `cfg.model`, the data from `cfg.data`, and supplies the objective and the
evaluation. A new objective or modality is a new Task subclass registered in `TASKS`; the loop,
the checkpointing and the CLI stay as they are.

    task = build_task(cfg, workdir, log)     # may train a tokenizer, load a dataset ...
    params = task.init_params(rng)            # boxed (logical axis names)
    total, count, aux = task.loss(params, batch, rng)   # see mmjax.train.step
    metrics = task.evaluate(params, mesh)     # {"val_loss": ..., "zero_shot_accuracy": ...}
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mmjax import configs
from mmjax.errors import ConfigError

# task name -> "module:Class" (imported lazily so the loop never imports model families)
TASKS: dict[str, str] = {
    "lm": "mmjax.tasks.lm:LanguageModelingTask",
    "classification": "mmjax.tasks.classification:ImageClassificationTask",
    "contrastive": "mmjax.tasks.contrastive:ContrastiveTask",
    "visual_sft": "mmjax.tasks.visual_sft:VisualSFTTask",
    "sft": "mmjax.tasks.sft:SFTTask",
    "dpo": "mmjax.tasks.dpo:DPOTask",
    "ppo": "mmjax.tasks.ppo:PPOTask",
    "reward": "mmjax.tasks.reward:RewardTask",
    "blip": "mmjax.tasks.blip:BlipTask",
    "blip2": "mmjax.tasks.blip2:Blip2Stage1Task",
    "ijepa": "mmjax.tasks.ijepa:IJepaTask",
    "flamingo": "mmjax.tasks.flamingo:FlamingoTask",
    "vq": "mmjax.tasks.vq:VQTask",
    "aim": "mmjax.tasks.aim:AIMTask",
    "lvm": "mmjax.tasks.lvm:LVMTask",
}


class Task:
    """Base class. Subclasses set `model`, `family` and `model_config` in `__init__` and
    implement `init_params`, `loss`, `train_iterator` and `evaluate`.

    A task knows no model class: it builds its model with `self.build_model(config)` through
    the family records (`mmjax.models`), and any family whose record lists the task's name in
    `Family.tasks` can be trained by it.

    Attributes:
      model: the Linen module being trained.
      family: its family name (`mmjax.models.families()`; recorded in the workdir for inference).
      model_config: the final model config (e.g. vocab size taken from the trained tokenizer).
      unit: what the throughput counts ("tokens", "images", "examples").
      units_per_step: how many of them one optimizer step consumes.
    """

    model: nn.Module
    family: str
    model_config: Any
    unit: str = "examples"
    units_per_step: int = 0
    # the Family.tasks entry a model's family must list for this task to train it (None: the
    # task's registered name, e.g. "lm"); a task of one's own that trains LMs sets "lm"
    trains: str | None = None
    # the task's config classes; ExperimentConfig fills data / sample with default instances
    data_config_class: type | None = None
    sample_config_class: type | None = None
    # True when the loss is a sum over the batch's examples (no batch-level terms such as
    # contrastive negatives): the train step may then take it on slices of the batch side by
    # side (`mmjax.train.step.parallel_chains_for`)
    loss_sums_over_examples: bool = False

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Raise ConfigError for configs this task cannot run (types, cross-field limits)."""
        from mmjax.errors import UnsupportedModelError
        from mmjax.models import families, family_of, family_record

        try:
            family = family_of(cfg.model)
        except UnsupportedModelError as e:
            raise ConfigError(f"task {cfg.task!r}: model={type(cfg.model).__name__}(...) is not a "
                              f"model config ({e})") from None
        need = cls.trains or cfg.task
        if need not in family_record(family).tasks:
            able = [f"{n} ({r.config_class.__name__})" for n, r in families().items()
                    if need in r.tasks]
            raise ConfigError(f"task {cfg.task!r} cannot train model family {family!r} "
                              f"({type(cfg.model).__name__}); families it trains: "
                              f"{', '.join(able) or 'none'}")
        for field, expected in (("data", cls.data_config_class),
                                ("sample", cls.sample_config_class)):
            value = getattr(cfg, field)
            if expected is not None and not isinstance(value, expected):
                raise ConfigError(f"task {cfg.task!r} needs {field}={expected.__name__}(...), "
                                  f"got {type(value).__name__}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.workdir = workdir
        self.log = log

    def build_model(self, config: Any) -> nn.Module:
        """The module for `config`, through its family's record; sets `self.family`."""
        from mmjax.models import build_model, family_of

        self.family = family_of(config)
        return build_model(self.family, config)[0]

    # --- required --------------------------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Any:
        """The model's params for `rng`, still boxed with their logical axis names."""
        raise NotImplementedError

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(sum of losses, count, aux metrics); `rng` None = evaluation (no dropout)."""
        raise NotImplementedError

    def train_iterator(self) -> Iterator[dict[str, Any]]:
        """Endless host batches (dicts of numpy arrays, this process's rows) with
        `get_state()` / `set_state(state)` (JSON-able) for exact resume."""
        raise NotImplementedError

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        """Evaluation metrics; `final` marks the end of training (may add costlier metrics).
        A `val_loss` key (lower is better) feeds the default best-checkpoint policy."""
        raise NotImplementedError

    # --- optional --------------------------------------------------------------------------
    def sample(self, params: Any, step: int) -> str | None:
        """Something a person can judge (generated text, predicted captions), or None."""
        return None

    # refresh(params, step) -> None, optional: called by the loop before each step with the
    # current params (PPO generates its rollouts from the policy being trained there)

    def shard_example_batch(self) -> dict[str, Any] | None:
        """One host batch for ahead-of-time compilation (memory analysis); None = skip."""
        return None


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}{configs.closest_name(name, TASKS)}; "
                          f"known: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg: Any, workdir: str, log: Callable[[str], None] = print) -> Task:
    """The task named by `cfg.task`, built for this run (data prepared, model configured)."""
    task = task_class(cfg.task)(cfg, workdir, log)
    for attr in ("model", "family", "model_config"):
        if not hasattr(task, attr):
            raise TypeError(f"task {cfg.task!r} did not set .{attr} in __init__")
    return task

