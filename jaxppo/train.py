"""Host loops of the three stages on the embedded task: SFT → reward model → PPO.

Each loop reads top to bottom — sample data → jitted step → log — and pulls metrics to the host
only when it logs. Everything random derives from ``config.seed`` by ``fold_in``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.kl_control import init_kl_control, update_kl_control
from jaxppo.logging import RunLogger
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.pipeline_config import PipelineConfig
from jaxppo.ppo import make_update
from jaxppo.reward_model import list_scores, make_reward_eval, make_reward_step, normalize_reward_head, pair_scores
from jaxppo.rollout import make_rollout
from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.sequences import response_scores
from jaxppo.sft import make_sft_step
from jaxppo.toy_task import EOS, PAD, demonstrations, gold_reward, preference_labels, sample_prompts

EVAL_PROMPTS = 512


def _copy(tree):
    """Fresh buffers for a pytree (a donated train state must not alias another role's params)."""
    return jax.tree.map(jnp.copy, tree)


def _batches(data: dict, batch_size: int, key: jax.Array):
    """An endless stream of shuffled batches of a dict of arrays (one epoch per permutation)."""
    n = next(iter(data.values())).shape[0]
    epoch = 0
    while True:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in data.items()}
        epoch += 1


class Pipeline:
    """The three stages for one :class:`PipelineConfig`, sharing jitted functions and data."""

    def __init__(self, config: PipelineConfig, logger: RunLogger):
        self.config, self.logger = config, logger
        self.key = jax.random.key(config.seed)
        task, ppo = config.task, config.ppo
        self.sampling = SamplingParams(max_new_tokens=task.max_response_tokens, temperature=ppo.temperature,
                                       stop_token_ids=(EOS,), pad_token_id=PAD)
        self.sampler = make_sampler(config.model, self.sampling)
        self.gold = jax.jit(lambda *a: gold_reward(task, *a))
        self.scores = jax.jit(lambda params, *a: response_scores(config.model, params, *a))
        self.eval_prompts = sample_prompts(task, self._key("eval"), EVAL_PROMPTS)

    def _key(self, name: str, i: int = 0) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.key, sum(map(ord, name)) * 7919), i)

    def evaluate(self, params: dict, reward_params: dict | None = None, i: int = 0) -> dict:
        """Gold (and proxy) reward of fresh samples of the policy on the fixed evaluation prompts."""
        out = self.sampler(params, *self.eval_prompts, self._key("eval-sample", i))
        args = (*self.eval_prompts, out.tokens, out.mask)
        result = {"gold_reward": float(jnp.mean(self.gold(*args)))}
        if reward_params is not None:
            result["proxy_reward"] = float(jnp.mean(self.scores(reward_params, *args)))
        return result

    # ---------------------------------------------------------------------------------------- SFT

    def sft(self) -> dict:
        c, task = self.config, self.config.task
        params = init_params(c.model, self._key("init"))
        state = create_train_state(params, make_optimizer(learning_rate=c.sft.learning_rate,
                                                          warmup_steps=c.sft.warmup_steps))
        step = make_sft_step(c.model, micro_batches=c.sft.micro_batches)
        bar = self.logger.progress(range(c.sft.steps), desc="SFT")
        for i in bar:
            prompt, prompt_mask = sample_prompts(task, self._key("sft-prompts", i), c.sft.batch_size)
            response, response_mask = demonstrations(task, self._key("sft-demos", i), prompt, prompt_mask)
            state, metrics = step(state, {"prompt": prompt, "prompt_mask": prompt_mask,
                                          "response": response, "response_mask": response_mask})
            if i % 50 == 0 or i == c.sft.steps - 1:
                bar.set_postfix(self.logger.log("sft", i, metrics))
        return state.params

    # ------------------------------------------------------------------------------ reward model

    def preference_data(self, sft_params: dict) -> dict:
        """Responses of the SFT policy, labelled by the hidden gold reward with Bradley–Terry noise."""
        c, task = self.config, self.config.task
        k = 2 if c.reward_model.objective == "bradley_terry" else c.reward_model.list_size
        prompt, prompt_mask = sample_prompts(task, self._key("rm-prompts"), c.reward_model.num_prompts)
        responses, masks, golds = [], [], []
        for j in range(k):
            out = self.sampler(sft_params, prompt, prompt_mask, self._key("rm-samples", j))
            responses.append(out.tokens)
            masks.append(out.mask)
            golds.append(self.gold(prompt, prompt_mask, out.tokens, out.mask))
        if k == 2:
            a_wins = preference_labels(task, self._key("rm-labels"), golds[0], golds[1])
            pick = lambda a, b: jnp.where(a_wins[:, None], a, b)  # noqa: E731
            pairs = {"prompt": prompt, "prompt_mask": prompt_mask,
                     "chosen": pick(responses[0], responses[1]), "chosen_mask": pick(masks[0], masks[1]),
                     "rejected": pick(responses[1], responses[0]), "rejected_mask": pick(masks[1], masks[0]),
                     "margin": jnp.abs(golds[0] - golds[1]),
                     "gold_diff": jnp.where(a_wins, golds[0] - golds[1], golds[1] - golds[0])}
            if c.reward_model.drop_ties:  # a labeller shown two equally good responses says "tie"
                keep = np.flatnonzero(np.asarray(golds[0] != golds[1]))
                pairs = {name: v[keep] for name, v in pairs.items()}
            return pairs
        # Rankings: a Plackett–Luce draw with utilities β·gold (Gumbel-perturbed sort), best first.
        gold = jnp.stack(golds, axis=1)
        noise = jax.random.gumbel(self._key("rm-labels"), gold.shape)
        order = jnp.argsort(-(task.preference_beta * gold + noise), axis=1)
        take = lambda x: jnp.take_along_axis(x, order[:, :, None], axis=1)  # noqa: E731
        return {"prompt": prompt, "prompt_mask": prompt_mask, "responses": take(jnp.stack(responses, 1)),
                "response_mask": take(jnp.stack(masks, 1)), "gold": jnp.take_along_axis(gold, order, axis=1)}

    def reward_model(self, sft_params: dict) -> tuple[dict, dict]:
        c = self.config
        rm = c.reward_model
        data = self.preference_data(sft_params)
        n = data["prompt"].shape[0]
        n_eval = max(rm.batch_size, int(n * rm.eval_fraction))
        train = {k: v[n_eval:] for k, v in data.items() if k not in ("gold", "gold_diff")}
        held_out = {k: v[:n_eval] for k, v in data.items() if k not in ("gold", "gold_diff")}
        # Train states are donated by their steps: every role gets its own copy of the buffers.
        params = {k: v for k, v in _copy(sft_params).items() if k != "lm_head"}
        params["reward_head"] = init_scalar_head(c.model, self._key("rm-head"), "reward_head")
        state = create_train_state(params, make_optimizer(learning_rate=rm.learning_rate, warmup_steps=rm.warmup_steps))
        step = make_reward_step(c.model, objective=rm.objective, use_margin=rm.use_margin, micro_batches=rm.micro_batches)
        evaluate = make_reward_eval(c.model, objective=rm.objective, use_margin=rm.use_margin)
        batches = _batches(train, rm.batch_size, self._key("rm-batches"))
        bar = self.logger.progress(range(rm.steps), desc="reward model")
        for i in bar:
            state, metrics = step(state, next(batches))
            if i % 50 == 0 or i == rm.steps - 1:
                bar.set_postfix(self.logger.log("reward_model", i, metrics))
        eval_metrics = evaluate(state.params, held_out)
        result = {"eval_accuracy": float(eval_metrics["accuracy"]), "eval_loss": float(eval_metrics["loss"])}
        # gold_accuracy: agreement with the hidden gold order on the held-out pairs it strictly orders
        if rm.objective == "bradley_terry":
            chosen, rejected = jax.jit(functools.partial(pair_scores, c.model))(state.params, held_out)
            diff = np.asarray(data["gold_diff"][:n_eval])
            agree = np.sign(np.asarray(chosen - rejected)) == np.sign(diff)
            result["gold_accuracy"] = float(agree[diff != 0].mean())
        else:  # every pair (i, j) of a list whose gold rewards differ, against the gold order
            scores = np.asarray(jax.jit(functools.partial(list_scores, c.model))(state.params, held_out))
            gold = np.asarray(data["gold"][:n_eval])
            i, j = np.triu_indices(scores.shape[1], 1)
            strict = gold[:, i] != gold[:, j]
            agree = np.sign(scores[:, i] - scores[:, j]) == np.sign(gold[:, i] - gold[:, j])
            result["gold_accuracy"] = float(agree[strict].mean())
        params = state.params
        if rm.normalize:
            out = self.sampler(sft_params, *self.eval_prompts, self._key("rm-norm"))
            params = normalize_reward_head(params, self.scores(params, *self.eval_prompts, out.tokens, out.mask))
        self.logger.log("reward_model_eval", rm.steps, result)
        return params, result

    # --------------------------------------------------------------------------------------- PPO

    def ppo(self, sft_params: dict, rm_params: dict) -> dict:
        c, task, ppo = self.config, self.config.task, self.config.ppo
        shared = ppo.critic == "shared"
        actor_params = _copy(sft_params)  # states are donated: own buffers for each role
        critic_state = None
        if shared:
            actor_params["value_head"] = init_scalar_head(c.model, self.key, "value_head")
        else:
            if ppo.critic_init == "reward_model":
                critic_params = {k: v for k, v in _copy(rm_params).items() if k != "reward_head"}
                critic_params["value_head"] = _copy(rm_params["reward_head"])
            else:
                critic_params = {k: v for k, v in _copy(sft_params).items() if k != "lm_head"}
                critic_params["value_head"] = init_scalar_head(c.model, self.key, "value_head")
            critic_state = create_train_state(critic_params, make_optimizer(
                learning_rate=ppo.critic_learning_rate or ppo.learning_rate, max_grad_norm=ppo.max_grad_norm))
        actor_state = create_train_state(actor_params, make_optimizer(learning_rate=ppo.learning_rate,
                                                                       max_grad_norm=ppo.max_grad_norm))
        ref_params = _copy(sft_params)
        rollout = make_rollout(c.model, ppo)
        update = make_update(c.model, ppo)
        kl_state = init_kl_control(kl_coef=ppo.kl_coef)
        bar = self.logger.progress(range(ppo.iterations), desc="PPO")
        for it in bar:
            prompt, prompt_mask = sample_prompts(task, self._key("ppo-prompts", it), ppo.batch_size)
            traj, metrics = rollout(actor_state.params, None if shared else critic_state.params, ref_params,
                                    rm_params, prompt, prompt_mask, self._key("ppo-sample", it), kl_state.kl_coef)
            metrics["gold_reward"] = jnp.mean(self.gold(traj.prompt, traj.prompt_mask, traj.response, traj.response_mask))
            ptx = None
            if ppo.ptx_coef > 0:
                demo = demonstrations(task, self._key("ppo-ptx", it), prompt, prompt_mask)
                ptx = {"prompt": prompt, "prompt_mask": prompt_mask, "response": demo[0], "response_mask": demo[1]}
            actor_state, critic_state, update_metrics = update(actor_state, critic_state, traj,
                                                               self._key("ppo-update", it), kl_state.kl_coef, ptx)
            kl_state = update_kl_control(kl_state, metrics["kl"], n_steps=ppo.batch_size, target=ppo.kl_target,
                                         horizon=ppo.kl_horizon)
            if ppo.ref_refresh_every and (it + 1) % ppo.ref_refresh_every == 0:
                ref_params = _copy({k: v for k, v in actor_state.params.items() if k != "value_head"})
            if it % c.log_every == 0 or it == ppo.iterations - 1:
                row = self.logger.log("ppo", it, {"iteration": it, **metrics, **update_metrics})
                bar.set_postfix({k: row[k] for k in ("gold_reward", "proxy_reward", "kl")})
        return {k: v for k, v in actor_state.params.items() if k != "value_head"}


