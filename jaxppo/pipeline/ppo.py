"""Stage 3, PPO: the host loop around :func:`jaxppo.ppo.make_iteration` — data in, metrics and
checkpoints out, online reward-model and reference refreshes between calls.

Each call runs up to ``ppo.iterations_per_call`` iterations in one XLA program (never past host
work: a checkpoint, a refresh); metrics reach the host in one transfer per call, and only when an
iteration in it logs (with the samples, for a task whose gold reward reads decoded text; the
embedded task's gold reward is computed inside the program).

Updates skipped as non-finite (:func:`jaxppo.optim.skip_nonfinite_steps`) are checked at those
transfers: the skip counts of calls that log nothing come with the next one that does. An
iteration whose updates were all skipped logs a warning; a role that skipped every update stops
the stage (:func:`jaxppo.optim.check_updates_applied`).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.lora import compose, role_params
from jaxppo.optim import check_updates_applied, skipped_updates
from jaxppo.pipeline.context import RunContext, base_meta, check_base, resume, save
from jaxppo.pipeline.reward import RewardModel, refresh_reward_model
from jaxppo.ppo import frozen_params, init_ppo, make_iteration
from jaxppo.rewards import make_score_fn
from jaxppo.rollout import group_prompts
from jaxppo.sharding import shard_batch, to_host

SAMPLE_KEYS = ("prompt", "prompt_mask", "response", "response_mask")
_log = logging.getLogger(__name__)


def iterations_in_call(it: int, *, iterations: int, per_call: int, host_every: tuple[int, ...]) -> int:
    """How many iterations from ``it`` on run in one call: up to ``per_call``, never past
    ``iterations`` nor past a multiple of any positive period in ``host_every`` (host work)."""
    stop = iterations
    for every in host_every:
        if every > 0:
            stop = min(stop, (it // every + 1) * every)
    return max(1, min(per_call, stop - it))


def warn_skipped_iterations(calls: list, skipped: dict, *, updates: int) -> dict:
    """Logs a warning for each iteration in which a role skipped all ``updates`` of its updates.

    ``calls``: ``(first iteration, {role: [K] cumulative skip counts after each iteration})`` in
    order, host arrays of the ``*_skipped_updates`` metrics; ``skipped``: each role's count before
    them. Returns the counts after them.
    """
    for first, counts in calls:
        for role, cumulative in counts.items():
            per_iteration = np.diff(np.asarray(cumulative), prepend=skipped[role])
            for j in np.flatnonzero(per_iteration == updates):
                _log.warning(f"ppo iteration {first + j}: all {updates} {role} updates skipped as non-finite "
                             f"(NaN/inf gradients, updates or params); the {role} did not change")
            skipped = {**skipped, role: int(cumulative[-1])}
    return skipped


def _stacked(batches: list):
    """K sharded per-iteration batches stacked on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def reward_score_fn(ctx: RunContext):
    """The rollout's ``score_fn`` of the run's reward functions (:mod:`jaxppo.rewards`), or None: the reward model."""
    c = ctx.config
    if not c.reward_functions:
        return None
    functions = {name: ctx.task.reward_functions[name] for name in c.reward_functions}
    return make_score_fn(functions, c.reward_weights, codec=ctx.task.codec)


def iteration_prompts(ctx: RunContext, it: int):
    """Iteration ``it``'s rollout prompts, sharded: each prompt ``group_size`` times in consecutive rows
    (a group), ``oversample`` × the batch's groups."""
    ppo = ctx.config.ppo
    return shard_batch(group_prompts(*ctx.task.prompts("ppo", it, ppo.prompts_per_batch), group_size=ppo.group_size),
                       ctx.mesh)


