"""Host loops of the three stages: SFT → reward model → PPO, with checkpoints and resume.

Each loop reads top to bottom — data for step i → jitted step → log → checkpoint — and pulls
metrics to the host only when it logs. Everything random derives from ``config.seed`` by
``fold_in`` of a stream name and the step, and every batch is a pure function of the step, so a
run restored from a checkpoint at step k continues exactly as the uninterrupted run would.

Resume (:func:`run_pipeline`): each stage keeps orbax checkpoints under
``run_dir/checkpoints/<stage>`` (see :mod:`jaxppo.checkpoint`); a stage's final checkpoint is
marked ``done`` and also holds what the stage hands on (SFT params; normalised reward-model params).
Re-running the same command with the same run directory skips the stages that are done, restores
the newest checkpoint of the stage in progress, and first cuts ``metrics.jsonl`` back to the rows
logged up to that checkpoint, so the finished file equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.checkpoint import CheckpointError, StageCheckpoints
from jaxppo.kl_control import init_kl_control, update_kl_control
from jaxppo.logging import NullLogger, RunLogger, read_metrics
from jaxppo.models.config import cast_params
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.pipeline_config import PipelineConfig
from jaxppo.ppo import make_iteration, make_update
from jaxppo.reward_model import (
    features_of, fit_probe, list_scores, make_reward_eval, make_reward_step, normalize_reward_head, pair_scores,
)
from jaxppo.rollout import make_rollout
from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.sequences import response_scores
from jaxppo.sft import make_sft_step
from jaxppo.sharding import init_sharded, make_mesh, replicate, shard_batch, shard_tree, to_host
from jaxppo.tasks import TextTask, TextTaskConfig, ToyTask

STAGES = ("sft", "reward_model", "ppo")
# metrics.jsonl stage → pipeline stage that writes it
METRIC_STAGES = {"sft": "sft", "reward_model": "reward_model", "reward_model_eval": "reward_model",
                 "ppo": "ppo", "reward_model_online": "ppo", "eval": "ppo"}
STEP_LOG_EVERY = 50  # SFT / reward-model steps between metric rows


class RewardModel(NamedTuple):
    """What the reward-model stage hands to PPO."""

    params: dict  # normalised (scores of SFT samples: mean 0, std 1): the frozen reward role
    state: object  # the train state (unnormalised params, optimizer): online refreshes continue it
    train: dict  # the preference pairs / lists it trained on (grown by online refreshes)
    result: dict  # held-out evaluation


def _copy(tree):
    """Fresh buffers for a pytree (a donated train state must not alias another role's params)."""
    return jax.tree.map(jnp.copy, tree)


def _rows(data: dict, rows) -> dict:
    return {k: v[rows] for k, v in data.items()}


def _batch_rows(n: int, batch_size: int, key: jax.Array, step: int) -> np.ndarray:
    """Rows of batch ``step`` of an endless stream of shuffled epochs (a pure function of the step)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    return order[i * batch_size:(i + 1) * batch_size]


def _usable(data: dict) -> dict:
    """Labelled preference data without the tied pairs that ``_label`` moved to the end."""
    data = dict(data)
    n = int(data.pop("num_pairs", data["prompt"].shape[0]))
    return {k: v[:n] for k, v in data.items()}


def _load_model(config: PipelineConfig):
    """``(base params or None, tokenizer or None)``; a pretrained checkpoint must match ``config.model``."""
    if not config.pretrained:
        return None, None
    from jaxppo.weights.hf import load_pretrained

    m = config.model
    loaded, params, tokenizer = load_pretrained(config.pretrained, param_dtype=m.param_dtype, dtype=m.dtype,
                                                remat=m.remat, remat_policy=m.remat_policy)
    for field in dataclasses.fields(m):
        if getattr(loaded, field.name) != getattr(m, field.name):
            raise ValueError(f"config field `model.{field.name}`: {getattr(m, field.name)!r} does not match the "
                             f"pretrained checkpoint {config.pretrained} ({getattr(loaded, field.name)!r})")
    return params, tokenizer


class Pipeline:
    """The three stages for one :class:`PipelineConfig`, sharing jitted functions, data and checkpoints."""

    def __init__(self, config: PipelineConfig, logger: RunLogger, checkpoint_dir: Path | None = None):
        self.config, self.logger = config, logger
        self.key = jax.random.key(config.seed)
        self.mesh = make_mesh(config.mesh)
        self.base_params, self.tokenizer = _load_model(config)
        if self.base_params is not None:
            self.base_params = shard_tree(self.base_params, self.mesh)
        if isinstance(config.task, TextTaskConfig):
            self.task = TextTask(config.task, self.tokenizer, seed=config.seed, vocab_size=config.model.vocab_size)
            print(f"prompts: {config.task.prompts}: {self.task.num_truncated_prompts} truncated to "
                  f"{config.task.max_prompt_tokens} tokens")
        else:
            self.task = ToyTask(config.task, self._key)
        self.sampling = SamplingParams(max_new_tokens=self.task.max_response_tokens, temperature=config.ppo.temperature,
                                       top_k=config.ppo.top_k, top_p=config.ppo.top_p,
                                       stop_token_ids=self.task.stop_token_ids, pad_token_id=self.task.pad_token_id)
        self.sampler = make_sampler(config.model, self.sampling)
        self.scores = jax.jit(functools.partial(response_scores, config.model, pooling=config.reward_model.pooling))
        self.checkpoints = {}
        if checkpoint_dir is not None:
            as_dict = json.loads(json.dumps(dataclasses.asdict(config)))
            self.checkpoints = {name: StageCheckpoints(checkpoint_dir / name, keep=config.checkpoint.keep,
                                                       config=as_dict) for name in (*STAGES, "preference_data")}

    def _key(self, name: str, i: int = 0) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.key, sum(map(ord, name)) * 7919), i)

    def _train_state(self, params: dict, tx) -> object:
        """A train state created already sharded by :data:`jaxppo.sharding.RULES` (own buffers)."""
        return init_sharded(lambda p: create_train_state(p, tx), self.mesh, params)

    def _frozen(self, params: dict) -> dict:
        """Own, sharded buffers for a frozen role's params (train states are donated by their steps)."""
        return shard_tree(_copy(params), self.mesh)

    # ------------------------------------------------------------------------------- helpers

    def sample(self, params: dict, prompt, prompt_mask, key: jax.Array):
        """Responses ``(tokens, mask)`` for any number of prompts, in sampler batches of ``eval_batch_size``."""
        size = self.config.eval_batch_size
        tokens, masks = [], []
        for c, start in enumerate(range(0, prompt.shape[0], size)):
            chunk = shard_batch((prompt[start:start + size], prompt_mask[start:start + size]), self.mesh)
            out = self.sampler(params, *chunk, jax.random.fold_in(key, c))
            tokens.append(out.tokens)
            masks.append(out.mask)
        return jnp.concatenate(tokens), jnp.concatenate(masks)

    def score(self, reward_params: dict, *args) -> jax.Array:
        size = self.config.eval_batch_size
        n = args[0].shape[0]
        return jnp.concatenate([self.scores(reward_params, *shard_batch(tuple(a[s:s + size] for a in args), self.mesh))
                                for s in range(0, n, size)])

    def evaluate(self, params: dict, reward_params: dict | None = None, i: int = 0, samples: str = "") -> dict:
        """Gold (and proxy) reward of fresh samples of the policy on the fixed evaluation prompts."""
        prompt, prompt_mask = self.task.eval_prompts()
        response, mask = self.sample(params, prompt, prompt_mask, self._key("eval-sample", i))
        args = tuple(to_host(a) for a in (prompt, prompt_mask, response, mask))
        gold = self.task.gold(*args)
        result = {"gold_reward": float(np.mean(gold)), "response_length": float(np.mean(np.sum(args[3], 1)))}
        proxy = None
        if reward_params is not None:
            proxy = to_host(self.score(reward_params, *args))
            result["proxy_reward"] = float(np.mean(proxy))
        if samples and self.config.num_samples:
            k = self.config.num_samples
            shown = self.task.render(*(a[:k] for a in args))
            for j, row in enumerate(shown):
                row["gold_reward"] = float(gold[j])
                if proxy is not None:
                    row["proxy_reward"] = float(proxy[j])
            self.logger.write_json(samples, {"samples": shown})
        return result

    def _resume(self, stage: str, targets: dict):
        """``(start step, restored items or None, meta)`` from the stage's newest checkpoint."""
        ckpt = self.checkpoints.get(stage)
        step = ckpt.latest_step() if ckpt else None
        if step is None:
            return 0, None, {}
        items, meta = ckpt.restore(step, targets)
        print(f"{stage}: resumed from {ckpt.directory / str(step)}")
        return step, items, meta

    def _save(self, stage: str, step: int, items: dict, meta: dict | None = None) -> None:
        if stage in self.checkpoints:
            self.checkpoints[stage].save(step, items, meta)

    def _fit(self, stage: str, state, step_fn, batch_at, steps: int, outputs: dict | None = None):
        """``steps`` of ``state, metrics = step_fn(state, batch_at(i))`` with logs and periodic checkpoints.

        Returns ``(state, done_items, meta)``: when the stage's checkpoint says it is done, the saved
        outputs and meta instead of training again (``outputs`` are restore targets for those).
        """
        every = self.config.checkpoint.every_steps
        start, items, meta = self._resume(stage, {"state": state, **(outputs or {})} if self._is_done(stage)
                                          else {"state": state})
        if items is not None:
            state = items["state"]
            if meta.get("done"):
                return state, items, meta
        bar = self.logger.progress(range(start, steps), desc=stage)
        for i in bar:
            state, metrics = step_fn(state, shard_batch(batch_at(i), self.mesh))
            if i % STEP_LOG_EVERY == 0 or i == steps - 1:
                bar.set_postfix(self.logger.log(stage, i, metrics))
            if (i + 1) % every == 0 and i + 1 < steps:
                self._save(stage, i + 1, {"state": state})
        return state, None, {}

    def _is_done(self, stage: str) -> bool:
        ckpt = self.checkpoints.get(stage)
        step = ckpt.latest_step() if ckpt else None
        return step is not None and bool(ckpt.read_meta(step).get("done"))

    # ---------------------------------------------------------------------------------------- SFT

    def sft(self) -> dict:
        """The SFT policy's params: the pretrained model itself when ``sft.steps == 0``."""
        c = self.config
        if c.sft.steps == 0:
            return self.base_params
        params = self.base_params
        if params is None:
            params = init_sharded(functools.partial(init_params, c.model), self.mesh, self._key("init"))
        state = self._train_state(params, make_optimizer(learning_rate=c.sft.learning_rate,
                                                         warmup_steps=c.sft.warmup_steps))
        step = make_sft_step(c.model, micro_batches=c.sft.micro_batches)
        state, done, _ = self._fit("sft", state, step, lambda i: self.task.demonstrations("sft", i, c.sft.batch_size),
                                   c.sft.steps)
        if done is None:
            self._save("sft", c.sft.steps, {"state": state}, {"done": True})
        return state.params

    # ------------------------------------------------------------------------------ reward model

    def preference_data(self, sft_params: dict) -> dict:
        """The task's preference file, or responses of the SFT policy labelled by the hidden gold reward."""
        rm = self.config.reward_model
        from_file = self.task.preference_file()
        if from_file is not None:
            return dict(from_file)
        ckpt = self.checkpoints.get("preference_data")
        if ckpt is not None and ckpt.latest_step() is not None:  # sampling is the expensive part: saved once
            data, _ = ckpt.restore(ckpt.latest_step(), {"data": ...})
            return {k: np.asarray(v) for k, v in data["data"].items()}
        prompt, prompt_mask = self.task.prompts("rm", 0, rm.num_prompts)
        data = self.labelled_samples(sft_params, prompt, prompt_mask, "rm", 0)
        if ckpt is not None:
            ckpt.save(0, {"data": data}, {"done": True})
        return data

    def labelled_samples(self, params: dict, prompt, prompt_mask, stream: str, step: int) -> dict:
        """K responses per prompt sampled from the policy ``params``, labelled by the hidden gold reward
        with noise (pairs, or rankings for Plackett–Luce)."""
        rm = self.config.reward_model
        k = 2 if rm.objective == "bradley_terry" else rm.list_size
        responses, masks, golds = [], [], []
        for j in range(k):
            response, mask = map(to_host, self.sample(params, prompt, prompt_mask,
                                                      self._key(f"{stream}-samples", step * k + j)))
            responses.append(response)
            masks.append(mask)
            golds.append(jnp.asarray(self.task.gold(to_host(prompt), to_host(prompt_mask), response, mask), jnp.float32))
        data = self._label(prompt, prompt_mask, responses, masks, golds, self._key(f"{stream}-labels", step))
        return {name: np.asarray(v) for name, v in data.items()}  # host arrays: batches are sharded per step

    def _label(self, prompt, prompt_mask, responses, masks, golds, key) -> dict:
        """Pairs (Bradley–Terry-noisy gold labels) or Plackett–Luce-drawn rankings of sampled responses."""
        rm = self.config.reward_model
        if len(responses) == 2:
            a_wins = jnp.asarray(self.task.preference_labels(key, golds[0], golds[1]))
            pick = lambda a, b: jnp.where(a_wins[:, None], a, b)  # noqa: E731
            pairs = {"prompt": prompt, "prompt_mask": prompt_mask,
                     "chosen": pick(responses[0], responses[1]), "chosen_mask": pick(masks[0], masks[1]),
                     "rejected": pick(responses[1], responses[0]), "rejected_mask": pick(masks[1], masks[0]),
                     "margin": jnp.abs(golds[0] - golds[1]),
                     "gold_diff": jnp.where(a_wins, golds[0] - golds[1], golds[1] - golds[0])}
            if rm.drop_ties:  # a labeller shown two equally good responses says "tie"
                keep = jnp.abs(golds[0] - golds[1]) > 0
                # fixed shapes (for checkpoints): tied pairs go last and are cut by `num_pairs` below
                order = jnp.argsort(~keep, stable=True)
                pairs = {name: v[order] for name, v in pairs.items()}
                pairs["num_pairs"] = jnp.sum(keep).astype(jnp.int32)
            return pairs
        # Rankings: a Plackett–Luce draw with utilities β·gold (Gumbel-perturbed sort), best first.
        gold = jnp.stack(golds, axis=1)
        beta = getattr(self.task.config, "preference_beta", 1.0)
        noise = jax.random.gumbel(key, gold.shape)
        order = jnp.argsort(-(beta * gold + noise), axis=1)
        take = lambda x: jnp.take_along_axis(x, order[:, :, None], axis=1)  # noqa: E731
        return {"prompt": prompt, "prompt_mask": prompt_mask, "responses": take(jnp.stack(responses, 1)),
                "response_mask": take(jnp.stack(masks, 1)), "gold": jnp.take_along_axis(gold, order, axis=1)}

    def _split_preferences(self, data: dict) -> tuple[dict, dict, dict]:
        """``(train, held_out, gold labels of held_out)`` of labelled preference data (ties already cut)."""
        rm = self.config.reward_model
        data = _usable(data)
        n = data["prompt"].shape[0]
        n_eval = max(rm.batch_size, int(n * rm.eval_fraction))
        if n - n_eval < rm.batch_size:
            raise ValueError(f"config field `reward_model.num_prompts`: only {n} usable preference pairs/lists; "
                             f"need > {n_eval + rm.batch_size} for a held-out set and one batch")
        labels = {k: data.pop(k)[:n_eval] for k in ("gold", "gold_diff") if k in data}
        return {k: v[n_eval:] for k, v in data.items()}, {k: v[:n_eval] for k, v in data.items()}, labels

    def _gold_accuracy(self, params: dict, data: dict, labels: dict) -> dict:
        """Agreement of the reward model with the hidden gold order on the pairs it strictly orders."""
        if "gold_diff" in labels:
            chosen, rejected = map(to_host, self._pair_scores(params, shard_batch(data, self.mesh)))
            diff = np.asarray(labels["gold_diff"])
            agree = np.sign(np.asarray(chosen - rejected)) == np.sign(diff)
            return {"gold_accuracy": float(agree[diff != 0].mean())}
        if "gold" in labels:  # every pair (i, j) of a list whose gold rewards differ, against the gold order
            scores = to_host(self._list_scores(params, shard_batch(data, self.mesh)))
            gold = np.asarray(labels["gold"])
            i, j = np.triu_indices(scores.shape[1], 1)
            strict = gold[:, i] != gold[:, j]
            agree = np.sign(scores[:, i] - scores[:, j]) == np.sign(gold[:, i] - gold[:, j])
            return {"gold_accuracy": float(agree[strict].mean())}
        return {}

    @functools.cached_property
    def _pair_scores(self):
        return jax.jit(functools.partial(pair_scores, self.config.model, pooling=self.config.reward_model.pooling))

    @functools.cached_property
    def _list_scores(self):
        return jax.jit(functools.partial(list_scores, self.config.model, pooling=self.config.reward_model.pooling))

    @functools.cached_property
    def _reward_step(self):
        rm = self.config.reward_model
        return make_reward_step(self.config.model, objective=rm.objective, use_margin=rm.use_margin,
                                micro_batches=rm.micro_batches, train_trunk=rm.train_trunk, pooling=rm.pooling)

    @functools.cached_property
    def _reward_eval(self):
        rm = self.config.reward_model
        return make_reward_eval(self.config.model, objective=rm.objective, use_margin=rm.use_margin,
                                pooling=rm.pooling)

    def _features(self, params: dict, data: dict) -> dict:
        """Pooled trunk features (:func:`features_of`) of all preference rows, in batches of the
        reward model's batch size (the last one padded, so one shape compiles); host arrays."""
        rm = self.config.reward_model
        n, size = data["prompt"].shape[0], rm.batch_size
        out = []
        for start in self.logger.progress(range(0, n, size), desc="RM features"):
            rows = np.minimum(np.arange(start, start + size), n - 1)
            out.append(jax.tree.map(to_host, self._features_of(params, shard_batch(_rows(data, rows), self.mesh))))
        return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *out)

    @functools.cached_property
    def _features_of(self):
        rm = self.config.reward_model
        return jax.jit(functools.partial(features_of, self.config.model, objective=rm.objective, pooling=rm.pooling))

    def _fit_probe(self, state, train: dict, batches: jax.Array):
        """``train_trunk=False``: the trunk is frozen, so its pooled features of the training data
        are computed once and the head trains on them (:func:`fit_probe`) — the same steps, batches
        and optimizer as the head-only step, at the cost of one forward pass per example instead of
        one per step. The head trains on standardised features (each dimension to mean 0, std 1 over
        the training responses: a transformer's hidden dimensions differ in scale by orders of
        magnitude, which a per-coordinate learning rate handles badly); the standardisation is folded
        back into the returned head, ``w = w_s / σ``, ``b = b_s − (μ / σ) · w_s``, so it scores raw
        features. The returned state's optimizer state is the initial one (an online refresh
        restarts the head's Adam moments and warm-up)."""
        rm = self.config.reward_model
        features = self._features(state.params, train)
        responses = [v.reshape(-1, v.shape[-1]) for k, v in features.items() if k != "margin"]
        mu = np.concatenate(responses).mean(0)
        sigma = np.concatenate(responses).std(0) + 1e-6
        standard = {k: v if k == "margin" else (v - mu) / sigma for k, v in features.items()}
        kernel, bias = (np.asarray(to_host(state.params["reward_head"][k])) for k in ("kernel", "bias"))
        head = {"kernel": jnp.asarray(kernel * sigma[:, None]), "bias": jnp.asarray(bias + mu @ kernel)}  # same scores
        n = train["prompt"].shape[0]
        rows = np.stack([_batch_rows(n, rm.batch_size, batches, i) for i in range(rm.steps)])
        head, metrics = fit_probe(create_train_state(head, state.tx), standard, rows, objective=rm.objective,
                                  use_margin=rm.use_margin)
        self.logger.log("reward_model", rm.steps, {k: float(v) for k, v in metrics.items()})
        w_s, b_s = (np.asarray(head.params[k]) for k in ("kernel", "bias"))
        trained = {"kernel": jnp.asarray(w_s / sigma[:, None]), "bias": jnp.asarray(b_s - (mu / sigma) @ w_s)}
        return state.replace(step=head.step, params={**state.params, "reward_head": shard_tree({"reward_head": trained}, self.mesh)["reward_head"]})

    def _normalized(self, state_params: dict, sft_params: dict) -> dict:
        """Frozen reward params (own buffers) whose scores of SFT samples have mean 0 and std 1."""
        params = self._frozen(state_params)
        if not self.config.reward_model.normalize:
            return params
        if not hasattr(self, "_norm_samples"):  # the same SFT samples for every normalisation of the run
            prompt, prompt_mask = self.task.eval_prompts()
            self._norm_samples = (prompt, prompt_mask, *self.sample(sft_params, prompt, prompt_mask,
                                                                    self._key("rm-norm")))
        return normalize_reward_head(params, self.score(params, *self._norm_samples))

    def reward_model(self, sft_params: dict) -> RewardModel:
        c, rm = self.config, self.config.reward_model
        if rm.init == "sft":  # the InstructGPT recipe: the SFT model's trunk
            params = {k: v for k, v in sft_params.items() if k != "lm_head"}
        else:  # "scratch": a freshly initialised trunk of the same architecture
            params = {k: v for k, v in init_params(c.model, self._key("rm-init")).items() if k != "lm_head"}
        params["reward_head"] = init_scalar_head(c.model, self._key("rm-head"), "reward_head")
        state = self._train_state(params, make_optimizer(learning_rate=rm.learning_rate, warmup_steps=rm.warmup_steps))
        if self._is_done("reward_model"):
            state, done, meta = self._fit("reward_model", state, None, None, rm.steps, {"output": params})
            train, _, _ = self._split_preferences(self.preference_data(sft_params))
            return RewardModel(done["output"], state, train, meta["result"])
        train, held_out, labels = self._split_preferences(self.preference_data(sft_params))
        n_train = train["prompt"].shape[0]
        batches = self._key("rm-batches")
        if rm.train_trunk:
            state, _, _ = self._fit("reward_model", state, self._reward_step,
                                    lambda i: _rows(train, _batch_rows(n_train, rm.batch_size, batches, i)), rm.steps)
        else:
            state = self._fit_probe(state, train, batches)
        eval_metrics = self._reward_eval(state.params, shard_batch(held_out, self.mesh))
        result = {"eval_accuracy": float(eval_metrics["accuracy"]), "eval_loss": float(eval_metrics["loss"]),
                  "num_train": n_train, "num_eval": held_out["prompt"].shape[0],
                  **self._gold_accuracy(state.params, held_out, labels)}
        params = self._normalized(state.params, sft_params)
        self.logger.log("reward_model_eval", rm.steps, result)
        self._save("reward_model", rm.steps, {"state": state, "output": params}, {"done": True, "result": result})
        return RewardModel(params, state, train, result)

    def refresh_reward_model(self, it: int, policy_params: dict, sft_params: dict, reward: RewardModel) -> RewardModel:
        """Iterated online RLHF (Bai et al. 2022, §4.5): label fresh samples of the current policy,
        add them to the preference data, train the reward model further on all of it, re-normalise.

        Logs how well the reward model ranked the new samples *before* training on them
        (``pre_accuracy`` against the labels, ``pre_gold_accuracy`` against the gold order): its
        accuracy off the data it was trained on, where the policy now samples.
        """
        rm = self.config.reward_model
        prompt, prompt_mask = self.task.prompts("rm-online", it, rm.online_prompts)
        new = _usable(self.labelled_samples(policy_params, prompt, prompt_mask, "rm-online", it))
        labels = {k: new.pop(k) for k in ("gold", "gold_diff") if k in new}
        state = reward.state
        before = self._reward_eval(state.params, shard_batch(new, self.mesh))
        metrics = {"pre_accuracy": float(before["accuracy"]), "pre_loss": float(before["loss"]),
                   **{f"pre_{k}": v for k, v in self._gold_accuracy(state.params, new, labels).items()},
                   "new_pairs": new["prompt"].shape[0]}
        train = {k: np.concatenate([reward.train[k], new[k]]) for k in reward.train}
        n = train["prompt"].shape[0]
        batches = self._key("rm-online-batches", it)
        for i in range(rm.online_steps):
            batch = shard_batch(_rows(train, _batch_rows(n, rm.batch_size, batches, i)), self.mesh)
            state, step_metrics = self._reward_step(state, batch)
        metrics.update(num_train=n, loss=float(step_metrics["loss"]), accuracy=float(step_metrics["accuracy"]))
        self.logger.log("reward_model_online", it, metrics)
        return RewardModel(self._normalized(state.params, sft_params), state, train, reward.result)

    # --------------------------------------------------------------------------------------- PPO

    def _iterations_in_call(self, it: int) -> int:
        """How many PPO iterations from ``it`` on run in one call: up to ``ppo.iterations_per_call``,
        never past host work (a checkpoint, an online reward-model refresh, a reference refresh)."""
        c, ppo = self.config, self.config.ppo
        stop = ppo.iterations
        for every in (c.checkpoint.every_iterations, c.reward_model.online_every, ppo.ref_refresh_every):
            if every > 0:
                stop = min(stop, (it // every + 1) * every)
        return max(1, min(ppo.iterations_per_call, stop - it))

    def ppo(self, sft_params: dict, reward: RewardModel) -> tuple[dict, RewardModel]:
        """PPO against the reward model; returns the final actor params and the (refreshed) reward model."""
        c, ppo = self.config, self.config.ppo
        online = c.reward_model.online_every
        rm_params = reward.params
        shared = ppo.critic == "shared"
        actor_params = dict(sft_params)  # _train_state gives each trained role its own buffers
        critic_state = None
        if shared:
            actor_params["value_head"] = init_scalar_head(c.model, self.key, "value_head")
        else:
            if ppo.critic_init == "reward_model":
                critic_params = {k: v for k, v in rm_params.items() if k != "reward_head"}
                critic_params["value_head"] = rm_params["reward_head"]
            else:
                critic_params = {k: v for k, v in sft_params.items() if k != "lm_head"}
                critic_params["value_head"] = init_scalar_head(c.model, self.key, "value_head")
            critic_state = self._train_state(critic_params, make_optimizer(
                learning_rate=ppo.critic_learning_rate or ppo.learning_rate, max_grad_norm=ppo.max_grad_norm))
        actor_state = self._train_state(actor_params, make_optimizer(learning_rate=ppo.learning_rate,
                                                                     max_grad_norm=ppo.max_grad_norm))
        ref_params = cast_params(sft_params, ppo.frozen_dtype)  # frozen, never donated
        kl_state = replicate(init_kl_control(kl_coef=ppo.kl_coef), self.mesh)  # updated on device from the KL metric
        refresh = ppo.ref_refresh_every > 0
        start, items, meta = self._resume("ppo", {
            "actor": actor_state, "critic": critic_state, "kl": kl_state,
            "reference": ref_params if refresh else None,
            **({"rm_state": reward.state, "rm_params": reward.params, "rm_data": ...} if online else {})})
        if items is not None:
            actor_state, critic_state, kl_state = items["actor"], items.get("critic"), items["kl"]
            ref_params = items.get("reference", ref_params)
            if online:
                data = {k: np.asarray(v) for k, v in items["rm_data"].items()}
                reward = RewardModel(items["rm_params"], items["rm_state"], data, reward.result)
        if not ppo.stop_token_ids:  # the task's EOS ends a response, as in evaluation and preference data
            ppo = dataclasses.replace(ppo, stop_token_ids=self.task.stop_token_ids, pad_token_id=self.task.pad_token_id)
        rollout = make_rollout(c.model, ppo, reward_pooling=c.reward_model.pooling)
        update = make_update(c.model, ppo)
        fused = make_iteration(c.model, ppo, reward_pooling=c.reward_model.pooling) if ppo.fused else None
        bar = self.logger.progress(ppo.iterations - start, desc="PPO")
        it, rm_frozen_of = start, None
        while it < ppo.iterations:
            if online and it > 0 and it % online == 0:
                reward = self.refresh_reward_model(it, actor_state.params, sft_params, reward)
            if rm_frozen_of is not reward:
                rm_frozen, rm_frozen_of = cast_params(reward.params, ppo.frozen_dtype), reward
            k = self._iterations_in_call(it)
            prompts = [shard_batch(self.task.prompts("ppo", it + j, ppo.batch_size), self.mesh) for j in range(k)]
            ptx = [shard_batch(self.task.demonstrations("ppo-ptx", it + j, ppo.batch_size, prompts[j]), self.mesh)
                   for j in range(k)] if ppo.ptx_coef > 0 else None
            if fused is not None:  # k iterations, one XLA program
                stack = lambda *xs: jnp.stack(xs)  # noqa: E731
                actor_state, critic_state, kl_state, samples, metrics = fused(
                    actor_state, critic_state, ref_params, rm_frozen, kl_state,
                    *jax.tree.map(stack, *prompts), jnp.stack([self._key("ppo-sample", it + j) for j in range(k)]),
                    jnp.stack([self._key("ppo-update", it + j) for j in range(k)]),
                    None if ptx is None else jax.tree.map(stack, *ptx))
                rows = [({name: v[j] for name, v in samples.items()}, {name: v[j] for name, v in metrics.items()})
                        for j in range(k)]
            else:  # the two-function form: a jitted rollout, then a jitted update
                traj, metrics = rollout(actor_state.params, None if shared else critic_state.params, ref_params,
                                        rm_frozen, *prompts[0], self._key("ppo-sample", it), kl_state.kl_coef)
                actor_state, critic_state, update_metrics = update(
                    actor_state, critic_state, traj, self._key("ppo-update", it), kl_state.kl_coef,
                    None if ptx is None else ptx[0])
                kl_state = update_kl_control(kl_state, metrics["kl"], n_steps=ppo.batch_size, target=ppo.kl_target,
                                             horizon=ppo.kl_horizon)
                samples = {"prompt": traj.prompt, "prompt_mask": traj.prompt_mask, "response": traj.response,
                           "response_mask": traj.response_mask}
                rows = [(samples, {**metrics, **update_metrics})]
            for j, (samples, metrics) in enumerate(rows):
                i = it + j
                if i % c.log_every == 0 or i == ppo.iterations - 1:  # metrics reach the host only here
                    gold = self.task.gold(*(to_host(samples[name]) for name in
                                            ("prompt", "prompt_mask", "response", "response_mask")))
                    row = self.logger.log("ppo", i, {"iteration": i, "gold_reward": float(np.mean(gold)), **metrics})
                    bar.set_postfix({name: row[name] for name in ("gold_reward", "proxy_reward", "kl")})
            it += k
            bar.update(k)
            if refresh and it % ppo.ref_refresh_every == 0:
                ref_params = cast_params(self._frozen({name: v for name, v in actor_state.params.items()
                                                       if name != "value_head"}), ppo.frozen_dtype)
            done = it == ppo.iterations
            if it % c.checkpoint.every_iterations == 0 or done:
                self._save("ppo", it, {
                    "actor": actor_state, "critic": critic_state, "kl": kl_state,
                    "reference": ref_params if refresh else None,
                    **({"rm_state": reward.state, "rm_params": reward.params, "rm_data": reward.train}
                       if online else {})}, {"done": done})
        bar.close()
        return {k: v for k, v in actor_state.params.items() if k != "value_head"}, reward


def _rewind_metrics(run_dir: Path, checkpoint_dir: Path, config: PipelineConfig) -> None:
    """Cut ``metrics.jsonl`` back to the rows logged up to the newest checkpoint of the stage in progress."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    as_dict = json.loads(json.dumps(dataclasses.asdict(config)))
    current, resume_step = None, 0
    for stage in STAGES:
        directory = checkpoint_dir / stage
        if not directory.exists():
            current = current or stage
            continue
        ckpt = StageCheckpoints(directory, keep=config.checkpoint.keep, config=as_dict)
        step = ckpt.latest_step()
        if step is None or not ckpt.read_meta(step).get("done"):
            current, resume_step = stage, step or 0
            break
    order = {s: i for i, s in enumerate(STAGES)}
    rows = read_metrics(path)

    def keep(row) -> bool:
        if row.get("stage") == "eval":  # written after PPO by every run, the resumed one too
            return False
        stage = METRIC_STAGES.get(row.get("stage"), row.get("stage"))
        if current is None or stage not in order:
            return True
        if order[stage] != order[current]:
            return order[stage] < order[current]
        return row.get("step", 0) < resume_step

    kept = [r for r in rows if keep(r)]
    if len(kept) != len(rows):
        from jaxppo.logging import _dumps

        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(_dumps(r) + "\n" for r in kept))
        tmp.replace(path)


def _check_run_config(run_dir: Path, config: PipelineConfig) -> None:
    """A run directory belongs to one config: refuse to resume it with another (names the fields)."""
    from jaxppo.checkpoint import config_diff

    path = run_dir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable ({e}); use a fresh --run-dir") from None
    diff = config_diff(saved, json.loads(json.dumps(dataclasses.asdict(config))))
    if diff:
        raise CheckpointError(f"{path}: this run directory was started with another config; "
                              f"mismatched fields: {'; '.join(diff)}. Use a fresh --run-dir or the same config.")


def run_pipeline(config: PipelineConfig, run_dir: str | Path) -> dict:
    """Runs (or resumes) SFT → reward model → PPO; writes the run directory; returns ``summary.json``'s content.

    Every process of a multi-process run calls it with the same arguments: all of them compute and
    checkpoint (orbax coordinates the writes), only process 0 writes metrics, plots, samples, the
    summary and the exported actor.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    main = jax.process_index() == 0
    checkpoint_dir = run_dir / "checkpoints" if config.checkpoint.enabled else None
    _check_run_config(run_dir, config)
    if main and checkpoint_dir is not None and checkpoint_dir.exists():
        _rewind_metrics(run_dir, checkpoint_dir, config)
    logger = RunLogger(run_dir, echo=None, wandb_project=config.wandb_project or None,
                       wandb_config=dataclasses.asdict(config)) if main else NullLogger()
    with logger, jax.set_mesh(make_mesh(config.mesh)):
        logger.write_json("config.json", dataclasses.asdict(config))
        pipe = Pipeline(config, logger, checkpoint_dir)
        sft_params = pipe.sft()
        reward = pipe.reward_model(sft_params)
        sft_eval = pipe.evaluate(sft_params, reward.params, samples="samples_sft.json")
        final_params, final_reward = pipe.ppo(sft_params, reward)
        # proxy: the final reward model (every version is normalised on the same SFT samples)
        final_eval = pipe.evaluate(final_params, final_reward.params, i=1, samples="samples_final.json")
        for name, result in (("sft", sft_eval), ("final", final_eval)):
            logger.log("eval", 0 if name == "sft" else config.ppo.iterations, result)
        gap = config.task.optimal_gold - sft_eval["gold_reward"]
        summary = {
            "sft_gold_reward": sft_eval["gold_reward"],
            "sft_proxy_reward": sft_eval["proxy_reward"],
            "final_gold_reward": final_eval["gold_reward"],
            "final_proxy_reward": final_eval["proxy_reward"],
            "optimal_gold_reward": config.task.optimal_gold,
            "gap_closed": (final_eval["gold_reward"] - sft_eval["gold_reward"]) / max(gap, 1e-9),
            "reward_model": reward.result,
            "num_processes": jax.process_count(),
            "mesh": dict(pipe.mesh.shape),
        }
        if isinstance(pipe.task, TextTask):
            summary["prompts_truncated"] = pipe.task.num_truncated_prompts
        if config.export_hf:
            from jaxppo.weights.hf import save_pretrained

            host_params = jax.tree.map(to_host, final_params)  # a collective: every process takes part
            if main:
                summary["actor_hf"] = str(save_pretrained(run_dir / "actor_hf", config.model, host_params,
                                                          pipe.tokenizer))
        logger.plot("ppo", ["gold_reward", "proxy_reward", "kl"], filename="ppo.png",
                    title="PPO: gold vs proxy reward and KL to the reference")
        if config.sft.steps:
            logger.plot("sft", ["loss"], filename="sft.png", title="SFT: NLL of demonstration tokens")
        logger.plot("reward_model", ["loss", "accuracy"], filename="reward_model.png",
                    title="Reward model: training loss and pairwise accuracy")
        summary["wall_seconds"] = time.perf_counter() - start
        logger.write_json("summary.json", summary)
    return summary