def run_pipeline(config: PipelineConfig, run_dir: str | Path) -> dict:
    """Runs SFT → reward model → PPO, writes the run directory, returns ``summary.json``'s content."""
    start = time.perf_counter()
    with RunLogger(run_dir, echo=None) as logger:
        logger.write_json("config.json", dataclasses.asdict(config))
        pipe = Pipeline(config, logger)
        sft_params = pipe.sft()
        rm_params, rm_result = pipe.reward_model(sft_params)
        sft_eval = pipe.evaluate(sft_params, rm_params)
        final_params = pipe.ppo(sft_params, rm_params)
        final_eval = pipe.evaluate(final_params, rm_params, i=1)
        summary = {
            "sft_gold_reward": sft_eval["gold_reward"],
            "sft_proxy_reward": sft_eval["proxy_reward"],
            "final_gold_reward": final_eval["gold_reward"],
            "final_proxy_reward": final_eval["proxy_reward"],
            "optimal_gold_reward": config.task.optimal_gold,
            "gap_closed": (final_eval["gold_reward"] - sft_eval["gold_reward"])
            / max(config.task.optimal_gold - sft_eval["gold_reward"], 1e-9),
            "reward_model": rm_result,
            "wall_seconds": time.perf_counter() - start,
        }
        logger.plot("ppo", ["gold_reward", "proxy_reward", "kl"], filename="ppo.png",
                    title="PPO: gold vs proxy reward and KL to the reference")
        logger.write_json("summary.json", summary)
    return summary
