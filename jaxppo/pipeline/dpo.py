"""Stage 3 of ``method="dpo"``: the DPO family (:mod:`jaxppo.dpo`) on preference pairs, offline or online.

The pairs are the reward model's preference data (:func:`jaxppo.pipeline.reward.preference_data`: the
same checkpointed labelled samples of the SFT policy an RL run's reward model trains on, or the task's
preferences file), split into training and held-out pairs as the reward model splits them. The frozen
reference is the SFT policy (with LoRA: the base without adapters); its log-probs of every pair are
computed once, in jitted batches, and stored with the pairs. Online DPO (``dpo.online_every > 0``)
labels two fresh samples of the current policy per prompt (gold oracle or reward model) every
``online_every`` steps and trains on those; checkpoints hold the policy's state and the pairs it is
training on, so a resumed run is the uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxppo import preferences
from jaxppo.data import batch_indices
from jaxppo.dpo import PAIR_KEYS, make_dpo_eval, make_dpo_step, reference_logprobs
from jaxppo.errors import InputError
from jaxppo.lora import base_params, compose
from jaxppo.models.config import ModelConfig
from jaxppo.optim import check_updates_applied, create_train_state, make_optimizer
from jaxppo.pipeline.context import (
    STEP_LOG_EVERY, RunContext, base_meta, check_base, lora_dropout, new_adapters, resume, sample, save, score,
)
from jaxppo.pipeline.reward import RewardModel, labelled_samples, preference_data
from jaxppo.rng import stream_seed
from jaxppo.sharding import init_sharded, shard_batch, to_host


@functools.cache
def _reference_fn(model: ModelConfig):
    return jax.jit(functools.partial(reference_logprobs, model))


def with_reference(ctx: RunContext, reference: dict, data: dict) -> dict:
    """``data`` (host arrays) with the reference's ``ref_chosen`` / ``ref_rejected`` of every pair, in
    batches of ``eval_batch_size`` (the last one padded, so one shape compiles); data unchanged when the
    loss is reference-free."""
    if not ctx.config.dpo.needs_reference:
        return data
    fn, n, size = _reference_fn(ctx.config.model), data["prompt"].shape[0], ctx.config.eval_batch_size
    out = []
    for start in range(0, n, size):
        rows = np.minimum(np.arange(start, start + size), n - 1)
        batch = shard_batch({k: data[k][rows] for k in PAIR_KEYS}, ctx.mesh)
        out.append(jax.tree.map(to_host, fn(reference, batch)))
    return {**data, **{k: np.concatenate([o[k] for o in out])[:n] for k in out[0]}}


def online_pairs(ctx: RunContext, policy: dict, reference: dict, reward: RewardModel | None, step: int) -> dict:
    """Pairs of two samples of ``policy`` for each of ``dpo.online_prompts`` fresh prompts, labelled by the
    hidden gold reward with the task's Bradley–Terry noise (``online_label="gold"``, the oracle setting)
    or by ``reward`` (the higher score is chosen; ties dropped), with the reference's log-probs; host arrays."""
    d = ctx.config.dpo
    prompt, prompt_mask = ctx.task.prompts("dpo-online", step, d.online_prompts)
    if d.online_label == "gold":
        data = preferences.usable(labelled_samples(ctx, policy, prompt, prompt_mask, "dpo-online", step))
        data = {k: v for k, v in data.items() if k not in preferences.GOLD_LABELS}
    else:
        (a, a_mask), (b, b_mask) = (map(to_host, sample(ctx, policy, prompt, prompt_mask, ctx.key("dpo-online", 2 * step + j)))
                                    for j in (0, 1))
        prompt, prompt_mask = to_host(prompt), to_host(prompt_mask)
        score_a, score_b = (to_host(score(ctx, reward.params, prompt, prompt_mask, r, m)) for r, m in ((a, a_mask), (b, b_mask)))
        first = (score_a > score_b)[:, None]
        keep = score_a != score_b
        data = {"prompt": prompt, "prompt_mask": prompt_mask,
                "chosen": np.where(first, a, b), "chosen_mask": np.where(first, a_mask, b_mask),
                "rejected": np.where(first, b, a), "rejected_mask": np.where(first, b_mask, a_mask)}
        data = {k: np.asarray(v)[keep] for k, v in data.items()}
    return with_reference(ctx, reference, {k: np.asarray(data[k]) for k in PAIR_KEYS})


