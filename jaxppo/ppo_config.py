"""PPO hyper-parameters: one frozen dataclass, validated field by field."""

from __future__ import annotations

import dataclasses

from jaxppo.config import require
from jaxppo.losses import AGGREGATIONS, KL_ESTIMATORS

CRITICS = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Everything the rollout and update functions need. Defaults follow trl / OpenRLHF."""

    # rollout
    iterations: int = 100
    batch_size: int = 64  # prompts per iteration
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    missing_eos_penalty: float = 1.0
    # rewards and advantages
    kl_coef: float = 0.05
    kl_target: float | None = None  # None: fixed β; else adaptive (Ziegler et al. 2019)
    kl_horizon: float = 10_000.0
    kl_estimator: str = "k1"
    kl_in_reward: bool = True  # False: KL as a loss term (PPO-penalty / GRPO style)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    # update
    epochs: int = 4
    minibatches: int = 4
    micro_batches: int = 1
    learning_rate: float = 1e-5
    critic_learning_rate: float | None = None  # separate critic; default learning_rate
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    critic: str = "separate"  # or "shared": a value head on the actor's trunk
    critic_init: str = "reward_model"  # separate critic from "reward_model" or "sft"
    ptx_coef: float = 0.0  # PPO-ptx: SFT loss on demonstrations mixed into the actor loss
    ref_refresh_every: int = 0  # 0: never; k: reference ← actor every k iterations

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("iterations", "batch_size", "max_new_tokens", "epochs", "minibatches", "micro_batches"):
            require(getattr(self, name) >= 1, f"ppo.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.batch_size % self.minibatches == 0, "ppo.minibatches",
                f"batch_size={self.batch_size} must be divisible by minibatches={self.minibatches}")
        minibatch = self.batch_size // self.minibatches
        require(minibatch % self.micro_batches == 0, "ppo.micro_batches",
                f"the minibatch size {minibatch} must be divisible by micro_batches={self.micro_batches}")
        require(self.kl_estimator in KL_ESTIMATORS, "ppo.kl_estimator", f"{self.kl_estimator!r} not in {KL_ESTIMATORS}")
        require(self.aggregation in AGGREGATIONS, "ppo.aggregation", f"{self.aggregation!r} not in {AGGREGATIONS}")
        require(self.critic in CRITICS, "ppo.critic", f"{self.critic!r} not in {CRITICS}")
        require(self.critic_init in ("reward_model", "sft"), "ppo.critic_init", f"{self.critic_init!r}")
        require(self.kl_coef >= 0, "ppo.kl_coef", f"must be >= 0, got {self.kl_coef}")
        require(self.kl_target is None or self.kl_target > 0, "ppo.kl_target", "must be > 0 or None")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma", "gamma and lam must be in [0, 1]")
        require(self.clip_eps > 0, "ppo.clip_eps", f"must be > 0, got {self.clip_eps}")
        require(self.learning_rate > 0, "ppo.learning_rate", f"must be > 0, got {self.learning_rate}")
        require(self.temperature > 0, "ppo.temperature", "must be > 0 (PPO needs a stochastic policy)")
        require(self.ref_refresh_every >= 0, "ppo.ref_refresh_every", "must be >= 0")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches
