"""PPO for language models with four models: the policy (actor) and the critic train, the
frozen reference and the reward model score.

    ExperimentConfig(task="ppo",
                     model=ActorCriticConfig(policy=sft.model, critic=RewardConfig(text=sft.model)),
                     init_from=(InitSource("workdirs/sft_pydoc", into="policy"),
                                InitSource("workdirs/reward_pydoc", into="critic")),
                     data=PPODataConfig(reward_model="workdirs/reward_pydoc"))

Models (`mmjax.models.actor_critic`): the trained tree is {"policy": a LLaMA LM, "critic": a
value model (`RewardModel`: per-token values from a scalar head)}. The reference is the policy's
`init_from` source (the SFT model), loaded frozen by the task; the reward model is a trained
`reward`-family workdir (`data.reward_model`, task "reward"), or, with `data.reward="keyword"`,
the programmatic preference of `mmjax.data.preferences` (1 when the answer names the question's
topic, else 0). trl initialises the critic from the reward model; so does the experiment
(`init_from` into "critic").

One rollout (`refresh`, called by the training loop before each step; it generates when the
previous rollout's minibatches are used up): `data.rollout_batch` training questions, rendered
with the chat template up to the assistant header, answered by sampling from the policy with
mmjax's jit decoding loop (`mmjax.generate.generate`, temperature `data.temperature`, stopped at
the end-of-turn token). Then, in one jitted pass: the policy's and the reference's token
log-probs of the response, the critic's values, the reward model's score of prompt + response
(at its last real token); per-token rewards -kl_coef * (log pi - log pi_ref) with the score
added on the LAST RESPONSE TOKEN (trl's legacy PPO placement; trl's last PPOTrainer adds it on
the token after EOS, trl#3750: `mmjax.ops.alignment.kl_penalized_rewards(score_position=)`), GAE
(gamma, lambda) over the response, advantages whitened over the response tokens. The rollout is
cut into `rollout_batch / batch_size` minibatches, `ppo_epochs` times in a fresh order: each
optimizer step is one minibatch update with the clipped policy loss plus `vf_coef` times the
clipped value loss (`ppo_policy_loss`, `ppo_value_loss`). A response that never reached the
end-of-turn token is scored as it is (trl's `missing_eos_penalty` is not implemented).

Training logs per step: policy_loss, value_loss, clipfrac, approx_kl, and the current rollout's
rollout_reward (mean score), rollout_kl (mean summed log-ratio to the reference) and
rollout_length. Evaluation on the held-out questions (`sample.num_questions` of them, topics the
LM and SFT never saw): greedy answers' `mean_reward` (reward-model score) and `keyword_score`,
and `kl_to_reference`: the mean over answers sampled at the training temperature (fixed seed) of
sum_t (log pi - log pi_ref), trl's `objective/kl` estimate. The loop keeps the start values as
`start_*`.

Resume: the iterator state records the rollout count; a resumed run starts a fresh rollout from
the restored policy (the remaining minibatches of an interrupted rollout are not replayed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.errors import ConfigError
from mmjax.ops.alignment import (gae_advantages, kl_penalized_rewards, ppo_policy_loss,
                                 ppo_value_loss, token_logprobs, whiten)
from mmjax.tasks.sft import SFTSampleConfig
from mmjax.train.errors import DataError
from mmjax.train.task import Task

REWARDS = ("model", "keyword")


@dataclasses.dataclass(frozen=True)
class PPODataConfig:
    """Prompts, rollouts and the PPO objective (trl's defaults where it has them)."""

    dataset: str = "pydoc_instructions"  # mmjax.data.instructions.DATASETS: the questions
    template: str = "vicuna_v1"
    system_prompt: str | None = None
    max_answer_chars: int = 240
    reward: str = "model"  # "model" (data.reward_model) or "keyword" (programmatic)
    reward_model: str | None = None  # a trained reward-family workdir (task "reward")
    seq_len: int = 256  # prompt + response positions per row
    rollout_batch: int = 16  # questions per rollout
    batch_size: int = 8  # rows per optimizer step (a minibatch of the rollout)
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ConfigError(f"data.reward={self.reward!r}; one of {', '.join(REWARDS)}")
        if self.reward == "model" and not self.reward_model:
            raise ConfigError("data.reward='model' needs data.reward_model (a workdir of task "
                              "'reward'), or set data.reward='keyword'")
        for name in ("seq_len", "rollout_batch", "batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.rollout_batch % self.batch_size:
            raise ConfigError(f"data.rollout_batch={self.rollout_batch} must be a multiple of "
                              f"data.batch_size={self.batch_size}")
        if not self.temperature > 0:
            raise ConfigError(f"data.temperature must be positive (PPO samples), got "
                              f"{self.temperature}")
        for name in ("kl_coef", "clip", "value_clip", "vf_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("data.gamma and data.lam must be in [0, 1]")


class RolloutIterator:
    """The minibatches of the latest rollout; the task's `refresh` refills it."""

    def __init__(self):
        self.queue: list[dict[str, np.ndarray]] = []
        self.rollouts = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.queue:
            raise RuntimeError("PPO: no rollout to train on; the loop calls task.refresh(params, "
                               "step) before each step")
        batch = self.queue.pop(0)
        if jax.process_count() > 1:
            batch = {k: v[jax.process_index()::jax.process_count()] for k, v in batch.items()}
        return batch

    def get_state(self) -> dict[str, int]:
        return {"rollouts": self.rollouts}

    def set_state(self, state: dict[str, int]) -> None:
        self.rollouts, self.queue = int(state["rollouts"]), []


class PPOTask(Task):
    """PPO of an SFT'd LM against a reward model (module docstring)."""

    unit = "tokens"
    data_config_class = PPODataConfig
    sample_config_class = SFTSampleConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        from mmjax.data import chat, instructions

        chat.get_template(cfg.data.template)
        if cfg.data.dataset not in instructions.DATASETS:
            raise ConfigError(f"data.dataset={cfg.data.dataset!r}; known: "
                              f"{', '.join(instructions.DATASETS)}")
        if cfg.data.seq_len > cfg.model.policy.max_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.policy.max_len="
                              f"{cfg.model.policy.max_len}")
        if cls._policy_source(cfg) is None:
            raise ConfigError("task 'ppo' needs init_from with a source into 'policy' (the SFT "
                              "model: also the frozen reference), e.g. "
                              "InitSource('workdirs/sft_pydoc', into='policy')")

    @staticmethod
    def _policy_source(cfg: Any):
        from mmjax.train.pretrained import init_sources

        for s in init_sources(cfg.init_from, cfg.init_from_prefix):
            if s.into == "policy" and not s.prefix:
                return s
        return None

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data import chat, instructions
        from mmjax.data.preferences import question_keyword
        from mmjax.models.llama import Llama
        from mmjax.models.reward import RewardModel
        from mmjax.ops.attention import decoding_implementation
        from mmjax.tasks.text_data import workdir_tokenizer
        from mmjax.train.pretrained import load_source_params

        d = cfg.data
        source = self._policy_source(cfg)
        self.tokenizer, _ = workdir_tokenizer(workdir, source.path, log)
        if self.tokenizer is None:
            raise DataError(f"init_from {source.path!r} has no tokenizer.model: PPO reuses the "
                            "SFT model's tokenizer")
        self.template = chat.get_template(d.template)
        self.stop_ids = chat.stop_ids(self.template, self.tokenizer)
        tok = self.tokenizer
        ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                   eos_token_id=self.stop_ids[0], pad_token_id=tok.pad_id)
        policy_cfg = cfg.model.policy.replace(**ids)
        critic_cfg = cfg.model.critic.replace(text=cfg.model.critic.text.replace(**ids))
        self.model_config = cfg.model.replace(policy=policy_cfg, critic=critic_cfg)
        self.model = self.build_model(self.model_config)
        impl = decoding_implementation(policy_cfg.implementation)
        self.policy = Llama(policy_cfg.replace(implementation=impl))
        self.critic = RewardModel(critic_cfg)
        # the frozen reference: the policy's source as stored
        self.reference = load_source_params(source.path)
        self._check_vocab(self.reference, "embed", f"the reference {source.path!r}")
        self.reward_module = self.reward_params = None
        if d.reward == "model":
            from mmjax import checkpoint

            module, _, params = checkpoint.load_workdir(d.reward_model)
            if not isinstance(module, RewardModel):
                raise ConfigError(f"data.reward_model={d.reward_model!r} holds a "
                                  f"{type(module).__name__}, not a reward model (family 'reward')")
            self._check_vocab(params.get("language_model", {}), "embed",
                              f"the reward model {d.reward_model!r}")
            self.reward_module, self.reward_params = module, params
        train, held = instructions.load_instructions(d.dataset,
                                                     max_answer_chars=d.max_answer_chars)
        self.train_questions = self._questions(train)
        self.held_questions = self._questions(held)
        if not self.train_questions or not self.held_questions:
            raise DataError("PPO needs training and held-out questions")
        self.keyword = {q: question_keyword(q) for q, _ in self.train_questions + self.held_questions}
        seq = d.seq_len
        self.init_params = lambda rng: self.model.init(rng, jnp.zeros((1, seq), jnp.int32))["params"]
        self.loss = self._ppo_loss
        self.units_per_step = d.batch_size * seq
        self.iterator = RolloutIterator()
        self._rollout_fn = jax.jit(self._score_rollout)
        self._answers: tuple[int, list] | None = None
        log(f"ppo: {len(self.train_questions)} training / {len(self.held_questions)} held-out "
            f"questions; reward {d.reward}{' ' + d.reward_model if d.reward == 'model' else ''}; "
            f"rollouts of {d.rollout_batch} x {d.ppo_epochs} epochs in minibatches of "
            f"{d.batch_size}; kl_coef {d.kl_coef}, clip {d.clip}, vf_coef {d.vf_coef}")

    def _check_vocab(self, params: Any, key: str, what: str) -> None:
        emb = params.get(key, {}).get("embedding") if hasattr(params, "get") else None
        rows = None if emb is None else int(np.shape(emb)[0])
        if rows != self.tokenizer.vocab_size:
            raise DataError(f"{what} has a vocabulary of {rows} rows, the policy's tokenizer "
                            f"{self.tokenizer.vocab_size}: PPO's models must share one vocabulary")

    def _questions(self, conversations) -> list[tuple[str, list[int]]]:
        """(question, prompt ids up to the assistant header), one per distinct question."""
        from mmjax.data import chat

        out, seen = [], set()
        for conv in conversations:
            q = conv[0]["content"]
            if q in seen:
                continue
            seen.add(q)
            turns = ([{"role": "system", "content": self.cfg.data.system_prompt}]
                     if self.cfg.data.system_prompt is not None else []) + conv[:-1]
            r = chat.render(turns, self.tokenizer, self.template, train=False,
                            add_generation_prompt=True)
            ids = [int(t) for t in r.tokens]
            if len(ids) + self.cfg.data.max_new_tokens > self.cfg.data.seq_len:
                raise DataError(f"the question {q[:50]!r} needs {len(ids)} prompt tokens + "
                                f"{self.cfg.data.max_new_tokens} new ones, more than data.seq_len="
                                f"{self.cfg.data.seq_len}")
            out.append((q, ids))
        return out

    def describe(self) -> str:
        p = self.model_config.policy
        return (f"PPO: policy LLaMA dim={p.dim}, layers={p.num_layers}, vocab={p.vocab_size}; "
                f"critic dim={self.model_config.critic.text.dim}; minibatch "
                f"{self.cfg.data.batch_size} x {self.cfg.data.seq_len} tokens")

    # ---------------------------------------------------------------------------- rollouts

    def train_iterator(self):
        return self.iterator

    def refresh(self, params: Any, step: int) -> None:
        """Before each step: a new rollout when the last one's minibatches are used up."""
        if self.iterator.queue:
            return
        d = self.cfg.data
        k = self.iterator.rollouts
        rng = np.random.default_rng([d.seed, k])
        pick = rng.choice(len(self.train_questions), size=d.rollout_batch,
                          replace=len(self.train_questions) < d.rollout_batch)
        questions = [self.train_questions[int(i)] for i in pick]
        rows, stats = self._rollout(params, questions, jax.random.key(d.seed * 100003 + k),
                                    d.temperature)
        self.iterator.rollouts += 1
        n = d.rollout_batch
        for e in range(d.ppo_epochs):
            order = np.random.default_rng([d.seed, k, e]).permutation(n)
            for s in range(0, n, d.batch_size):
                idx = order[s:s + d.batch_size]
                batch = {key: v[idx] for key, v in rows.items()}
                for name, value in stats.items():  # logged through the loss's aux
                    batch[f"rollout_{name}"] = np.full((len(idx),), value, np.float32)
                self.iterator.queue.append(batch)

    def _generate(self, params: Any, prompts: list[list[int]], rng, temperature: float):
        from mmjax.generate import GenerationConfig, generate

        longest = max(len(p) for p in prompts)
        gen = GenerationConfig(max_new_tokens=self.cfg.data.max_new_tokens,
                               temperature=temperature, eos_token_id=self.stop_ids,
                               pad_token_id=self.tokenizer.pad_id,
                               prompt_bucket=-(-longest // 16) * 16)
        out = generate(self.policy, params["policy"], prompts, gen, rng=rng)
        return [[int(t) for t in row[:int(n)]] for row, n in zip(np.asarray(out.tokens),
                                                                  np.asarray(out.lengths))]

    def _rows(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, np.ndarray]:
        seq, pad = self.cfg.data.seq_len, self.tokenizer.pad_id
        b = len(prompts)
        tokens = np.full((b, seq), pad, np.int32)
        real = np.zeros((b, seq), bool)
        mask = np.zeros((b, seq - 1), bool)  # over targets = tokens[:, 1:]
        for i, (p, r) in enumerate(zip(prompts, responses)):
            full = (p + r)[:seq]
            tokens[i, :len(full)] = full
            real[i, :len(full)] = True
            mask[i, len(p) - 1:len(full) - 1] = True  # targets that are response tokens
        return {"tokens": tokens, "real": real, "mask": mask}

    def _rollout(self, params: Any, questions, rng, temperature: float):
        prompts = [ids for _, ids in questions]
        responses = self._generate(params, prompts, rng, temperature)
        rows = self._rows(prompts, responses)
        texts, stopped = self._decode(responses)
        if self.cfg.data.reward == "keyword":
            from mmjax.data.preferences import keyword_score

            scores = np.asarray([float(keyword_score(t, self.keyword[q] or q))
                                 for t, (q, _) in zip(texts, questions)], np.float32)
        else:
            scores = None
        out = self._rollout_fn(params, self.reference, self.reward_params,
                               {k: jnp.asarray(v) for k, v in rows.items()},
                               None if scores is None else jnp.asarray(scores))
        rows.update({k: np.asarray(v) for k, v in out.items() if k not in ("score", "kl")})
        from mmjax.data.preferences import keyword_score

        stats = {"reward": float(np.mean(out["score"])), "kl": float(np.mean(out["kl"])),
                 "length": float(np.mean([len(r) for r in responses])),
                 "keyword_score": float(np.mean([keyword_score(t, self.keyword[q] or q)
                                                 for t, (q, _) in zip(texts, questions)])),
                 "stopped": float(np.mean(stopped))}
        return rows, stats

    def _decode(self, responses):
        stops = set(self.stop_ids)
        texts, stopped = [], []
        for r in responses:
            end = bool(r) and r[-1] in stops
            texts.append(self.tokenizer.decode(r[:-1] if end else r))
            stopped.append(end)
        return texts, stopped

    def _logprobs(self, module, params, rows, rng=None):
        tokens, real = rows["tokens"], rows["real"]
        rngs = {"dropout": rng} if rng is not None else {}
        logits = module.apply({"params": params}, tokens[:, :-1], input_mask=real[:, :-1],
                              deterministic=rng is None, rngs=rngs)
        return token_logprobs(logits, tokens[:, 1:])

    def _values(self, params, rows, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        return self.critic.apply({"params": params}, rows["tokens"][:, :-1],
                                 input_mask=rows["real"][:, :-1], deterministic=rng is None,
                                 rngs=rngs)["values"]

    def _score_rollout(self, params, reference, reward_params, rows, scores):
        """Old log-probs, reference log-probs, values, scores, rewards, advantages, returns."""
        d = self.cfg.data
        mask = rows["mask"]
        logprobs = self._logprobs(self.policy, params["policy"], rows)
        ref = self._logprobs(self.policy, reference, rows)
        values = self._values(params["critic"], rows)
        if scores is None:
            scores = self.reward_module.apply({"params": reward_params}, rows["tokens"],
                                              input_mask=rows["real"])["rewards"]
        rewards = kl_penalized_rewards(scores, logprobs, ref, mask, d.kl_coef,
                                       score_position="last")
        adv, returns = gae_advantages(rewards, values, mask, d.gamma, d.lam)
        adv = whiten(adv, mask)
        kl = jnp.sum(jnp.where(mask, logprobs - ref, 0.0), axis=-1)
        return {"old_logprobs": logprobs, "old_values": values, "advantages": adv,
                "returns": returns, "score": scores, "kl": kl}

    # ---------------------------------------------------------------------------- objective

    def _ppo_loss(self, params, batch, rng):
        d = self.cfg.data
        mask = batch["mask"]
        r1, r2 = (jax.random.split(rng) if rng is not None else (None, None))
        logprobs = self._logprobs(self.policy, params["policy"], batch, r1)
        values = self._values(params["critic"], batch, r2)
        pl, clipfrac, approx_kl = ppo_policy_loss(logprobs, batch["old_logprobs"],
                                                  batch["advantages"], mask, clip=d.clip)
        vl, vclipfrac = ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                       clip=d.value_clip)
        aux = {"policy_loss": pl, "value_loss": vl, "clipfrac": clipfrac,
               "approx_kl": approx_kl, "value_clipfrac": vclipfrac}
        for name in ("reward", "kl", "length", "keyword_score", "stopped"):
            key = f"rollout_{name}"
            if key in batch:
                aux[key] = jnp.mean(batch[key])
        return pl + d.vf_coef * vl, jnp.ones((), jnp.float32), aux

    # --------------------------------------------------------------------------- evaluation

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        n = self.cfg.sample.num_questions or len(self.held_questions)
        questions = self.held_questions[:n]
        from mmjax.data.preferences import keyword_score

        prompts = [ids for _, ids in questions]
        greedy = self._generate(params, prompts, None, 0.0)
        rows = self._rows(prompts, greedy)
        texts, stopped = self._decode(greedy)
        if self.cfg.data.reward == "keyword":
            scores = [float(keyword_score(t, self.keyword[q] or q))
                      for t, (q, _) in zip(texts, questions)]
        else:
            scores = np.asarray(self.reward_module.apply(
                {"params": self.reward_params}, jnp.asarray(rows["tokens"]),
                input_mask=jnp.asarray(rows["real"]))["rewards"]).tolist()
        self._answers = (id(params), [(q, t) for (q, _), t in zip(questions, texts)])
        # trl's KL estimate: sampled answers (fixed seed), summed log-ratio to the reference
        _, stats = self._rollout(params, questions, jax.random.key(self.cfg.data.seed + 7),
                                 self.cfg.data.temperature)
        return {"mean_reward": float(np.mean(scores)),
                "keyword_score": float(np.mean([keyword_score(t, self.keyword[q] or q)
                                                for t, (q, _) in zip(texts, questions)])),
                "kl_to_reference": stats["kl"], "sampled_mean_reward": stats["reward"],
                "response_length": float(np.mean([len(g) for g in greedy])),
                "stopped_fraction": float(np.mean(stopped))}

    def sample(self, params: Any, step: int) -> str | None:
        show = self.cfg.sample.show
        if not show:
            return None
        if self._answers is None or self._answers[0] != id(params):
            self.evaluate(params, None)
        return "\n\n".join(f"Q: {q}\nA: {a}" for q, a in self._answers[1][:show])
