"""PPO: the update (epochs × shuffled minibatches of clipped policy and value updates), the typed
state of the four roles, and the iteration that ties rollout, update and KL controller together.

Per minibatch (Schulman et al. 2017; Ouyang et al. 2022):

.. math::
    L_{actor} = L^{π} − c_{ent} H + [\\text{KL as loss}]\\, β\\,\\mathrm{KL}
               + [\\text{shared}]\\, c_{vf} L^{VF} + c_{ptx} L^{SFT}_{demos}

with :math:`L^{π}` the surrogate ``ppo.policy_loss`` names in :data:`jaxppo.losses.POLICY_LOSSES`
(PPO's token-level clip by default) and, for a separate critic, :math:`c_{vf} L^{VF}` on the
critic's own params and optimizer. Epochs and minibatches are nested ``lax.scan``s with the shuffle
inside the graph; each minibatch may be split into micro-batches whose gradients are accumulated
(every term divides by the whole minibatch's counts). Both states are donated.

:class:`PPOState` (actor, critic, KL controller) and :class:`FrozenRoles` (reference, reward model)
are built sharded by :func:`init_ppo`; :func:`ppo_iteration` is the one iteration body, run fused
(one XLA program, :func:`make_iteration`) or from the host.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from jaxppo.config import require
from jaxppo.kl_control import KLControlState, init_kl_control, update_kl_control
from jaxppo.lora import TARGETS, base_params, compose, init_adapters, role_params
from jaxppo.losses import POLICY_LOSSES, kl_penalty, value_loss
from jaxppo.masking import masked_mean, nonempty_rows, valid_count
from jaxppo.models.config import ModelConfig, cast_params
from jaxppo.models.heads import init_scalar_head
from jaxppo.optim import accumulate_gradients, create_train_state, make_optimizer, skipped_updates
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import Trajectory, make_rollout
from jaxppo.sequences import response_logprobs, response_values
from jaxppo.sft import sft_denominators, sft_nll
from jaxppo.sharding import constrain_tree, init_sharded, replicate, shard_tree

Array = jax.Array


def actor_loss(config: ModelConfig, ppo: PPOConfig, params: dict, batch: dict,
               denominators: dict | None = None, *, base: dict | None = None) -> tuple[Array, dict]:
    """The actor's minibatch loss (see the module docstring) and its diagnostics.

    ``batch`` holds ``traj`` (a :class:`Trajectory`), ``kl_coef`` and, when ``ppo.ptx_coef > 0``,
    ``ptx`` (an SFT batch). Every term divides by ``denominators`` (:func:`update_denominators` of
    the whole minibatch when ``batch`` is one of its micro-batches; None: this batch's own), so the
    micro-batches' losses, gradients and aux sum to the minibatch's; ``max_abs_log_ratio`` is a max.
    With ``base`` (LoRA: the frozen shared weights) ``params`` are the actor's own (adapters, value
    head) and the model is :func:`jaxppo.lora.compose` of the two.
    """
    params = compose(base, params)
    traj: Trajectory = batch["traj"]
    mask = traj.loss_mask  # the response tokens, less the groups dynamic sampling drops
    shared = ppo.critic_role == "shared"
    if denominators is None:
        denominators = update_denominators(batch)
    tokens = denominators["tokens"]
    logprobs, values, ent = response_logprobs(
        config, params, traj.prompt, traj.prompt_mask, traj.response, mask, temperature=ppo.temperature,
        value_head="value_head" if shared else None, with_entropy=True,
    )
    surrogate = POLICY_LOSSES[ppo.policy_loss]  # the plug-in point: a pure loss chosen by name
    pg, pg_aux = surrogate.fn(logprobs, traj.old_logprobs, traj.advantages, mask, token_count=tokens,
                              row_count=denominators["rows"],
                              **{name: getattr(ppo, name) for name in surrogate.hyperparameters})
    entropy = masked_mean(ent, mask, denominator=tokens)
    loss = pg - ppo.entropy_coef * entropy
    aux = {
        "policy_loss": pg, "entropy": entropy, "clip_fraction": pg_aux["clip_fraction"],
        "approx_kl": pg_aux["approx_kl"],
        "max_abs_log_ratio": jnp.max(jnp.where(mask > 0, jnp.abs(logprobs - traj.old_logprobs), 0.0)),
    }
    if not ppo.kl_in_reward and ppo.builds_reference:  # without a reference (β = 0) there is no KL term
        kl = masked_mean(kl_penalty(logprobs, traj.ref_logprobs, estimator=ppo.kl_penalty_estimator), mask, denominator=tokens)
        loss = loss + batch["kl_coef"] * kl
        aux["kl_loss"] = kl
    if shared:
        vf, vf_aux = value_loss(values, traj.old_values, traj.returns, mask, clip_eps=ppo.value_clip_eps,
                                token_count=tokens)
        loss = loss + ppo.vf_coef * vf
        aux.update(value_loss=vf, value_clip_fraction=vf_aux["clip_fraction"])
    if ppo.ptx_coef > 0:
        ptx, _ = sft_nll(config, params, batch["ptx"], denominators["ptx"])
        loss = loss + ppo.ptx_coef * ptx
        aux["ptx_loss"] = ptx
    return loss, aux


def critic_loss(config: ModelConfig, ppo: PPOConfig, params: dict, batch: dict,
                denominators: dict | None = None, *, base: dict | None = None) -> tuple[Array, dict]:
    """A separate critic's clipped value loss × ``vf_coef``; ``batch``, ``denominators`` and ``base`` as in
    :func:`actor_loss`."""
    params = compose(base, params)
    traj: Trajectory = batch["traj"]
    tokens = valid_count(traj.loss_mask) if denominators is None else denominators["tokens"]
    values = response_values(config, params, traj.prompt, traj.prompt_mask, traj.response, traj.response_mask)
    vf, vf_aux = value_loss(values, traj.old_values, traj.returns, traj.loss_mask, clip_eps=ppo.value_clip_eps,
                            token_count=tokens)
    return ppo.vf_coef * vf, {"value_loss": vf, "value_clip_fraction": vf_aux["clip_fraction"]}


def update_denominators(batch: dict) -> dict:
    """What the PPO losses of a minibatch divide by, counted over the whole minibatch before it is split
    into micro-batches: ``tokens`` (response tokens in the loss, ``batch["traj"].loss_mask``), ``rows``
    (non-empty such responses) and, when ``batch`` has ``ptx``, ``ptx`` (:func:`jaxppo.sft.sft_denominators`)."""
    mask = batch["traj"].loss_mask
    counts = {"tokens": valid_count(mask), "rows": nonempty_rows(mask)}
    if "ptx" in batch:
        counts["ptx"] = sft_denominators(batch["ptx"])
    return counts


def make_update(actor_config: ModelConfig, ppo: PPOConfig, *, critic_config: ModelConfig | None = None):
    """Jitted ``update(actor_state, critic_state, traj, key, kl_coef, ptx, base) -> (actor, critic, metrics)``.

    ``critic_state`` is None for a shared critic; ``ptx`` is an SFT batch (see :mod:`jaxppo.sft`)
    used when ``ppo.ptx_coef > 0`` (else None); ``base`` the frozen weights the states' LoRA adapters
    and heads sit on (:func:`jaxppo.lora.compose`; not donated), None for full fine-tuning. Metrics are means over all minibatch steps, except
    ``first_max_abs_log_ratio``: |log ρ| on the first minibatch of the first epoch, which must be
    ~0 (the update recomputes exactly the rollout's old log-probs).
    """
    critic_config = critic_config or actor_config

    def minibatch_step(base, carry, minibatch):
        actor_loss_fn = functools.partial(actor_loss, actor_config, ppo, base=base)
        critic_loss_fn = functools.partial(critic_loss, critic_config, ppo, base=base)
        actor, critic, kl_coef, ptx = carry
        # The trajectory and the ptx demonstrations are both split into micro-batches; every term divides
        # by the whole minibatch's counts, so the split changes memory, not the loss or its gradient.
        batch = {"traj": minibatch, "ptx": ptx} if ppo.ptx_coef > 0 else {"traj": minibatch}
        denominators = update_denominators(batch)

        def actor_micro_loss(params, micro, denominators):
            return actor_loss_fn(params, {**micro, "kl_coef": kl_coef}, denominators)

        _, aux, grads = accumulate_gradients(actor_micro_loss, actor.params, batch, denominators,
                                             micro_batches=ppo.micro_batches, max_metrics=("max_abs_log_ratio",))
        aux["actor_grad_norm"] = optax.tree.norm(grads)
        stepped = actor.apply_gradients(grads=grads)
        if ppo.dynamic_sampling:  # a minibatch of dropped groups only has no loss: no step (Adam's momentum would move)
            stepped = jax.tree.map(lambda new, old: jnp.where(denominators["tokens"] > 0, new, old), stepped, actor)
        actor = stepped
        if ppo.critic_role == "separate":
            _, critic_aux, critic_grads = accumulate_gradients(
                critic_loss_fn, critic.params, {"traj": minibatch}, denominators, micro_batches=ppo.micro_batches)
            critic_aux["critic_grad_norm"] = optax.tree.norm(critic_grads)
            critic = critic.apply_gradients(grads=critic_grads)
            aux.update(critic_aux)
        return (actor, critic, kl_coef, ptx), aux

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(actor: TrainState, critic: TrainState | None, traj: Trajectory, key: Array, kl_coef, ptx=None,
               base=None):
        batch_size = traj.response.shape[0]
        if batch_size != ppo.batch_size:
            raise ValueError(f"trajectory batch {batch_size} != ppo.batch_size {ppo.batch_size}")

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, batch_size).reshape(ppo.minibatches, ppo.minibatch_size)
            minibatches = jax.tree.map(lambda x: x[order], traj)
            return jax.lax.scan(functools.partial(minibatch_step, base), carry, minibatches)

        carry = (actor, critic, jnp.asarray(kl_coef, jnp.float32), ptx)
        (actor, critic, _, _), aux = jax.lax.scan(epoch, carry, jax.random.split(key, ppo.epochs))
        actor, critic = constrain_tree((actor, critic))  # the layout they came in with (sharding.RULES)
        metrics = {k: jnp.mean(v) for k, v in aux.items()}
        metrics["max_abs_log_ratio"] = jnp.max(aux["max_abs_log_ratio"])
        metrics["first_max_abs_log_ratio"] = aux["max_abs_log_ratio"][0, 0]
        # cumulative count of minibatch steps skipped as non-finite: gradients, updates, params or moments (optim)
        metrics["actor_skipped_updates"] = skipped_updates(actor)
        if ppo.critic_role == "separate":
            metrics["critic_skipped_updates"] = skipped_updates(critic)
        return actor, critic, metrics

    return update


class PPOState(struct.PyTreeNode):
    """The trained side of PPO, donated and returned by every iteration.

    ``critic`` is None for a shared-trunk value head (it lives in the actor's params as
    ``value_head``) and for estimators that need no critic; ``kl`` is the KL controller's state.
    """

    actor: TrainState
    critic: TrainState | None
    kl: KLControlState


class FrozenRoles(struct.PyTreeNode):
    """The frozen side of PPO: the reference (KL anchor) and the reward model, as bare params stored
    in ``ppo.frozen_dtype``; ``reference`` is None when the run builds none (``ppo.builds_reference``:
    β = 0), ``reward`` when reward functions score the responses.

    With LoRA, ``base`` holds the frozen weights every role shares (the SFT policy) and each role
    holds only its own adapters and head (:func:`jaxppo.lora.compose`): the reference is ``{}`` (the
    base itself) or, after a refresh, a copy of the actor's adapters."""

    reference: dict | None
    reward: dict | None
    base: dict | None = None


def frozen_params(params: dict, mesh, *, dtype: str | None) -> dict:
    """A frozen role's params: own sharded buffers (never aliasing a donated train state) stored in
    ``dtype``, without a ``value_head`` (a refreshed shared-critic actor has one)."""
    params = {k: v for k, v in params.items() if k != "value_head"}
    return shard_tree(jax.tree.map(jnp.copy, cast_params(params, dtype)), mesh)


def frozen_roles(ppo: PPOConfig, mesh, *, reference: dict, reward: dict | None) -> FrozenRoles:
    """:class:`FrozenRoles` of :func:`frozen_params` in ``ppo.frozen_dtype``; no reference copy unless
    ``ppo.builds_reference``."""
    return FrozenRoles(frozen_params(reference, mesh, dtype=ppo.frozen_dtype) if ppo.builds_reference else None,
                       None if reward is None else frozen_params(reward, mesh, dtype=ppo.frozen_dtype))


def init_ppo(config: ModelConfig, ppo: PPOConfig, mesh, *, sft_params: dict, reward_params: dict | None,
             key: Array, lora_rank: int = 0, lora_targets: tuple[str, ...] = TARGETS) -> tuple[PPOState, FrozenRoles]:
    """The PPO roles built already sharded by :data:`jaxppo.sharding.RULES`, each with its own buffers.

    * actor: the SFT params (plus a zero-initialised ``value_head`` for ``ppo.critic="shared"``),
      AdamW with ``ppo.learning_rate``;
    * critic (only when the estimator needs one and ``ppo.critic="separate"``): the reward model's
      trunk and head (``critic_init="reward_model"``, InstructGPT) or the SFT trunk with a new value
      head (``"sft"``), with ``ppo.critic_learning_rate``;
    * KL controller at β = ``ppo.kl_coef``; frozen reference = SFT params (none when
      ``ppo.builds_reference`` is false), reward = ``reward_params``.

    With ``lora_rank > 0`` (``config.lora_scale`` set) the SFT params are the one frozen ``base``
    (:class:`FrozenRoles`) and each role holds its own params only: the actor fresh adapters (B = 0:
    it starts as the base), the critic fresh adapters and value head, or the reward model's adapters
    and head (``critic_init="reward_model"``; ``reward_params`` hold adapters on the same base);
    only they have optimizer state.
    """
    if lora_rank:
        return _init_lora_ppo(config, ppo, mesh, sft_params=sft_params, reward_params=reward_params, key=key,
                              rank=lora_rank, targets=lora_targets)
    actor_params = {k: v for k, v in sft_params.items() if k != "value_head"}
    critic = None
    if ppo.critic_role == "shared":
        actor_params["value_head"] = init_scalar_head(config, key, "value_head")
    elif ppo.critic_role == "separate":
        if ppo.critic_init == "reward_model":
            require(reward_params is not None, "ppo.critic_init", "'reward_model' needs a reward model; use 'sft'")
            critic_params = {k: v for k, v in reward_params.items() if k != "reward_head"}
            critic_params["value_head"] = reward_params["reward_head"]
        else:
            critic_params = {k: v for k, v in sft_params.items() if k != "lm_head"}
            critic_params["value_head"] = init_scalar_head(config, key, "value_head")
        tx = make_optimizer(learning_rate=ppo.critic_learning_rate or ppo.learning_rate,
                            max_grad_norm=ppo.max_grad_norm)
        critic = init_sharded(lambda p: create_train_state(p, tx), mesh, critic_params)
    tx = make_optimizer(learning_rate=ppo.learning_rate, max_grad_norm=ppo.max_grad_norm)
    actor = init_sharded(lambda p: create_train_state(p, tx), mesh, actor_params)
    kl = replicate(init_kl_control(kl_coef=ppo.kl_coef), mesh)  # updated on device from the KL metric
    return PPOState(actor, critic, kl), frozen_roles(ppo, mesh, reference=sft_params, reward=reward_params)


def _init_lora_ppo(config: ModelConfig, ppo: PPOConfig, mesh, *, sft_params: dict, reward_params: dict | None,
                   key: Array, rank: int, targets: tuple[str, ...]) -> tuple[PPOState, FrozenRoles]:
    """:func:`init_ppo` with LoRA roles on one frozen base."""
    require(config.lora_scale is not None, "model.lora_scale", "LoRA roles need the adapters' scale (α / r)")
    require(ppo.frozen_dtype is None, "ppo.frozen_dtype", "with LoRA the frozen roles share the actor's base")
    actor_key, critic_key, head_key = jax.random.split(key, 3)
    base = shard_tree(base_params(sft_params), mesh)
    actor_params = {"lora": init_adapters(config, actor_key, rank=rank, targets=targets)}
    if ppo.critic_role == "shared":
        actor_params["value_head"] = init_scalar_head(config, head_key, "value_head")
    critic = None
    if ppo.critic_role == "separate":
        if ppo.critic_init == "reward_model":
            require(reward_params is not None, "ppo.critic_init", "'reward_model' needs a reward model; use 'sft'")
            critic_params = {k: v for k, v in role_params(reward_params).items() if k != "reward_head"}
            critic_params["value_head"] = reward_params["reward_head"]
        else:
            critic_params = {"lora": init_adapters(config, critic_key, rank=rank, targets=targets),
                             "value_head": init_scalar_head(config, head_key, "value_head")}
        tx = make_optimizer(learning_rate=ppo.critic_learning_rate or ppo.learning_rate,
                            max_grad_norm=ppo.max_grad_norm)
        critic = init_sharded(lambda p: create_train_state(p, tx), mesh, critic_params)
    tx = make_optimizer(learning_rate=ppo.learning_rate, max_grad_norm=ppo.max_grad_norm)
    actor = init_sharded(lambda p: create_train_state(p, tx), mesh, actor_params)
    kl = replicate(init_kl_control(kl_coef=ppo.kl_coef), mesh)
    reference = None
    if ppo.builds_reference:  # the base itself; refreshed references are copies of the actor's adapters
        reference = frozen_params(role_params(actor.params), mesh, dtype=None) if ppo.ref_refresh_every else {}
    reward = None if reward_params is None else frozen_params(role_params(reward_params), mesh, dtype=None)
    return PPOState(actor, critic, kl), FrozenRoles(reference, reward, base)


def ppo_iteration(rollout, update, kl_update, state: PPOState, frozen: FrozenRoles, prompt: Array,
                  prompt_mask: Array, sample_key: Array, update_key: Array, ptx=None):
    """One PPO iteration — rollout, update, KL controller — as ``(state, samples, metrics)``;
    ``kl_update(kl_state, kl) -> kl_state`` is the controller's step (:func:`update_kl_control` with
    its scalars bound).

    The one body of both forms of :func:`make_iteration`: traced into one XLA program (fused), or
    called from the host with the jitted ``rollout`` and ``update`` as two programs (unfused).
    """
    critic_params = None if state.critic is None else state.critic.params
    base = frozen.base  # LoRA: every role is its own params on the one frozen base
    traj, metrics = rollout(*(compose(base, role) for role in (state.actor.params, critic_params, frozen.reference,
                                                               frozen.reward)),
                            prompt, prompt_mask, sample_key, state.kl.kl_coef)
    actor, critic, update_metrics = update(state.actor, state.critic, traj, update_key, state.kl.kl_coef, ptx, base)
    kl = kl_update(state.kl, metrics["kl"])
    samples = {"prompt": traj.prompt, "prompt_mask": traj.prompt_mask, "response": traj.response,
               "response_mask": traj.response_mask}
    return PPOState(actor, critic, kl), samples, {**metrics, **update_metrics}


def make_iteration(actor_config: ModelConfig, ppo: PPOConfig, *, critic_config: ModelConfig | None = None,
                   reward_config: ModelConfig | None = None, reward_pooling: str = "last", score_fn=None,
                   gold_fn=None, fused: bool | None = None):
    """``iterations(state, frozen, prompts, prompt_masks, sample_keys, update_keys, ptx) -> (state,
    samples, metrics)``: K PPO iterations of :func:`ppo_iteration` (rollout, scoring, rewards,
    estimator, epochs × minibatches of updates, the KL controller).

    ``fused`` (default ``ppo.fused``): the K iterations are a ``lax.scan`` in **one XLA program**
    (the purejaxrl design; the host only logs and checkpoints), traced once per K and shapes, the
    state donated. Unfused (debugging): the same body called from the host K times, with a jitted
    rollout and a jitted update.

    Every per-iteration input has a leading axis K: ``prompts`` / ``prompt_masks`` ``[K, B, P]``,
    ``sample_keys`` / ``update_keys`` ``[K]``, ``ptx`` (an SFT batch per iteration when
    ``ppo.ptx_coef > 0``, else None) ``[K, ...]``. Returns the state after the K iterations,
    ``samples`` (``prompt``, ``prompt_mask``, ``response``, ``response_mask``, each ``[K, B, ...]``,
    for host-side rewards) and ``metrics`` ``{name: [K]}``; ``score_fn`` / ``gold_fn`` as in
    :func:`jaxppo.rollout.make_rollout`.
    """
    rollout = make_rollout(actor_config, ppo, critic_config=critic_config, reward_config=reward_config,
                           reward_pooling=reward_pooling, score_fn=score_fn, gold_fn=gold_fn)
    update = make_update(actor_config, ppo, critic_config=critic_config)
    kl_update = functools.partial(update_kl_control, n_steps=ppo.batch_size, target=ppo.kl_target,
                                  horizon=ppo.kl_horizon)
    body = functools.partial(ppo_iteration, rollout, update, kl_update)

    @functools.partial(jax.jit, donate_argnums=0)
    def fused_iterations(state, frozen, prompts, prompt_masks, sample_keys, update_keys, ptx=None):
        def step(state, xs):
            state, samples, metrics = body(state, frozen, *xs)
            return state, (samples, metrics)

        xs = (prompts, prompt_masks, sample_keys, update_keys, ptx)
        state, (samples, metrics) = jax.lax.scan(step, state, xs)
        return state, samples, metrics

    def unfused_iterations(state, frozen, prompts, prompt_masks, sample_keys, update_keys, ptx=None):
        outputs = []
        for k in range(prompts.shape[0]):
            xs = jax.tree.map(lambda x: x[k], (prompts, prompt_masks, sample_keys, update_keys, ptx))
            state, samples, metrics = body(state, frozen, *xs)
            outputs.append((samples, metrics))
        samples, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
        return state, samples, metrics

    return fused_iterations if (ppo.fused if fused is None else fused) else unfused_iterations