def _batch_rows(ctx: RunContext, n: int, step: int, round_: int) -> np.ndarray:
    """Rows of step ``step``'s batch of the current ``n`` pairs (online round ``round_``; 0: the offline
    pairs): shuffled epochs of the round's pairs from its first step on, a pure function of the seed,
    the round and the step."""
    d = ctx.config.dpo
    if n < d.batch_size:
        raise InputError(f"dpo: online round {round_} kept {n} pairs (ties dropped), fewer than dpo.batch_size="
                         f"{d.batch_size}; raise dpo.online_prompts")
    first = round_ * d.online_every  # the round's first step
    return batch_indices(n, d.batch_size, seed=stream_seed(ctx.config.seed, f"dpo-batches-{round_}"), step=step - first)


def dpo_stage(ctx: RunContext, sft_params: dict, reward: RewardModel | None = None) -> dict:
    """The policy after ``dpo.steps`` of the configured DPO-family loss from the SFT policy (the frozen
    reference); ``reward``: the reward model that labels online pairs (``online_label="reward_model"``).

    With LoRA (``lora.rank > 0``) the policy is LoRA adapters on the SFT params as the frozen base, the
    reference is that base, checkpoints hold the adapters with the base's digest, and the returned
    params are ``{**base, "lora": …}``."""
    c, d = ctx.config, ctx.config.dpo
    if d.online_every and d.online_label == "reward_model" and reward is None:
        raise ValueError("dpo_stage: dpo.online_label='reward_model' needs the reward model that labels the pairs")
    base, params = None, sft_params
    if c.lora.rank:
        base, params = base_params(sft_params), new_adapters(ctx, "dpo-lora")
    reference = sft_params  # the SFT policy (with LoRA: the base, which is the merged SFT policy)
    tx = make_optimizer(learning_rate=d.learning_rate, warmup_steps=d.warmup_steps)
    state = init_sharded(lambda p: create_train_state(p, tx), ctx.mesh, params)
    train, held_out, _ = preferences.split(preference_data(ctx, sft_params), eval_fraction=c.reward_model.eval_fraction,
                                           batch_size=d.batch_size)
    recorded = base_meta(ctx, base)
    step_fn = make_dpo_step(c.model, d, micro_batches=d.micro_batches)
    if base is not None:
        step_fn = functools.partial(step_fn, base=base, **lora_dropout(ctx, "dpo-dropout"))
    evaluate = make_dpo_eval(c.model, d)

    start, items, meta = resume(ctx, "dpo", {"state": state, "data": ...})
    check_base(meta, recorded, stage="dpo")
    if items is not None:
        state, data = items["state"], {k: np.asarray(v) for k, v in items["data"].items()}
        if meta.get("done"):
            return compose(base, state.params)
    else:
        data = with_reference(ctx, reference, train)
    held_out = with_reference(ctx, reference, held_out)
    every = c.checkpoint.every_steps
    bar = ctx.logger.progress(range(start, d.steps), desc=f"DPO ({d.loss})")
    for i in bar:
        if d.online_every and i > 0 and i % d.online_every == 0:
            data = online_pairs(ctx, compose(base, state.params), reference, reward, i)
            ctx.logger.log("dpo_online", i, {"new_pairs": data["prompt"].shape[0]})
        round_ = i // d.online_every if d.online_every else 0
        rows = _batch_rows(ctx, data["prompt"].shape[0], i, round_)
        state, metrics = step_fn(state, shard_batch(preferences.rows(data, rows), ctx.mesh))
        if i % STEP_LOG_EVERY == 0 or i == d.steps - 1:
            bar.set_postfix(ctx.logger.log("dpo", i, jax.device_get(metrics)))
        done = i + 1 == d.steps
        if done:
            check_updates_applied(state, stage="dpo", learning_rate_field="dpo.learning_rate",
                                  learning_rate=d.learning_rate)
            result = {f"eval_{k}": float(v) for k, v in jax.device_get(
                evaluate(compose(base, state.params), shard_batch(held_out, ctx.mesh))).items()}
            ctx.logger.log("dpo_eval", d.steps, {**result, "num_train": train["prompt"].shape[0],
                                                 "num_eval": held_out["prompt"].shape[0]})
        if (i + 1) % every == 0 or done:
            save(ctx, "dpo", i + 1, {"state": state, "data": data}, {"done": done, **recorded})
    bar.close()
    return compose(base, state.params)
