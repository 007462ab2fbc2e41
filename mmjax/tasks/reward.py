"""Reward-model training on preference pairs: the pairwise (Bradley-Terry) loss of trl's
RewardTrainer on a `RewardConfig` model (family "reward": a LLaMA decoder + scalar head).

    ExperimentConfig(task="reward", model=RewardConfig(text=LlamaConfig(...)),
                     init_from=InitSource("workdirs/sft_pydoc", into="language_model"),
                     data=RewardDataConfig(margin=None, center_coefficient=None))

Start: the decoder (`language_model/...`) from `init_from`, an SFT / LM training workdir (or
model dir) given as `InitSource(path, into="language_model")` (on the command line
`--set "init_from=({'path': 'wd', 'into': 'language_model'},)"`); the LM's `lm_head`, if it
has one, is not used. The score head `score/kernel` starts fresh (normal, std
`RewardConfig.head_std`), so `init_from.json` lists it as kept. A source filling the whole
model (`into=""`) must itself be a reward model (continuing one). The tokenizer is the
source's `tokenizer.model`, copied into this run's workdir as SFT does; a source without one,
or whose embedding rows differ from its tokenizer's vocabulary, is a DataError naming it.

Rows: each pair renders twice with the chat template (`mmjax.tasks.dpo.pair_rows`, the
rendering DPO uses, here with `shift=False`): prompt + chosen answer and prompt + rejected
answer, whole (ending with the template's end-of-turn token, where the reward is read: the
model pools at the last real token of `input_mask`), right-padded to `data.seq_len`. A step
runs one forward of the 2B rows [chosen; rejected] and the loss
`mmjax.ops.alignment.reward_loss(r_chosen, r_rejected, margin=data.margin,
center_coefficient=data.center_coefficient)`: mean -log sigmoid(r_c - r_r - margin), plus
center_coefficient * mean((r_c + r_r)^2) (trl's `center_rewards_coefficient`, 0.01 in the
InstructGPT-style setups; None = off). With a zero head every reward is 0 and the loss is
ln 2; with the default random head (std 0.02) it is within a few hundredths of ln 2.

Evaluation on the held-out pairs (every one once): `reward_accuracy` (fraction with r_chosen >
r_rejected; ties count as wrong, as in trl), `val_loss` (the training objective),
`reward_margin` (mean r_chosen - r_rejected), `chosen_reward` / `rejected_reward`,
`val_pairs`. The loop records the start values as `start_*`. Training logs the same
`reward_accuracy` / `reward_margin` per batch.

Errors: no `init_from`, or none filling `language_model`: ConfigError; a source without
tokenizer.model, a vocabulary mismatch, a pair too long for `data.seq_len`: DataError; a pair
whose chosen and rejected are identical (or empty): InputError
(`mmjax.data.preferences.check_pairs`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.checkpoint import WORKDIR_TOKENIZER_FILE as TOKENIZER_FILE
from mmjax.errors import ConfigError
from mmjax.ops.alignment import reward_accuracy, reward_loss
from mmjax.tasks.dpo import SIDES, PairIterator, pair_rows
from mmjax.train.errors import DataError
from mmjax.train.step import make_eval_step, shard_batch
from mmjax.train.task import Task

DECODER = "language_model"  # the reward model's decoder subtree (mmjax.models.reward)


@dataclasses.dataclass(frozen=True)
class RewardDataConfig:
    """Preference pairs, their rendering and the reward loss's options."""

    preferences: str = "pydoc_preferences"  # mmjax.data.preferences.DATASETS
    template: str = "vicuna_v1"  # mmjax.data.chat.TEMPLATES
    system_prompt: str | None = None  # None: the template's default; "": an empty system turn
    seq_len: int = 256
    batch_size: int = 8  # pairs per step (2 x batch_size rows)
    seed: int = 0
    max_answer_chars: int = 240
    rejected_per_held_out: int = 4
    max_train_pairs: int | None = None  # the first N training pairs only (quick runs, tests)
    margin: float | None = None  # subtracted from r_chosen - r_rejected in the loss
    center_coefficient: float | None = None  # trl's center_rewards_coefficient (e.g. 0.01)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "max_answer_chars", "rejected_per_held_out"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ConfigError(f"data.max_train_pairs must be >= 1 or None, got "
                              f"{self.max_train_pairs}")
        if self.margin is not None and not math.isfinite(self.margin):
            raise ConfigError(f"data.margin must be a finite number or None, got {self.margin}")
        c = self.center_coefficient
        if c is not None and not (math.isfinite(c) and c >= 0):
            raise ConfigError(f"data.center_coefficient must be >= 0 or None, got {c}")


