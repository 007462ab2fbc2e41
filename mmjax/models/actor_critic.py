"""The two trained models of PPO for language models in one param tree: the policy (actor, a
LLaMA-family LM) and the critic (a value model, `mmjax.models.reward.RewardModel`: per-token
values from a scalar head), as trl's PPO trains a policy and a separate value model.

    config = ActorCriticConfig(policy=LlamaConfig(...), critic=RewardConfig(text=LlamaConfig(...)))
    params = ActorCritic(config).init(rng, tokens)["params"]     # {"policy": ..., "critic": ...}
    logits = Llama(config.policy).apply({"params": params["policy"]}, tokens)
    values = RewardModel(config.critic).apply({"params": params["critic"]}, tokens)["values"]

The module's own `__call__` runs both (what `init` needs); the PPO task (`mmjax.tasks.ppo`)
applies each half with its own module. A trained policy is reused elsewhere through
`init_from` with prefix "policy" (e.g. `InitSource("workdirs/ppo_pydoc", prefix="policy")`).
The frozen reference and the reward model are not part of it: they are loaded by the task.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.models.family import Family, token_inputs
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.models.reward import RewardConfig, RewardModel


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig(configs.Config):
    """policy: the LM that generates (the actor). critic: the value model (its decoder may be
    another size; it must share the policy's vocabulary)."""

    NAME = "ActorCritic"
    policy: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    critic: RewardConfig = dataclasses.field(default_factory=RewardConfig)

    def __post_init__(self):
        if isinstance(self.policy, dict):
            object.__setattr__(self, "policy", LlamaConfig.from_dict(self.policy))
        if isinstance(self.critic, dict):
            object.__setattr__(self, "critic", RewardConfig.from_dict(self.critic))
        if not isinstance(self.policy, LlamaConfig) or not isinstance(self.critic, RewardConfig):
            raise ConfigError("ActorCriticConfig needs policy=LlamaConfig(...) and "
                              "critic=RewardConfig(...)")
        if self.policy.vocab_size != self.critic.text.vocab_size:
            raise ConfigError(f"ActorCriticConfig: the critic's vocabulary "
                              f"({self.critic.text.vocab_size}) differs from the policy's "
                              f"({self.policy.vocab_size}); both read the same token ids")

    # the language-model attributes generation and tasks read are the policy's
    @property
    def vocab_size(self) -> int:
        return self.policy.vocab_size

    @property
    def max_len(self) -> int:
        return self.policy.max_len

    def num_params(self) -> int:
        return self.policy.num_params() + self.critic.num_params()


class ActorCritic(nn.Module):
    config: ActorCriticConfig

    def setup(self):
        self.policy = Llama(self.config.policy)
        self.critic = RewardModel(self.config.critic)

    def __call__(self, tokens, *, input_mask=None, deterministic: bool = True):
        logits = self.policy(tokens, input_mask=input_mask, deterministic=deterministic)
        values = self.critic(tokens, input_mask=input_mask, deterministic=deterministic)["values"]
        return logits, values


FAMILIES = (Family("actor_critic", ActorCriticConfig, ActorCritic, token_inputs,
                   "PPO's policy (LLaMA) and critic (value model) in one param tree",
                   tasks=("ppo",)),)
