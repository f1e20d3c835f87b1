"""PPO hyper-parameters: one frozen dataclass, validated field by field."""

from __future__ import annotations

import dataclasses

from jaxppo.advantages import ESTIMATORS
from jaxppo.config import MAX_LEARNING_RATE, require, require_range
from jaxppo.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from jaxppo.models.config import DTYPES

CRITICS = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Everything the rollout and update functions need. Defaults follow trl / OpenRLHF."""

    # rollout
    iterations: int = 100  # PPO iterations: one rollout batch, then `epochs` passes over it
    batch_size: int = 64  # prompts (= episodes) per iteration
    max_new_tokens: int = 8  # response length cap, in tokens
    temperature: float = 1.0  # > 0; sampling temperature, also applied to the log-probs PPO optimises
    top_k: int = 0  # >= 0; sample among the k most likely tokens; 0: off
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]; 1: off
    stop_token_ids: tuple[int, ...] = ()  # a response ends with (and keeps) any of these; (): none (pipeline: the task's EOS)
    pad_token_id: int = 0  # fills a response after its stop token (masked out); a token id, >= 0
    sampler_logprobs: bool = False  # old log-probs from the sampler (KV-cache logits): one actor forward pass fewer
    score_micro_batches: int = 1  # the rollout's scoring passes run over this many slices of the batch, in turn
    # slot-refill decoding (jaxppo.engine): this many decode slots over the oversample × batch_size requests, a
    # slot refilled from the queue as soon as its row stops; 0: one slot per request (no queue). Same samples
    # either way (per-request keys).
    decode_slots: int = 0
    # once the queue is empty, live rows are compacted into half the slots while at most half are live, down to
    # this many slots (each width is one more compiled loop); 0: no compaction
    decode_min_slots: int = 0
    missing_eos_penalty: float = 1.0  # >= 0; subtracted from the score of a response that never emitted a stop token
    # DAPO's soft overlong punishment (losses.overlong_penalty): responses in the last this-many tokens before
    # max_new_tokens lose up to 1, linearly; 0: off
    overlong_cache_tokens: int = 0
    # rewards and advantages
    kl_coef: float = 0.05  # β >= 0: weight of the KL to the reference policy (initial β when adaptive)
    kl_target: float | None = None  # None: fixed β; else adapt β to this sequence KL (> 0 nats; Ziegler et al. 2019)
    kl_horizon: float = 10_000.0  # > 0.2·batch_size; adaptive β moves <= 20 % × batch_size / kl_horizon per iteration
    # per-token KL estimate: k1 (log-ratio), k2, k3 or abs (losses.kl_penalty); None: k1 in the reward, k3 as a
    # loss. As a loss only k2 / k3 work: k1's expected gradient is 0 (E_π[∇log π] = 0), abs's is not KL's.
    kl_estimator: str | None = None
    kl_in_reward: bool = True  # True: −β·KL in the per-token rewards; False: β·KL as an actor loss term (GRPO style)
    gamma: float = 1.0  # discount per response token, in [0, 1]
    lam: float = 0.95  # GAE λ in [0, 1]
    whiten_rewards: bool = False  # scale per-token rewards to unit std over the batch (mean kept)
    # whiten advantages to mean 0, std 1 over the batch's valid tokens; None: the estimator's default (gae: on;
    # group estimators: off, it would undo the group baseline; reinforce++ whitens by itself)
    whiten_advantages: bool | None = None
    # advantage estimator, a name in jaxppo.advantages.ESTIMATORS: gae (critic + GAE), grpo, dr_grpo, rloo,
    # reinforce++, reinforce++_baseline (critic-free: no critic is built)
    estimator: str = "gae"
    group_size: int = 1  # responses sampled per prompt (consecutive rows); >= 2 for the group estimators
    dynamic_sampling: bool = False  # DAPO: groups whose scores are all equal carry no signal: dropped from the loss
    oversample: int = 1  # dynamic sampling: sample this many × the batch's groups, keep informative groups first
    # the frozen reference policy: None: built when kl_coef > 0; True: also at β = 0 (its KL is still measured,
    # e.g. to watch over-optimisation); False: never (needs kl_coef = 0)
    reference_model: bool | None = None
    # update
    epochs: int = 4  # passes over each rollout batch
    minibatches: int = 4  # minibatches per epoch; must divide batch_size
    micro_batches: int = 1  # gradient-accumulation splits of a minibatch; must divide the minibatch size
    learning_rate: float = 1e-5  # in (0, 1]; actor AdamW learning rate
    critic_learning_rate: float | None = None  # in (0, 1]; separate critic's learning rate; None: learning_rate
    max_grad_norm: float = 1.0  # >= 0; global gradient-norm clip of each actor / critic step; 0: off
    clip_eps: float = 0.2  # in (0, 1); PPO ratio clip: ρ kept in [1 − clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # > 0; upper ratio clip; None: clip_eps (larger: DAPO's clip-higher)
    dual_clip: float | None = None  # c > 1: loss of tokens with A < 0 capped at −c·A (Ye et al. 2020); None: off
    value_clip_eps: float | None = 0.2  # > 0; value loss clips new values to old ± this; None: unclipped
    vf_coef: float = 0.1  # >= 0; weight of the value loss
    entropy_coef: float = 0.0  # >= 0; weight of the entropy bonus (subtracted from the actor loss)
    policy_loss: str = "clip"  # actor surrogate, a name in jaxppo.losses.POLICY_LOSSES ("clip": token-level PPO clip)
    aggregation: str = "token-mean"  # token losses → scalar: token-mean, seq-mean-token-mean, seq-mean-token-sum or -sum-norm
    critic: str = "separate"  # "separate": its own model; "shared": a value head on the actor's trunk
    critic_init: str = "reward_model"  # separate critic from "reward_model" (its head → value head) or "sft" (new head)
    ptx_coef: float = 0.0  # >= 0; PPO-ptx: weight of an SFT loss on demonstrations in the actor loss; 0: off
    ref_refresh_every: int = 0  # 0: never; k: reference ← actor every k iterations
    # execution
    frozen_dtype: str | None = None  # reference + reward model dtype in PPO; None: the model's; bfloat16: half the memory
    fused: bool = True  # one XLA program per iteration (ppo.make_iteration); False: jitted rollout + update (debugging)
    iterations_per_call: int = 1  # fused: iterations folded into one call (lax.scan) when no host work falls between

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("iterations", "batch_size", "max_new_tokens", "epochs", "minibatches", "micro_batches",
                     "iterations_per_call", "score_micro_batches"):
            require(getattr(self, name) >= 1, f"ppo.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.batch_size % self.minibatches == 0, "ppo.minibatches",
                f"batch_size={self.batch_size} must be divisible by minibatches={self.minibatches}")
        minibatch = self.batch_size // self.minibatches
        require(minibatch % self.micro_batches == 0, "ppo.micro_batches",
                f"the minibatch size {minibatch} must be divisible by micro_batches={self.micro_batches}")
        require(self.batch_size % self.score_micro_batches == 0, "ppo.score_micro_batches",
                f"batch_size={self.batch_size} must be divisible by score_micro_batches={self.score_micro_batches}")
        require(self.kl_estimator is None or self.kl_estimator in KL_ESTIMATORS, "ppo.kl_estimator",
                f"{self.kl_estimator!r} not in {KL_ESTIMATORS} (or None)")
        require(self.kl_in_reward or self.kl_penalty_estimator in ("k2", "k3"), "ppo.kl_estimator",
                f"{self.kl_estimator!r} as a loss term (ppo.kl_in_reward=False) has an expected gradient that is "
                "zero (k1) or not the gradient of KL(π‖π_ref) (abs); use 'k3' or 'k2' (or None: k3)")
        require(self.aggregation in AGGREGATIONS, "ppo.aggregation", f"{self.aggregation!r} not in {AGGREGATIONS}")
        require(self.policy_loss in POLICY_LOSSES, "ppo.policy_loss",
                f"{self.policy_loss!r} not in {tuple(POLICY_LOSSES)}")
        require(self.estimator in ESTIMATORS, "ppo.estimator", f"{self.estimator!r} not in {tuple(ESTIMATORS)}")
        require(self.critic in CRITICS, "ppo.critic", f"{self.critic!r} not in {CRITICS}")
        # groups of responses per prompt: consecutive rows, never split across score micro-batches' reshapes
        require(self.group_size >= 1, "ppo.group_size", f"must be >= 1, got {self.group_size}")
        require(self.batch_size % self.group_size == 0, "ppo.group_size",
                f"batch_size={self.batch_size} (responses) must be divisible by group_size={self.group_size}")
        grouped = ESTIMATORS[self.estimator].grouped or self.dynamic_sampling
        require(not grouped or self.group_size >= 2, "ppo.group_size",
                f"{'dynamic sampling' if self.dynamic_sampling else f'estimator {self.estimator!r}'} compares the "
                f"responses to one prompt: needs group_size >= 2, got {self.group_size}")
        require(self.oversample >= 1, "ppo.oversample", f"must be >= 1, got {self.oversample}")
        require(self.decode_slots >= 0, "ppo.decode_slots", f"must be >= 0 (0: one per request), got {self.decode_slots}")
        require(self.decode_min_slots >= 0, "ppo.decode_min_slots",
                f"must be >= 0 (0: no compaction), got {self.decode_min_slots}")
        require(0 <= self.overlong_cache_tokens <= self.max_new_tokens, "ppo.overlong_cache_tokens",
                f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.overlong_cache_tokens}")
        require(self.oversample == 1 or self.dynamic_sampling, "ppo.oversample",
                "over-sampling keeps informative groups first: it needs ppo.dynamic_sampling=True")
        per_response = ESTIMATORS[self.estimator].per_response
        # GRPO's std normalisation would blow the β·ΣKL differences of a group of equal scores up to ±1
        require(not (self.estimator in ("grpo", "dr_grpo") and self.kl_in_reward and self.kl_coef > 0),
                "ppo.kl_in_reward", f"estimator {self.estimator!r} normalises each group's returns: with the KL in "
                "the reward, a group of equal scores gets advantages from the KL noise alone; use "
                "ppo.kl_in_reward=False (the KL as a loss, GRPO's way) or ppo.kl_coef=0")
        require(self.policy_loss != "gspo" or per_response, "ppo.policy_loss",
                f"'gspo' clips a per-response ratio with one advantage per response; estimator "
                f"{self.estimator!r} gives per-token advantages (use grpo, dr_grpo or rloo)")
        require(not self.dynamic_sampling or per_response, "ppo.dynamic_sampling",
                f"drops groups of equal scores as carrying no signal, true of estimators with one group-relative "
                f"advantage per response (grpo, dr_grpo, rloo), not of {self.estimator!r}")
        require(self.reference_model is not False or self.kl_coef == 0, "ppo.reference_model",
                f"False (no reference) needs ppo.kl_coef=0, got {self.kl_coef}")
        require(self.builds_reference or self.ref_refresh_every == 0, "ppo.ref_refresh_every",
                "there is no reference to refresh (ppo.kl_coef=0 builds none; set ppo.reference_model=True)")
        require(self.critic_init in ("reward_model", "sft"), "ppo.critic_init", f"{self.critic_init!r}")
        # rollout
        require_range(self.temperature, "ppo.temperature", gt=0)  # PPO needs a stochastic policy
        require_range(self.top_k, "ppo.top_k", ge=0)  # 0: off
        require_range(self.top_p, "ppo.top_p", gt=0, le=1)  # 0 keeps no token; 1: off
        require_range(self.pad_token_id, "ppo.pad_token_id", ge=0)
        for token in self.stop_token_ids:
            require_range(token, "ppo.stop_token_ids", ge=0)
        # a negative penalty would reward responses that never stop
        require_range(self.missing_eos_penalty, "ppo.missing_eos_penalty", ge=0)
        # rewards and advantages: a negative β would reward drifting from the reference
        require_range(self.kl_coef, "ppo.kl_coef", ge=0)
        if self.kl_target is not None:
            require_range(self.kl_target, "ppo.kl_target", gt=0)
        require_range(self.kl_horizon, "ppo.kl_horizon", gt=0)
        if self.kl_target is not None:  # β ← β (1 + e · batch_size / horizon), e in [−0.2, 0.2]
            require(self.kl_coef > 0, "ppo.kl_coef", "must be > 0 with an adaptive β (ppo.kl_target): the update "
                    "is multiplicative, so a β that starts at 0 stays 0")
            require(0.2 * self.batch_size < self.kl_horizon, "ppo.kl_horizon",
                    f"must exceed 0.2 × batch_size = {0.2 * self.batch_size:g} (else one adaptive step can make "
                    f"β <= 0), got {self.kl_horizon}")
        require_range(self.gamma, "ppo.gamma", ge=0, le=1)
        require_range(self.lam, "ppo.lam", ge=0, le=1)
        # update
        require_range(self.learning_rate, "ppo.learning_rate", gt=0, le=MAX_LEARNING_RATE)
        if self.critic_learning_rate is not None:
            require_range(self.critic_learning_rate, "ppo.critic_learning_rate", gt=0, le=MAX_LEARNING_RATE)
        require_range(self.max_grad_norm, "ppo.max_grad_norm", ge=0)  # 0: off; < 0 would flip every step
        require_range(self.clip_eps, "ppo.clip_eps", gt=0, lt=1)  # the lower clip 1 − ε must be a ratio > 0
        if self.clip_eps_high is not None:
            require_range(self.clip_eps_high, "ppo.clip_eps_high", gt=0)
        if self.dual_clip is not None:  # c <= 1 would cap the loss below the unclipped one
            require_range(self.dual_clip, "ppo.dual_clip", gt=1)
        if self.value_clip_eps is not None:
            require_range(self.value_clip_eps, "ppo.value_clip_eps", gt=0)
        # a negative weight would turn a loss term into an objective to maximise
        for name in ("vf_coef", "entropy_coef", "ptx_coef"):
            require_range(getattr(self, name), f"ppo.{name}", ge=0)
        require(self.ref_refresh_every >= 0, "ppo.ref_refresh_every", "must be >= 0")
        require(self.frozen_dtype is None or self.frozen_dtype in DTYPES, "ppo.frozen_dtype",
                f"{self.frozen_dtype!r} not in {DTYPES}")
        require(self.fused or self.iterations_per_call == 1, "ppo.iterations_per_call",
                "folding iterations into one call needs ppo.fused=True")

    @property
    def kl_penalty_estimator(self) -> str:
        """The KL estimator that runs: ``kl_estimator``, or by default k1 in the reward and k3 as a loss
        (a run's saved config shows it resolved, :meth:`jaxppo.pipeline_config.PipelineConfig.resolved`)."""
        return self.kl_estimator or ("k1" if self.kl_in_reward else "k3")

    @property
    def whiten(self) -> bool:
        """Whether advantages are whitened over the batch: ``whiten_advantages``, or the estimator's default."""
        return ESTIMATORS[self.estimator].whiten if self.whiten_advantages is None else self.whiten_advantages

    @property
    def builds_reference(self) -> bool:
        """Whether the run builds the frozen reference: ``reference_model``, or by default when β > 0."""
        return self.kl_coef > 0 if self.reference_model is None else self.reference_model

    @property
    def prompts_per_batch(self) -> int:
        """Prompts sampled per iteration: ``oversample × batch_size / group_size``."""
        return self.oversample * self.batch_size // self.group_size

    @property
    def critic_role(self) -> str:
        """``"separate"`` or ``"shared"`` (``critic``) when the estimator needs a critic, else ``"none"``."""
        return self.critic if ESTIMATORS[self.estimator].needs_critic else "none"

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches
