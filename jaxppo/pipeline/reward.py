"""Stage 2, the reward model: preference data, training (full or linear probe), normalisation, and
the online refreshes of iterated RLHF (Bai et al. 2022, §4.5) that the PPO stage calls."""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import numpy as np

from jaxppo import preferences
from jaxppo.data import batch_indices
from jaxppo.lora import base_params, compose
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.optim import check_updates_applied, create_train_state, make_optimizer, skipped_updates
from jaxppo.pipeline.context import RunContext, base_meta, fit, is_done, lora_dropout, new_adapters, sample, save, score
from jaxppo.pipeline_config import RewardModelConfig
from jaxppo.ppo import frozen_params
from jaxppo.reward_model import (
    features_of, fit_probe, head_on_raw, head_on_standardized, list_gold_accuracy, list_scores,
    make_reward_eval, make_reward_step, normalize_reward_head, pair_gold_accuracy, pair_scores,
    standardize_features,
)
from jaxppo.rng import stream_seed
from jaxppo.sharding import init_sharded, shard_batch, shard_tree, to_host

_log = logging.getLogger(__name__)


class RewardModel(NamedTuple):
    """What the reward-model stage hands to PPO."""

    params: dict  # normalised (scores of SFT samples: mean 0, std 1): the frozen reward role
    state: object  # the train state (unnormalised params, optimizer): online refreshes continue it
    train: dict  # the preference pairs / lists it trained on (grown by online refreshes)
    result: dict  # held-out evaluation
    norm_samples: tuple | None  # the SFT samples every normalisation of the run uses (None: normalize=False)
    base: dict | None = None  # LoRA: the frozen base that ``state``'s adapters and head sit on (``params`` include it)


class RewardFns(NamedTuple):
    """The jitted functions of one reward-model config, built once per run (one trace each)."""

    step: object
    evaluate: object
    pair_scores: object
    list_scores: object
    features: object


@functools.cache
def reward_fns(model: ModelConfig, rm: RewardModelConfig) -> RewardFns:
    return RewardFns(
        make_reward_step(model, objective=rm.objective, use_margin=rm.use_margin, micro_batches=rm.micro_batches,
                         train_trunk=rm.train_trunk, pooling=rm.pooling),
        make_reward_eval(model, objective=rm.objective, use_margin=rm.use_margin, pooling=rm.pooling),
        jax.jit(functools.partial(pair_scores, model, pooling=rm.pooling)),
        jax.jit(functools.partial(list_scores, model, pooling=rm.pooling)),
        jax.jit(functools.partial(features_of, model, objective=rm.objective, pooling=rm.pooling)),
    )


def train_step(ctx: RunContext, base: dict | None):
    """The run's jitted reward-model train step, as the stage and its online refreshes call it: with
    LoRA on the frozen ``base`` (and with LoRA dropout when it is on); without, the step as it is (one
    trace: jit tells a keyword argument from its absence)."""
    step = reward_fns(ctx.config.model, ctx.config.reward_model).step
    return step if base is None else functools.partial(step, base=base, **lora_dropout(ctx, "rm-dropout"))


def _batches(ctx: RunContext, stream: str, n: int):
    """Rows of batch i of an endless stream of shuffled epochs of ``n`` rows (a pure function of i)."""
    seed = stream_seed(ctx.config.seed, stream)
    return lambda i: batch_indices(n, ctx.config.reward_model.batch_size, seed=seed, step=i)


# ------------------------------------------------------------------------------------- preference data


def labelled_samples(ctx: RunContext, params: dict, prompt, prompt_mask, stream: str, step: int) -> dict:
    """K responses per prompt sampled from the policy ``params``, labelled by the hidden gold reward
    with noise (:mod:`jaxppo.preferences`: pairs, or rankings for Plackett–Luce); host arrays."""
    rm = ctx.config.reward_model
    k = 2 if rm.objective == "bradley_terry" else rm.list_size
    responses, masks, golds = [], [], []
    for j in range(k):
        response, mask = map(to_host, sample(ctx, params, prompt, prompt_mask, ctx.key(f"{stream}-samples", step * k + j)))
        responses.append(response)
        masks.append(mask)
        golds.append(ctx.task.gold(to_host(prompt), to_host(prompt_mask), response, mask))
    key, beta = ctx.key(f"{stream}-labels", step), ctx.task.preference_beta
    if k == 2:
        data = preferences.label_pairs(key, prompt, prompt_mask, responses, masks, golds, beta=beta,
                                       drop_ties=rm.drop_ties)
    else:
        data = preferences.label_rankings(key, prompt, prompt_mask, responses, masks, golds, beta=beta)
    return {name: np.asarray(v) for name, v in data.items()}  # host arrays: batches are sharded per step


