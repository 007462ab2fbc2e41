"""Direct preference optimisation (DPO) of an SFT'd LM on preference pairs.

    ExperimentConfig(task="dpo", model=LlamaConfig(...), init_from="workdirs/sft_pydoc",
                     data=DPODataConfig(beta=0.1, loss_type="sigmoid"))

The policy starts from `init_from` (the SFT run's workdir, or any LM workdir / model dir); the
frozen reference is the same source, loaded once by the task, whose sequence log-probs of every
pair (train and held-out) are computed once at start and cached in the batches
(`ref_chosen_logps`, `ref_rejected_logps`), so a step runs the policy only: one forward of the
2B rows [chosen; rejected]. With `peft` (LoRA) the policy is the reference plus LoRA, so the
reference costs no second copy of the weights either.

Rows: each pair renders twice with the chat template (`mmjax.data.chat`; the SFT task's
template, tokenizer and system prompt): prompt + chosen answer and prompt + rejected answer,
right-padded to `data.seq_len`; the completion mask covers the assistant's tokens and the
end-of-turn token closing them, as in SFT. log pi(y|x) is the SUM of the completion's token
log-probs (`mmjax.ops.alignment.sequence_logprobs`); the loss is `mmjax.ops.alignment.dpo_loss`
("sigmoid" with optional label smoothing, "ipo" on length-averaged log-ratios, "hinge"). At
the first step the policy equals the reference and the sigmoid loss is exactly ln 2 (up to the
float rounding of two separately compiled forwards).

Evaluation on the held-out pairs: `val_loss` (mean DPO loss), `preference_accuracy` (fraction of
pairs whose implicit reward beta * (log pi - log pi_ref) ranks chosen above rejected; a tie
counts as wrong, so it is 0 at the start), `reward_margin` (mean chosen - rejected reward),
`chosen_reward` / `rejected_reward`, and the programmatic preference on generated text: greedy
answers to the held-out questions (`sample.num_questions`), `keyword_score` = the fraction that
names the asked-about topic (`mmjax.data.preferences.keyword_score`). The loop records the
start values as `start_*`, so before/after are both in the final metrics.

Errors: no `init_from` (DPO needs the reference), a reference whose vocabulary differs from the
policy's tokenizer, a pair whose chosen and rejected are identical, a pair too long for
`data.seq_len`: ConfigError / DataError naming the problem.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.errors import ConfigError
from mmjax.ops.alignment import DPO_LOSS_TYPES, dpo_loss, sequence_logprobs
from mmjax.tasks.sft import SFTDataConfig, SFTSampleConfig, SFTTask
from mmjax.train.errors import DataError
from mmjax.train.step import make_eval_step, shard_batch

SIDES = ("chosen", "rejected")


def pair_rows(pairs: list[dict], tokenizer: Any, template: Any, seq_len: int,
              system_prompt: str | None = None, *, shift: bool = True) -> dict[str, np.ndarray]:
    """Each preference pair rendered twice with the chat template (prompt + chosen answer,
    prompt + rejected answer; `system_prompt`, unless None, prepended as a system turn, as
    `SFTTask` does with `data.system_prompt`), right-padded with the tokenizer's pad id to
    `seq_len`: {side}_inputs [N, seq_len] int32, {side}_targets int32, {side}_mask bool (the assistant's
    tokens and the end-of-turn token closing them, as in SFT), {side}_input_mask bool (real
    tokens) for side in `SIDES`.

    shift=True (DPO): next-token rows, inputs = tokens[:-1] and targets = tokens[1:] (the
    target mask on the completion). shift=False (a reward model): inputs = the whole rendered
    conversation, ending with the end-of-turn token where the reward is read; targets = the
    inputs, mask = the assistant's positions. DataError when a rendering needs more than
    `seq_len` positions."""
    from mmjax.data import chat

    def render(pair: dict, side: str) -> tuple[np.ndarray, np.ndarray]:
        conv = list(pair["prompt"]) + [{"role": "assistant", "content": pair[side]}]
        if system_prompt is not None:
            conv = [{"role": "system", "content": system_prompt}] + conv
        r = chat.render(conv, tokenizer, template, train=True)
        n = len(r) - 1 if shift else len(r)
        if n > seq_len:
            raise DataError(f"a preference pair's {side} answer needs {n} positions, more than "
                            f"data.seq_len={seq_len}; raise data.seq_len")
        if shift:
            return r.tokens[:-1], r.labels[1:]
        return r.tokens, r.labels

    pad = tokenizer.pad_id
    out: dict[str, np.ndarray] = {}
    for side in SIDES:
        inputs = np.full((len(pairs), seq_len), pad, np.int32)
        targets = np.zeros((len(pairs), seq_len), np.int32)
        mask = np.zeros((len(pairs), seq_len), bool)
        real = np.zeros((len(pairs), seq_len), bool)
        for i, pair in enumerate(pairs):
            x, y = render(pair, side)
            inputs[i, :len(x)] = x
            real[i, :len(x)] = True
            keep = y != chat.IGNORE
            targets[i, :len(y)] = np.where(keep, y, 0)
            mask[i, :len(y)] = keep
        out[f"{side}_inputs"], out[f"{side}_targets"] = inputs, targets
        out[f"{side}_mask"], out[f"{side}_input_mask"] = mask, real
    return out


@dataclasses.dataclass(frozen=True)
class DPODataConfig(SFTDataConfig):
    """Preference pairs, their rendering and the DPO objective's settings."""

    preferences: str = "pydoc_preferences"  # mmjax.data.preferences.DATASETS
    rejected_per_held_out: int = 4
    beta: float = 0.1
    loss_type: str = "sigmoid"  # mmjax.ops.alignment.DPO_LOSS_TYPES
    label_smoothing: float = 0.0
    max_train_pairs: int | None = None  # the first N training pairs only (quick runs, tests)

    def __post_init__(self):
        super().__post_init__()
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ConfigError(f"data.max_train_pairs must be >= 1 or None, got "
                              f"{self.max_train_pairs}")
        if not self.beta > 0:
            raise ConfigError(f"data.beta must be positive, got {self.beta}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"data.loss_type={self.loss_type!r}; one of "
                              f"{', '.join(DPO_LOSS_TYPES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"data.label_smoothing must be in [0, 0.5), got "
                              f"{self.label_smoothing}")


