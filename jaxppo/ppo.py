"""PPO update: epochs × shuffled minibatches of clipped policy and value updates, one jitted call.

Per minibatch (Schulman et al. 2017; Ouyang et al. 2022):

.. math::
    L_{actor} = L^{CLIP} − c_{ent} H + [\\text{KL as loss}]\\, β\\,\\mathrm{KL}
               + [\\text{shared}]\\, c_{vf} L^{VF} + c_{ptx} L^{SFT}_{demos}

and, for a separate critic, :math:`c_{vf} L^{VF}` on the critic's own params and optimizer.
Epochs and minibatches are nested ``lax.scan``s with the shuffle inside the graph; each minibatch
may be split into micro-batches whose gradients are accumulated. Both states are donated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from jaxppo.kl_control import update_kl_control
from jaxppo.losses import kl_penalty, policy_loss, value_loss
from jaxppo.masking import masked_mean
from jaxppo.models.config import ModelConfig
from jaxppo.optim import accumulate_gradients, skipped_updates
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import Trajectory, make_rollout
from jaxppo.sequences import response_logprobs, response_values
from jaxppo.sft import sft_nll
from jaxppo.sharding import constrain_tree

Array = jax.Array


def actor_loss(config: ModelConfig, ppo: PPOConfig, params: dict, batch: dict) -> tuple[Array, dict]:
    """The actor's minibatch loss (see the module docstring) and its diagnostics."""
    traj: Trajectory = batch["traj"]
    mask = traj.response_mask
    shared = ppo.critic == "shared"
    logprobs, values, ent = response_logprobs(
        config, params, traj.prompt, traj.prompt_mask, traj.response, mask, temperature=ppo.temperature,
        value_head="value_head" if shared else None, with_entropy=True,
    )
    pg, pg_aux = policy_loss(logprobs, traj.old_logprobs, traj.advantages, mask, clip_eps=ppo.clip_eps,
                             clip_eps_high=ppo.clip_eps_high, dual_clip=ppo.dual_clip, aggregation=ppo.aggregation)
    entropy = masked_mean(ent, mask)
    loss = pg - ppo.entropy_coef * entropy
    aux = {
        "policy_loss": pg, "entropy": entropy, "clip_fraction": pg_aux["clip_fraction"],
        "approx_kl": pg_aux["approx_kl"],
        "max_abs_log_ratio": jnp.max(jnp.where(mask > 0, jnp.abs(logprobs - traj.old_logprobs), 0.0)),
    }
    if not ppo.kl_in_reward:
        kl = masked_mean(kl_penalty(logprobs, traj.ref_logprobs, estimator=ppo.kl_estimator), mask)
        loss = loss + batch["kl_coef"] * kl
        aux["kl_loss"] = kl
    if shared:
        vf, vf_aux = value_loss(values, traj.old_values, traj.returns, mask, clip_eps=ppo.value_clip_eps)
        loss = loss + ppo.vf_coef * vf
        aux.update(value_loss=vf, value_clip_fraction=vf_aux["clip_fraction"])
    if ppo.ptx_coef > 0:
        ptx, _ = sft_nll(config, params, batch["ptx"])
        loss = loss + ppo.ptx_coef * ptx
        aux["ptx_loss"] = ptx
    return loss, aux


def critic_loss(config: ModelConfig, ppo: PPOConfig, params: dict, batch: dict) -> tuple[Array, dict]:
    """A separate critic's clipped value loss × ``vf_coef``."""
    traj: Trajectory = batch["traj"]
    values = response_values(config, params, traj.prompt, traj.prompt_mask, traj.response, traj.response_mask)
    vf, vf_aux = value_loss(values, traj.old_values, traj.returns, traj.response_mask, clip_eps=ppo.value_clip_eps)
    return ppo.vf_coef * vf, {"value_loss": vf, "value_clip_fraction": vf_aux["clip_fraction"]}


def make_update(actor_config: ModelConfig, ppo: PPOConfig, *, critic_config: ModelConfig | None = None):
    """Jitted ``update(actor_state, critic_state, traj, key, kl_coef, ptx) -> (actor, critic, metrics)``.

    ``critic_state`` is None for a shared critic; ``ptx`` is an SFT batch (see :mod:`jaxppo.sft`)
    used when ``ppo.ptx_coef > 0`` (else None). Metrics are means over all minibatch steps, except
    ``first_max_abs_log_ratio``: |log ρ| on the first minibatch of the first epoch, which must be
    ~0 (the update recomputes exactly the rollout's old log-probs).
    """
    critic_config = critic_config or actor_config
    shared = ppo.critic == "shared"
    actor_loss_fn = functools.partial(actor_loss, actor_config, ppo)
    critic_loss_fn = functools.partial(critic_loss, critic_config, ppo)

    def minibatch_step(carry, minibatch):
        actor, critic, kl_coef, ptx = carry
        batch = {"traj": minibatch, "kl_coef": kl_coef}
        if ppo.ptx_coef > 0:
            batch["ptx"] = ptx

        # Only the trajectory is split into micro-batches; kl_coef and ptx stay whole.
        def micro_loss(params, micro_traj, loss_fn=actor_loss_fn):
            return loss_fn(params, {**batch, "traj": micro_traj})

        _, aux, grads = accumulate_gradients(micro_loss, actor.params, minibatch, micro_batches=ppo.micro_batches)
        aux["actor_grad_norm"] = optax.tree.norm(grads)
        actor = actor.apply_gradients(grads=grads)
        if not shared:
            _, critic_aux, critic_grads = accumulate_gradients(
                functools.partial(micro_loss, loss_fn=critic_loss_fn), critic.params, minibatch,
                micro_batches=ppo.micro_batches)
            critic_aux["critic_grad_norm"] = optax.tree.norm(critic_grads)
            critic = critic.apply_gradients(grads=critic_grads)
            aux.update(critic_aux)
        return (actor, critic, kl_coef, ptx), aux

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(actor: TrainState, critic: TrainState | None, traj: Trajectory, key: Array, kl_coef, ptx=None):
        batch_size = traj.response.shape[0]
        if batch_size != ppo.batch_size:
            raise ValueError(f"trajectory batch {batch_size} != ppo.batch_size {ppo.batch_size}")

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, batch_size).reshape(ppo.minibatches, ppo.minibatch_size)
            minibatches = jax.tree.map(lambda x: x[order], traj)
            return jax.lax.scan(minibatch_step, carry, minibatches)

        carry = (actor, critic, jnp.asarray(kl_coef, jnp.float32), ptx)
        (actor, critic, _, _), aux = jax.lax.scan(epoch, carry, jax.random.split(key, ppo.epochs))
        actor, critic = constrain_tree((actor, critic))  # the layout they came in with (sharding.RULES)
        metrics = {k: jnp.mean(v) for k, v in aux.items()}
        metrics["max_abs_log_ratio"] = jnp.max(aux["max_abs_log_ratio"])
        metrics["first_max_abs_log_ratio"] = aux["max_abs_log_ratio"][0, 0]
        # cumulative count of minibatch steps skipped for non-finite gradients (optim.make_optimizer)
        metrics["actor_skipped_updates"] = skipped_updates(actor)
        if not shared:
            metrics["critic_skipped_updates"] = skipped_updates(critic)
        return actor, critic, metrics

    return update


def make_iteration(actor_config: ModelConfig, ppo: PPOConfig, *, critic_config: ModelConfig | None = None,
                   reward_config: ModelConfig | None = None, reward_pooling: str = "last", score_fn=None):
    """Jitted ``iterations(actor, critic, reference, reward, kl_state, prompts, prompt_masks, sample_keys,
    update_keys, ptx) -> (actor, critic, kl_state, samples, metrics)``: whole PPO iterations — rollout,
    scoring, rewards, GAE, epochs × minibatches of updates, the KL controller — as **one XLA program**
    (the purejaxrl design); the host only logs and checkpoints.

    Every per-iteration input has a leading axis K: ``prompts`` / ``prompt_masks`` ``[K, B, P]``,
    ``sample_keys`` / ``update_keys`` ``[K]``, ``ptx`` (an SFT batch per iteration when
    ``ppo.ptx_coef > 0``, else None) ``[K, ...]``; the K iterations are a ``lax.scan``, so K = 1 is
    one iteration and K > 1 folds iterations between which no host work is due. Returns the states
    after the K iterations, ``samples`` (``prompt``, ``prompt_mask``, ``response``, ``response_mask``,
    each ``[K, B, ...]``, for host-side gold rewards) and ``metrics`` ``{name: [K]}``. Iteration k is
    exactly :func:`jaxppo.rollout.make_rollout` then :func:`make_update` with the k-th keys, so the
    result equals the two-function loop up to float rounding. ``actor``, ``critic`` and
    ``kl_state`` are donated; traced once per K and shapes.
    """
    rollout = make_rollout(actor_config, ppo, critic_config=critic_config, reward_config=reward_config,
                           reward_pooling=reward_pooling, score_fn=score_fn)
    update = make_update(actor_config, ppo, critic_config=critic_config)  # both inlined into the one program

    def one_iteration(carry, xs):
        actor, critic, kl_state, reference, reward = carry
        prompt, prompt_mask, sample_key, update_key, ptx = xs
        traj, metrics = rollout(actor.params, None if critic is None else critic.params, reference, reward,
                                prompt, prompt_mask, sample_key, kl_state.kl_coef)
        actor, critic, update_metrics = update(actor, critic, traj, update_key, kl_state.kl_coef, ptx)
        kl_state = update_kl_control(kl_state, metrics["kl"], n_steps=ppo.batch_size, target=ppo.kl_target,
                                     horizon=ppo.kl_horizon)
        samples = {"prompt": traj.prompt, "prompt_mask": traj.prompt_mask, "response": traj.response,
                   "response_mask": traj.response_mask}
        return (actor, critic, kl_state, reference, reward), (samples, {**metrics, **update_metrics})

    @functools.partial(jax.jit, donate_argnums=(0, 1, 4))
    def iterations(actor, critic, reference, reward, kl_state, prompts, prompt_masks, sample_keys, update_keys,
                   ptx=None):
        carry = (actor, critic, kl_state, reference, reward)
        (actor, critic, kl_state, _, _), (samples, metrics) = jax.lax.scan(
            one_iteration, carry, (prompts, prompt_masks, sample_keys, update_keys, ptx))
        return actor, critic, kl_state, samples, metrics

    return iterations