def preference_data(ctx: RunContext, sft_params: dict) -> dict:
    """The task's preference file, or SFT-policy samples labelled by the hidden gold reward (sampled
    once and checkpointed: sampling is the expensive part)."""
    from_file = ctx.task.preference_file()
    if from_file is not None:
        return dict(from_file)
    ckpt = ctx.checkpoints.get("preference_data")
    if ckpt is not None and ckpt.latest_step() is not None:
        data, _ = ckpt.restore(ckpt.latest_step(), {"data": ...})
        return {k: np.asarray(v) for k, v in data["data"].items()}
    prompt, prompt_mask = ctx.task.prompts("rm", 0, ctx.config.reward_model.num_prompts)
    data = labelled_samples(ctx, sft_params, prompt, prompt_mask, "rm", 0)
    if ckpt is not None:
        ckpt.save(0, {"data": data}, {"done": True})
    return data


def gold_accuracy(ctx: RunContext, params: dict, data: dict, labels: dict) -> dict:
    """Agreement of the reward model with the hidden gold order on the pairs it strictly orders."""
    fns = reward_fns(ctx.config.model, ctx.config.reward_model)
    if "gold_diff" in labels:
        chosen, rejected = map(to_host, fns.pair_scores(params, shard_batch(data, ctx.mesh)))
        return {"gold_accuracy": pair_gold_accuracy(chosen, rejected, labels["gold_diff"])}
    if "gold" in labels:
        return {"gold_accuracy": list_gold_accuracy(to_host(fns.list_scores(params, shard_batch(data, ctx.mesh))),
                                                    labels["gold"])}
    return {}


# -------------------------------------------------------------------------------------------- training


def to_host_tree(tree):
    return jax.tree.map(to_host, tree)


def _features(ctx: RunContext, params: dict, data: dict) -> dict:
    """Pooled trunk features of all preference rows, in batches of the reward model's batch size
    (the last one padded, so one shape compiles); host arrays."""
    fns = reward_fns(ctx.config.model, ctx.config.reward_model)
    n, size = data["prompt"].shape[0], ctx.config.reward_model.batch_size
    out = []
    for start in ctx.logger.progress(range(0, n, size), desc="RM features"):
        rows = np.minimum(np.arange(start, start + size), n - 1)
        out.append(to_host_tree(fns.features(params, shard_batch(preferences.rows(data, rows), ctx.mesh))))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *out)


def _stage_lr(rm: RewardModelConfig) -> dict:
    """The stage and learning rate an error about non-finite updates names."""
    return {"stage": "reward_model", "learning_rate_field": "reward_model.learning_rate",
            "learning_rate": rm.learning_rate}


def _fit_probe(ctx: RunContext, state, train: dict, base: dict | None):
    """``train_trunk=False``: the head trains on standardised trunk features computed once
    (:func:`jaxppo.reward_model.fit_probe`; same steps, batches and optimizer as the head-only step),
    then the standardisation is folded back into the head so it scores raw features. The returned
    state's optimizer state is the initial one."""
    rm = ctx.config.reward_model
    standard, mu, sigma = standardize_features(_features(ctx, compose(base, state.params), train))
    head = head_on_standardized(to_host_tree(state.params["reward_head"]), mu, sigma)
    batch_at = _batches(ctx, "rm-batches", train["prompt"].shape[0])
    rows = np.stack([batch_at(i) for i in range(rm.steps)])
    head, metrics = fit_probe(create_train_state(head, state.tx), standard, rows, objective=rm.objective,
                              use_margin=rm.use_margin)
    check_updates_applied(head, **_stage_lr(rm))
    ctx.logger.log("reward_model", rm.steps, jax.device_get(metrics))
    trained = shard_tree({"reward_head": head_on_raw(to_host_tree(head.params), mu, sigma)}, ctx.mesh)
    return state.replace(step=head.step, params={**state.params, **trained})


def normalized(ctx: RunContext, state_params: dict, norm_samples: tuple | None, base: dict | None = None) -> dict:
    """Frozen reward params (own buffers) whose scores of the SFT samples have mean 0 and std 1; with
    ``base`` (LoRA) the reward model's own params (adapters, head), scored on it."""
    params = frozen_params(state_params, ctx.mesh, dtype=None)
    if norm_samples is None:
        return params
    return normalize_reward_head(params, score(ctx, compose(base, params), *norm_samples))


def _norm_samples(ctx: RunContext, sft_params: dict) -> tuple | None:
    """The SFT samples on the evaluation prompts that every normalisation of the run scores."""
    if not ctx.config.reward_model.normalize:
        return None
    prompt, prompt_mask = ctx.task.eval_prompts()
    return (prompt, prompt_mask, *sample(ctx, sft_params, prompt, prompt_mask, ctx.key("rm-norm")))