def ppo_stage(ctx: RunContext, sft_params: dict, reward: RewardModel | None) -> tuple[dict, RewardModel | None]:
    """RL (PPO or a critic-free estimator) against the reward model, or the reward functions when
    ``reward`` is None; returns the final actor params and the (refreshed) reward model.

    With LoRA (``lora.rank > 0``) every role is its own adapters and head on the SFT params as one
    frozen base (:func:`jaxppo.ppo.init_ppo`); checkpoints hold the roles only, with the base's
    digest in their meta (a resume on another base stops), and the returned actor is the base with
    its adapters (``{**base, "lora": …}``: :func:`jaxppo.lora.merge` gives the plain model)."""
    c, ppo = ctx.config, ctx.config.ppo
    online, refresh = c.reward_model.online_every, ppo.ref_refresh_every > 0
    state, frozen = init_ppo(c.model, ppo, ctx.mesh, sft_params=sft_params,
                             reward_params=None if reward is None else reward.params, key=ctx.key("value-head"),
                             lora_rank=c.lora.rank, lora_targets=c.lora.targets)
    recorded = base_meta(ctx, frozen.base)

    def own(params):  # a role's own params: with LoRA its adapters and head, not the shared base
        return params if frozen.base is None else role_params(params)

    def frozen_reward(reward):  # the frozen reward role of a (refreshed) reward model
        return frozen_params(own(reward.params), ctx.mesh, dtype=ppo.frozen_dtype)

    def checkpoint_items(state, frozen, reward):
        return {"actor": state.actor, "critic": state.critic, "kl": state.kl,
                "reference": frozen.reference if refresh else None,
                **({"rm_state": reward.state, "rm_params": own(reward.params), "rm_data": reward.train}
                   if online else {})}

    start, items, meta = resume(ctx, "ppo", {**checkpoint_items(state, frozen, reward),
                                             **({"rm_data": ...} if online else {})})
    check_base(meta, recorded, stage="ppo")
    if items is not None:
        state = state.replace(actor=items["actor"], critic=items.get("critic"), kl=items["kl"])
        if refresh:
            frozen = frozen.replace(reference=items["reference"])
        if online:
            reward = reward._replace(params=compose(frozen.base, items["rm_params"]), state=items["rm_state"],
                                     train={k: np.asarray(v) for k, v in items["rm_data"].items()})
            frozen = frozen.replace(reward=frozen_reward(reward))
    iterate = make_iteration(c.model, ppo, reward_pooling=c.reward_model.pooling, score_fn=reward_score_fn(ctx),
                             gold_fn=ctx.task.gold_fn)
    roles = {"actor": ("ppo.learning_rate", ppo.learning_rate)}
    if state.critic is not None:
        roles["critic"] = ("ppo.critic_learning_rate" if ppo.critic_learning_rate else "ppo.learning_rate",
                           ppo.critic_learning_rate or ppo.learning_rate)
    # skip counts, checked per iteration at the host syncs of logged calls (the last call logs)
    skipped = jax.device_get({role: skipped_updates(getattr(state, role)) for role in roles})
    unchecked = []  # (first iteration, {role: cumulative skip counts [K]}) of calls since the last check
    bar = ctx.logger.progress(ppo.iterations - start, desc=ppo.estimator.upper() if ppo.estimator != "gae" else "PPO")
    it = start
    while it < ppo.iterations:
        if online and it > 0 and it % online == 0:
            reward = refresh_reward_model(ctx, it, compose(frozen.base, state.actor.params), reward)
            frozen = frozen.replace(reward=frozen_reward(reward))
        k = iterations_in_call(it, iterations=ppo.iterations, per_call=ppo.iterations_per_call,
                               host_every=(c.checkpoint.every_iterations, online, ppo.ref_refresh_every))
        prompts = [iteration_prompts(ctx, it + j) for j in range(k)]
        ptx = None
        if ppo.ptx_coef > 0:
            # demonstrations for the iteration's prompts; grouped / over-sampled batches repeat prompts: own ones
            same = ppo.group_size == 1 and ppo.oversample == 1
            ptx = _stacked([shard_batch(ctx.task.demonstrations("ppo-ptx", it + j, ppo.batch_size,
                                                                prompts[j] if same else None), ctx.mesh)
                            for j in range(k)])
        state, samples, metrics = iterate(
            state, frozen, *_stacked(prompts), jnp.stack([ctx.key("ppo-sample", it + j) for j in range(k)]),
            jnp.stack([ctx.key("ppo-update", it + j) for j in range(k)]), ptx)
        unchecked.append((it, {role: metrics[f"{role}_skipped_updates"] for role in roles}))
        logged = [j for j in range(k) if (it + j) % c.log_every == 0 or it + j == ppo.iterations - 1]
        if logged:
            metrics, unchecked = jax.device_get((metrics, unchecked))  # the host sync of the call
            skipped = warn_skipped_iterations(unchecked, skipped, updates=ppo.epochs * ppo.minibatches)
            unchecked = []
            if ctx.task.gold_fn is None:  # a gold reward of decoded text: the samples come to the host too
                samples = jax.tree.map(to_host, samples)
        for j in logged:
            row = {"iteration": it + j, **{name: v[j] for name, v in metrics.items()}}
            if ctx.task.gold_fn is None:
                row["gold_reward"] = np.mean(ctx.task.gold(*(samples[name][j] for name in SAMPLE_KEYS)))
            row = ctx.logger.log("ppo", it + j, row)
            bar.set_postfix({name: row[name] for name in ("gold_reward", "proxy_reward", "kl") if name in row})
        it += k
        bar.update(k)
        if refresh and it % ppo.ref_refresh_every == 0:
            frozen = frozen.replace(reference=frozen_params(state.actor.params, ctx.mesh, dtype=ppo.frozen_dtype))
        done = it == ppo.iterations
        if done:  # before the checkpoint that marks the stage done
            for role, (field, lr) in roles.items():
                check_updates_applied(getattr(state, role), stage=f"ppo ({role})", learning_rate_field=field,
                                      learning_rate=lr)
        if it % c.checkpoint.every_iterations == 0 or done:
            save(ctx, "ppo", it, checkpoint_items(state, frozen, reward), {"done": done, **recorded})
    bar.close()
    return compose(frozen.base, {k: v for k, v in state.actor.params.items() if k != "value_head"}), reward