class PairIterator:
    """Endless shuffled batches of pair indices' rows, resumable (`get_state`/`set_state`)."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(next(iter(arrays.values())))
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = []
        while len(idx) < self.batch_size:
            order = self._order()
            take = order[self.pos:self.pos + self.batch_size - len(idx)]
            idx.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        rows = np.asarray(idx)
        if jax.process_count() > 1:
            rows = rows[jax.process_index()::jax.process_count()]
        return {k: v[rows] for k, v in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class DPOTask(SFTTask):
    """DPO of any LM family (`trains = "lm"`) against a frozen reference (module docstring)."""

    data_config_class = DPODataConfig
    sample_config_class = SFTSampleConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        from mmjax.data import preferences

        if cfg.data.preferences not in preferences.DATASETS:
            raise ConfigError(f"data.preferences={cfg.data.preferences!r}; known: "
                              f"{', '.join(preferences.DATASETS)}")
        if not cfg.init_from:
            raise ConfigError("task 'dpo' needs init_from: the SFT'd model is both the policy's "
                              "start and the frozen reference")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data import preferences

        d = cfg.data
        train, held = preferences.load_pair_splits(  # InputError: empty split, bad pair
            d.preferences, seed=d.seed, rejected_per_held_out=d.rejected_per_held_out,
            max_answer_chars=d.max_answer_chars, max_train_pairs=d.max_train_pairs)
        self.train_pairs, self.held_pairs = train, held
        self.loss = self._dpo_loss
        reference = self._reference_params()
        self.train_rows = self._rows(train, reference)
        self.held_rows = self._rows(held, reference)
        self.units_per_step = d.batch_size * 2 * d.seq_len
        self._eval_fns: dict[Any, Callable] = {}
        keywords = {p["prompt"][-1]["content"]: p["keyword"] for p in held}
        self.held_questions = [c for c in self.held_out if c[-2]["content"] in keywords]
        self.keywords = keywords
        log(f"dpo: {len(train)} training / {len(held)} held-out preference pairs "
            f"({d.preferences}); beta {d.beta}, loss {d.loss_type}; reference log-probs cached "
            f"(train mean chosen {self.train_rows['ref_chosen_logps'].mean():.1f}, rejected "
            f"{self.train_rows['ref_rejected_logps'].mean():.1f})")

    # ------------------------------------------------------------------------------- data

    def _reference_params(self) -> Any:
        """The frozen reference: the whole-model init_from source's params, as stored."""
        from mmjax.train.pretrained import init_sources, load_source_params

        whole = [s for s in init_sources(self.cfg.init_from, self.cfg.init_from_prefix)
                 if not s.into and not s.prefix]
        if not whole:
            raise ConfigError("task 'dpo': init_from must name the whole reference model (one "
                              "source without prefix / into)")
        params = load_source_params(whole[0].path)
        emb = params.get("embed", {}).get("embedding") if hasattr(params, "get") else None
        if emb is None or int(np.shape(emb)[0]) != self.model_config.vocab_size:
            got = None if emb is None else int(np.shape(emb)[0])
            raise DataError(f"the reference model {whole[0].path!r} has a vocabulary of {got} "
                            f"rows, the policy's tokenizer {self.model_config.vocab_size}: DPO "
                            "needs both to share one vocabulary (init_from the SFT workdir)")
        return params

    def _rows(self, pairs: list[dict], reference: Any) -> dict[str, np.ndarray]:
        d = self.cfg.data
        out = pair_rows(pairs, self.tokenizer, self.template, d.seq_len, d.system_prompt)
        logps = self._logps_in_batches(reference, out)
        out["ref_chosen_logps"], out["ref_rejected_logps"] = logps
        return out

    def _logps_in_batches(self, params: Any, rows: dict[str, np.ndarray]):
        fn = jax.jit(self._policy_logps)
        b = self.cfg.data.batch_size
        n = len(rows["chosen_inputs"])
        chosen, rejected = [], []
        for s in range(0, n, b):
            idx = np.arange(s, s + b) % n  # one batch shape (one compile); wrapped rows cut
            c, r, _ = fn(params, {k: jnp.asarray(v[idx]) for k, v in rows.items()}, None)
            keep = min(b, n - s)
            chosen.append(np.asarray(c)[:keep])
            rejected.append(np.asarray(r)[:keep])
        return np.concatenate(chosen), np.concatenate(rejected)

    def train_iterator(self):
        return PairIterator(self.train_rows, self.cfg.data.batch_size, self.cfg.data.seed)

    # ---------------------------------------------------------------------------- objective

    def _policy_logps(self, params, batch, rng):
        """(chosen log-probs [B], rejected [B], completion lengths ([B], [B])): one forward of
        the 2B rows [chosen; rejected]."""
        cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])  # noqa: E731
        rngs = {"dropout": rng} if rng is not None else {}
        logits = self.model.apply({"params": params}, cat("inputs"), input_mask=cat("input_mask"),
                                  deterministic=rng is None, rngs=rngs)
        mask = cat("mask")
        logps = sequence_logprobs(logits, cat("targets"), mask)
        lengths = mask.sum(-1).astype(jnp.float32)
        b = batch["chosen_inputs"].shape[0]
        return logps[:b], logps[b:], (lengths[:b], lengths[b:])

    def _dpo_terms(self, params, batch, rng):
        d = self.cfg.data
        pc, pr, (lc, lr) = self._policy_logps(params, batch, rng)
        losses, cr, rr = dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                                  beta=d.beta, loss_type=d.loss_type,
                                  label_smoothing=d.label_smoothing, chosen_lengths=lc,
                                  rejected_lengths=lr)
        return losses, cr, rr, pc, pr

    def _dpo_loss(self, params, batch, rng):
        losses, cr, rr, pc, pr = self._dpo_terms(params, batch, rng)
        aux = {"reward_accuracy": jnp.mean((cr > rr).astype(jnp.float32)),
               "reward_margin": jnp.mean(cr - rr),
               "chosen_logps": jax.lax.stop_gradient(jnp.mean(pc)),
               "rejected_logps": jax.lax.stop_gradient(jnp.mean(pr))}
        return jnp.sum(losses), jnp.asarray(losses.shape[0], jnp.float32), aux

    # --------------------------------------------------------------------------- evaluation

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        key = id(mesh)
        if key not in self._eval_fns:
            self._eval_fns[key] = make_eval_step(
                lambda p, b, r: self._dpo_terms(p, b, None)[:3], mesh=mesh)
        fn = self._eval_fns[key]
        b, rows = self.cfg.data.batch_size, self.held_rows
        n = len(rows["chosen_inputs"])
        losses, cr, rr = [], [], []
        for s in range(0, n, b):
            idx = np.arange(s, s + b) % n  # a fixed batch shape; the wrapped rows are cut below
            l_, c_, r_ = fn(params, shard_batch({k: v[idx] for k, v in rows.items()}, mesh))
            keep = min(b, n - s)
            losses.append(np.asarray(l_)[:keep])
            cr.append(np.asarray(c_)[:keep])
            rr.append(np.asarray(r_)[:keep])
        losses, cr, rr = np.concatenate(losses), np.concatenate(cr), np.concatenate(rr)
        out = {"val_loss": float(losses.mean()),
               "preference_accuracy": float(np.mean(cr > rr)),
               "reward_margin": float(np.mean(cr - rr)),
               "chosen_reward": float(cr.mean()), "rejected_reward": float(rr.mean()),
               "val_pairs": float(n)}
        if self.cfg.sample.num_questions:
            from mmjax.data.preferences import keyword_score

            questions = self.held_questions[: self.cfg.sample.num_questions]
            answers = self.answer(params, questions)
            self._answers = (id(params), answers)
            scores = [keyword_score(a, self.keywords[q]) for q, a, _, _ in answers]
            out["keyword_score"] = float(np.mean(scores)) if scores else math.nan
            out["stopped_fraction"] = float(np.mean([a[3] for a in answers]))
        return out

    def describe(self) -> str:
        d = self.cfg.data
        return (super().describe() + f"; DPO beta {d.beta} ({d.loss_type}), "
                f"{d.batch_size} pairs per step")