def _decoder_source(cfg: Any):
    """The init_from source that fills the decoder: into "language_model", or the whole model."""
    from mmjax.train.experiment import init_sources

    for s in init_sources(cfg.init_from, cfg.init_from_prefix):
        if s.into.strip("/") in ("", DECODER):
            return s
    return None


class RewardTask(Task):
    """Pairwise reward-model training of the "reward" family (module docstring)."""

    unit = "tokens"
    data_config_class = RewardDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        from mmjax.data import chat, preferences

        chat.get_template(cfg.data.template)  # ConfigError listing the known templates
        if cfg.data.preferences not in preferences.DATASETS:
            raise ConfigError(f"data.preferences={cfg.data.preferences!r}; known: "
                              f"{', '.join(preferences.DATASETS)}")
        if cfg.data.seq_len > cfg.model.text.max_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.text.max_len="
                              f"{cfg.model.text.max_len}")
        if not cfg.init_from:
            raise ConfigError("task 'reward' needs init_from: the SFT / LM workdir whose decoder "
                              "and tokenizer the reward model starts from, e.g. "
                              "InitSource('workdirs/sft_pydoc', into='language_model')")
        if _decoder_source(cfg) is None:
            raise ConfigError("task 'reward': no init_from source fills the decoder; give the "
                              "LM as InitSource(path, into='language_model')")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data import chat, preferences

        d = cfg.data
        self.source = _decoder_source(cfg)
        self.template = chat.get_template(d.template)
        self.tokenizer = self._tokenizer()
        self._check_vocabulary()
        self.stop_ids = chat.stop_ids(self.template, self.tokenizer)  # ConfigError if missing
        train, held = preferences.load_pair_splits(  # InputError: empty split, bad pair
            d.preferences, seed=d.seed, rejected_per_held_out=d.rejected_per_held_out,
            max_answer_chars=d.max_answer_chars, max_train_pairs=d.max_train_pairs)
        self.train_pairs, self.held_pairs = train, held
        self.train_rows = self._rows(train)
        self.held_rows = self._rows(held)

        tok = self.tokenizer
        text = cfg.model.text.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                      eos_token_id=self.stop_ids[0], pad_token_id=tok.pad_id)
        self.model_config = cfg.model.replace(text=text)
        self.model = self.build_model(self.model_config)
        self.units_per_step = d.batch_size * 2 * d.seq_len
        self._eval_fns: dict[Any, Callable] = {}
        lengths = self.train_rows["chosen_input_mask"].sum(-1)
        log(f"reward: {len(train)} training / {len(held)} held-out preference pairs "
            f"({d.preferences}), template {self.template.name}; {lengths.mean():.0f} tokens "
            f"per chosen row (longest {lengths.max()}); margin {d.margin}, center coefficient "
            f"{d.center_coefficient}; decoder from {self.source.label()}")

    # ------------------------------------------------------------------------------- data

    def _tokenizer(self):
        """The decoder source's tokenizer, copied into the workdir (as SFT reuses it)."""
        from mmjax.data.tokenizer import Tokenizer

        source = os.path.join(self.source.path, TOKENIZER_FILE)
        if not os.path.isfile(source):
            raise DataError(f"init_from={self.source.path!r} has no {TOKENIZER_FILE}: the reward "
                            "model must reuse the tokenizer its decoder was trained with "
                            "(init_from an SFT / LM training workdir, or copy its "
                            f"{TOKENIZER_FILE} there)")
        target = os.path.join(self.workdir, TOKENIZER_FILE)
        if os.path.isfile(target):
            tok = Tokenizer.load(target)
            if Tokenizer.load(source).serialized_model_proto() != tok.serialized_model_proto():
                raise DataError(f"{target} differs from the tokenizer of init_from ({source}); "
                                "use another --workdir or delete it")
            return tok
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            shutil.copyfile(source, target)
            self.log(f"tokenizer: {source} (the decoder's) -> {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("reward tokenizer")
        return Tokenizer.load(target)

    def _check_vocabulary(self) -> None:
        """DataError when the source's embedding rows differ from the tokenizer's vocabulary."""
        from mmjax.train.pretrained import load_source_params

        src = self.source
        tree = load_source_params(src.path)
        for key in [k for k in src.prefix.split("/") if k]:
            if not hasattr(tree, "keys") or key not in tree:
                raise ConfigError(f"init_from={src.path!r}: no {key!r} of prefix {src.prefix!r} "
                                  "in its params")
            tree = tree[key]
        if not src.into.strip("/"):  # the whole model: a reward model's tree
            if DECODER not in tree:
                raise ConfigError(f"init_from={src.path!r} fills the whole reward model but has no "
                                  f"{DECODER!r} subtree (it has: {', '.join(sorted(tree))}); "
                                  "give an LM as InitSource(path, into='language_model')")
            tree = tree[DECODER]
        emb = tree.get("embed", {}).get("embedding") if hasattr(tree, "get") else None
        got = None if emb is None else int(np.shape(emb)[0])
        if got != self.tokenizer.vocab_size:
            raise DataError(f"init_from={src.path!r}: its decoder has a vocabulary of {got} "
                            f"embedding rows, its tokenizer {self.tokenizer.vocab_size}: the reward "
                            "model needs both to match (init_from the SFT / LM workdir as "
                            "trained)")

    def _rows(self, pairs: list[dict]) -> dict[str, np.ndarray]:
        d = self.cfg.data
        rows = pair_rows(pairs, self.tokenizer, self.template, d.seq_len, d.system_prompt,
                         shift=False)
        return {f"{s}_{k}": rows[f"{s}_{k}"] for s in SIDES for k in ("inputs", "input_mask")}

    def train_iterator(self):
        return PairIterator(self.train_rows, self.cfg.data.batch_size, self.cfg.data.seed)

    def init_params(self, rng: jax.Array) -> Any:
        tokens = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
        return self.model.init(rng, tokens)["params"]

    # ---------------------------------------------------------------------------- objective

    def rewards(self, params, batch, rng=None):
        """(r_chosen [B], r_rejected [B]): one forward of the 2B rows [chosen; rejected]."""
        cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])  # noqa: E731
        rngs = {"dropout": rng} if rng is not None else {}
        out = self.model.apply({"params": params}, cat("inputs"), input_mask=cat("input_mask"),
                               deterministic=rng is None, rngs=rngs)
        b = batch["chosen_inputs"].shape[0]
        return out["rewards"][:b], out["rewards"][b:]

    def _objective(self, rc, rr):
        d = self.cfg.data
        return reward_loss(rc, rr, margin=d.margin, center_coefficient=d.center_coefficient)

    def loss(self, params, batch, rng):
        rc, rr = self.rewards(params, batch, rng)
        n = rc.shape[0]
        sg = jax.lax.stop_gradient
        aux = {"reward_accuracy": reward_accuracy(rc, rr),
               "reward_margin": sg(jnp.mean(rc - rr)),
               "chosen_reward": sg(jnp.mean(rc)), "rejected_reward": sg(jnp.mean(rr))}
        return self._objective(rc, rr) * n, jnp.asarray(n, jnp.float32), aux

    # --------------------------------------------------------------------------- evaluation

    def score_pairs(self, params: Any, rows: dict[str, np.ndarray], mesh: Mesh | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(r_chosen [N], r_rejected [N]) of every pair of `rows`, in fixed-shape batches."""
        key = id(mesh)
        if key not in self._eval_fns:
            self._eval_fns[key] = make_eval_step(lambda p, b, r: self.rewards(p, b), mesh=mesh)
        fn = self._eval_fns[key]
        b = self.cfg.data.batch_size
        n = len(rows["chosen_inputs"])
        cr, rr = [], []
        for s in range(0, n, b):
            idx = np.arange(s, s + b) % n  # a fixed batch shape; the wrapped rows are cut below
            c_, r_ = fn(params, shard_batch({k: v[idx] for k, v in rows.items()}, mesh))
            keep = min(b, n - s)
            cr.append(np.asarray(c_)[:keep])
            rr.append(np.asarray(r_)[:keep])
        return np.concatenate(cr), np.concatenate(rr)

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        cr, rr = self.score_pairs(params, self.held_rows, mesh)
        loss = float(self._objective(jnp.asarray(cr), jnp.asarray(rr)))
        return {"val_loss": loss,
                "reward_accuracy": float(np.mean(cr > rr)),
                "reward_margin": float(np.mean(cr - rr)),
                "chosen_reward": float(cr.mean()), "rejected_reward": float(rr.mean()),
                "val_pairs": float(len(cr))}

    def describe(self) -> str:
        c, d = self.model_config.text, self.cfg.data
        return (f"reward model: LLaMA dim={c.dim}, layers={c.num_layers}, heads={c.num_heads}/"
                f"{c.kv_heads}, vocab={c.vocab_size} + scalar head; {d.batch_size} pairs "
                f"({2 * d.batch_size} rows of {d.seq_len} tokens) per step")


__all__ = ["RewardDataConfig", "RewardTask"]