def reward_model_stage(ctx: RunContext, sft_params: dict) -> RewardModel:
    """Train the reward model on preference data, evaluate it on held-out pairs, normalise it.

    With LoRA (``lora.rank > 0``) the reward model is adapters (none for a linear probe) and a head
    on the SFT params as a frozen base: only those train and checkpoint (with the base's digest), and
    the returned params are ``{**base, "lora": …, "reward_head": …}`` (the base's buffers, not a copy)."""
    c, rm = ctx.config, ctx.config.reward_model
    base = None
    if c.lora.rank:  # the SFT model is the frozen base; the reward model trains its own adapters and head
        base = base_params(sft_params)
        params = new_adapters(ctx, "rm-lora") if rm.train_trunk else {}
    elif rm.init == "sft":  # the InstructGPT recipe: the SFT model's trunk
        params = {k: v for k, v in sft_params.items() if k != "lm_head"}
    else:  # "scratch": a freshly initialised trunk of the same architecture
        params = {k: v for k, v in init_params(c.model, ctx.key("rm-init")).items() if k != "lm_head"}
    params["reward_head"] = init_scalar_head(c.model, ctx.key("rm-head"), "reward_head")
    tx = make_optimizer(learning_rate=rm.learning_rate, warmup_steps=rm.warmup_steps)
    state = init_sharded(lambda p: create_train_state(p, tx), ctx.mesh, params)
    fns = reward_fns(c.model, rm)
    train, held_out, labels = preferences.split(preference_data(ctx, sft_params), eval_fraction=rm.eval_fraction,
                                                batch_size=rm.batch_size)
    recorded = base_meta(ctx, base)
    if is_done(ctx, "reward_model"):  # resumed: online refreshes still need the normalisation samples
        state, done, meta = fit(ctx, "reward_model", state, None, None, rm.steps, {"output": params}, recorded)
        norm_samples = _norm_samples(ctx, sft_params) if rm.online_every else None
        return RewardModel(compose(base, done["output"]), state, train, meta["result"], norm_samples, base)
    norm_samples = _norm_samples(ctx, sft_params)
    n_train = train["prompt"].shape[0]
    if rm.train_trunk:
        batch_at = _batches(ctx, "rm-batches", n_train)
        state, _, _ = fit(ctx, "reward_model", state, train_step(ctx, base),
                          lambda i: preferences.rows(train, batch_at(i)), rm.steps, recorded=recorded)
        check_updates_applied(state, **_stage_lr(rm))
    else:
        state = _fit_probe(ctx, state, train, base)
    model = compose(base, state.params)
    eval_metrics = jax.device_get(fns.evaluate(model, shard_batch(held_out, ctx.mesh)))
    result = {"eval_accuracy": float(eval_metrics["accuracy"]), "eval_loss": float(eval_metrics["loss"]),
              "num_train": n_train, "num_eval": held_out["prompt"].shape[0],
              **gold_accuracy(ctx, model, held_out, labels)}
    params = normalized(ctx, state.params, norm_samples, base)
    ctx.logger.log("reward_model_eval", rm.steps, result)
    save(ctx, "reward_model", rm.steps, {"state": state, "output": params},
         {"done": True, "result": result, **recorded})
    return RewardModel(compose(base, params), state, train, result, norm_samples, base)


def refresh_reward_model(ctx: RunContext, it: int, policy_params: dict, reward: RewardModel) -> RewardModel:
    """Iterated online RLHF (Bai et al. 2022, §4.5): label fresh samples of the current policy,
    add them to the preference data, train the reward model further on all of it, re-normalise.

    Logs how well the reward model ranked the new samples *before* training on them
    (``pre_accuracy`` against the labels, ``pre_gold_accuracy`` against the gold order): its
    accuracy off the data it was trained on, where the policy now samples. With LoRA the adapters and
    head train on, over the same frozen base.
    """
    rm = ctx.config.reward_model
    fns = reward_fns(ctx.config.model, rm)
    prompt, prompt_mask = ctx.task.prompts("rm-online", it, rm.online_prompts)
    new = preferences.usable(labelled_samples(ctx, policy_params, prompt, prompt_mask, "rm-online", it))
    labels = {k: new.pop(k) for k in preferences.GOLD_LABELS if k in new}
    state, step = reward.state, train_step(ctx, reward.base)
    current = compose(reward.base, state.params)  # unnormalised, as it trained
    before, skipped_before = jax.device_get((fns.evaluate(current, shard_batch(new, ctx.mesh)),
                                             skipped_updates(state)))
    metrics = {"pre_accuracy": float(before["accuracy"]), "pre_loss": float(before["loss"]),
               **{f"pre_{k}": v for k, v in gold_accuracy(ctx, current, new, labels).items()},
               "new_pairs": new["prompt"].shape[0]}
    train = preferences.concatenate(reward.train, new)
    n = train["prompt"].shape[0]
    batch_at = _batches(ctx, "rm-online-batches", n)
    for i in range(rm.online_steps):  # step (refresh, i) of the stream: a pure function of both
        rows = batch_at(it * rm.online_steps + i)
        state, step_metrics = step(state, shard_batch(preferences.rows(train, rows), ctx.mesh))
    step_metrics = jax.device_get(step_metrics)
    if step_metrics["skipped_updates"] - skipped_before == rm.online_steps:
        _log.warning(f"reward_model_online at PPO iteration {it}: all {rm.online_steps} updates skipped as "
                     f"non-finite; the reward model is unchanged")
    metrics.update(num_train=n, loss=float(step_metrics["loss"]), accuracy=float(step_metrics["accuracy"]))
    ctx.logger.log("reward_model_online", it, metrics)
    params = normalized(ctx, state.params, reward.norm_samples, reward.base)
    return reward._replace(params=compose(reward.base, params), state=state, train=train)
