"""PPO on a tabular token policy: jaxppo's RL math end to end, without a language model.

The "model" is a table of logits ``[T, V]``: the policy picks token ``a_t`` at position ``t``
independently of the prefix, and the critic is a table ``V(t)``. The gold score of a response is
the fraction of its tokens equal to ``target_token``. Everything else is the real PPO recipe of
seed 000: reference = the initial policy, KL-shaped per-token rewards with the score on the last
token, GAE by reverse scan, advantage whitening, clipped policy and value losses, entropy bonus,
adaptive KL. One iteration (rollout + epochs of updates) is one jitted function.

It is a sanity check of the math and a playground for research forks that change a loss or an
estimator; the language-model pipeline lives in the trainers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxppo.advantages import gae, kl_shaped_rewards, sequence_sum, whiten
from jaxppo.config import MAX_LEARNING_RATE, require, require_finite, require_range
from jaxppo.kl_control import KLControlState, init_kl_control, update_kl_control
from jaxppo.losses import entropy, policy_loss, value_loss
from jaxppo.rng import NUM_SEEDS


@dataclasses.dataclass(frozen=True)
class TabularPPOConfig:
    """Hyper-parameters of :func:`train` (every field is validated by name)."""

    vocab_size: int = 8  # tokens per position, >= 2
    length: int = 6  # response length T (every response is exactly T tokens)
    target_token: int = 3  # the score is the fraction of response tokens equal to this; in [0, vocab_size)
    batch_size: int = 64  # responses sampled per iteration
    iterations: int = 60  # PPO iterations (rollout, then `epochs` updates)
    epochs: int = 4  # full-batch Adam steps per iteration
    learning_rate: float = 0.05  # Adam learning rate for the logit and value tables
    gamma: float = 1.0  # discount per token, in [0, 1]
    lam: float = 0.95  # GAE λ in [0, 1]
    clip_eps: float = 0.2  # PPO ratio clip ε > 0
    value_clip_eps: float | None = 0.2  # value loss clips new values to old ± this; None: unclipped
    vf_coef: float = 0.5  # weight of the value loss
    entropy_coef: float = 0.0  # weight of the entropy bonus
    kl_coef: float = 0.05  # β >= 0: weight of the KL to the initial policy (initial β when adaptive)
    kl_target: float | None = 1.0  # None: fixed β; else adapt β to this sequence KL (nats)
    kl_horizon: float = 2_000.0  # adaptive β moves <= 20 % × batch_size / kl_horizon per iteration
    kl_estimator: str = "k1"  # per-token KL estimate: k1, k2, k3 or abs
    seed: int = 0  # PRNG seed of the initial policy and all sampling

    def __post_init__(self):
        require(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        require(0 <= self.target_token < self.vocab_size, "target_token",
                f"must be in [0, vocab_size={self.vocab_size}), got {self.target_token}")
        for name in ("length", "batch_size", "iterations", "epochs"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        require(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        require_finite(self)  # every float finite (names the field), then the ranges that can train
        require_range(self.learning_rate, "learning_rate", gt=0, le=MAX_LEARNING_RATE)
        require_range(self.clip_eps, "clip_eps", gt=0)
        for name in ("vf_coef", "entropy_coef"):
            require_range(getattr(self, name), name, ge=0)  # negative flips the objective
        for name in ("value_clip_eps", "kl_target"):
            if getattr(self, name) is not None:
                require_range(getattr(self, name), name, gt=0)
        require_range(self.kl_horizon, "kl_horizon", gt=0)
        require_range(self.seed, "seed", ge=0, lt=NUM_SEEDS)  # seed + 2**32 would give seed's keys


class TabularState(NamedTuple):
    policy_logits: jax.Array  # [T, V]
    values: jax.Array  # [T]
    opt_state: optax.OptState
    kl: KLControlState


def init_state(config: TabularPPOConfig, key: jax.Array) -> tuple[TabularState, optax.GradientTransformation]:
    """A near-uniform initial policy (also the frozen reference), zero critic, Adam."""
    logits = 0.5 * jax.random.normal(key, (config.length, config.vocab_size))
    values = jnp.zeros((config.length,))
    optimizer = optax.adam(config.learning_rate)
    params = (logits, values)
    return TabularState(logits, values, optimizer.init(params), init_kl_control(kl_coef=config.kl_coef)), optimizer


def make_iteration(config: TabularPPOConfig, optimizer: optax.GradientTransformation, ref_logits: jax.Array):
    """Builds the jitted ``iteration(state, key) -> (state, metrics)``."""
    batch, length = config.batch_size, config.length
    mask = jnp.ones((batch, length))

    def logprobs_of(logits, tokens):
        return jnp.take_along_axis(jax.nn.log_softmax(logits)[None].repeat(batch, 0), tokens[..., None], -1)[..., 0]

    def loss_fn(params, tokens, old_logprobs, old_values, advantages, returns):
        logits, values = params
        pg, pg_aux = policy_loss(logprobs_of(logits, tokens), old_logprobs, advantages, mask,
                                 clip_eps=config.clip_eps)
        vf, vf_aux = value_loss(jnp.broadcast_to(values, (batch, length)), old_values, returns, mask,
                                clip_eps=config.value_clip_eps)
        ent = entropy(jnp.broadcast_to(logits, (batch, length, config.vocab_size)), mask)
        return pg + config.vf_coef * vf - config.entropy_coef * ent, (pg_aux["clip_fraction"], ent)

    @jax.jit
    def iteration(state: TabularState, key: jax.Array):
        tokens = jax.random.categorical(key, state.policy_logits, shape=(batch, length))
        old_logprobs = logprobs_of(state.policy_logits, tokens)
        ref_logprobs = logprobs_of(ref_logits, tokens)
        old_values = jnp.broadcast_to(state.values, (batch, length))
        scores = jnp.mean(tokens == config.target_token, axis=1).astype(jnp.float32)
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask,
                                        kl_coef=state.kl.kl_coef, estimator=config.kl_estimator)
        advantages, returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
        advantages = whiten(advantages, mask)

        def epoch(carry, _):
            params, opt_state = carry
            grads, aux = jax.grad(loss_fn, has_aux=True)(params, tokens, old_logprobs, old_values, advantages, returns)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), aux

        (params, opt_state), (clip_fraction, ent) = jax.lax.scan(
            epoch, ((state.policy_logits, state.values), state.opt_state), None, length=config.epochs)
        sequence_kl = jnp.mean(sequence_sum(kl, mask))
        kl_state = update_kl_control(state.kl, sequence_kl, n_steps=batch,
                                     target=config.kl_target, horizon=config.kl_horizon)
        metrics = {"score": jnp.mean(scores), "kl": sequence_kl, "kl_coef": state.kl.kl_coef,
                   "clip_fraction": clip_fraction[-1], "entropy": ent[-1]}
        return TabularState(params[0], params[1], opt_state, kl_state), metrics

    return iteration


def train(config: TabularPPOConfig, log=print) -> list[dict[str, float]]:
    """Runs ``config.iterations`` PPO iterations; returns the per-iteration metrics (host floats)."""
    key = jax.random.key(config.seed)
    key, init_key = jax.random.split(key)
    state, optimizer = init_state(config, init_key)
    iteration = make_iteration(config, optimizer, ref_logits=state.policy_logits)
    history = []
    for i in range(config.iterations):
        state, metrics = iteration(state, jax.random.fold_in(key, i))
        if i % 10 == 0 or i == config.iterations - 1:  # pull to host only when logging
            row = {"iteration": i, **{k: float(v) for k, v in metrics.items()}}
            history.append(row)
            log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return history
