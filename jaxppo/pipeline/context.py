"""The frozen run context every stage receives, and the host helpers the stages share.

:func:`open_run` builds a :class:`RunContext` for one run directory: it loads the pretrained model
(if any), builds the task, resolves the config (stop/pad tokens from the task), locks the directory
(one process per run), refuses a directory whose run started with another config, rewinds
``metrics.jsonl`` to the checkpoint a resumed run restarts from, and writes ``config.json`` — the
config that runs is the config that is saved.

Everything random derives from ``config.seed`` by a named stream (:func:`jaxppo.rng.stream_key`)
and the step, and every batch is a pure function of the step, so a run restored from a checkpoint
at step k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxppo.checkpoint import CheckpointError, StageCheckpoints, config_diff
from jaxppo.config import to_json
from jaxppo.errors import InputError
from jaxppo.logging import NullLogger, RunLogger, rewind_metrics
from jaxppo.lora import init_adapters
from jaxppo.models.config import ModelConfig
from jaxppo.pipeline_config import PipelineConfig
from jaxppo.rng import stream_key
from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.sequences import response_logprobs, response_scores
from jaxppo.sharding import init_sharded, make_mesh, shard_batch, shard_tree, to_host
from jaxppo.addition_task import AdditionTaskConfig
from jaxppo.tasks import AdditionTask, TextTask, TextTaskConfig, ToyTask

STAGES = ("sft", "reward_model", "dpo", "ppo")  # in run order; a run uses dpo (method="dpo") or ppo
CHECKPOINTED = (*STAGES, "preference_data")
# metrics.jsonl stage → pipeline stage that writes it
METRIC_STAGES = {"sft": "sft", "reward_model": "reward_model", "reward_model_eval": "reward_model",
                 "dpo": "dpo", "dpo_eval": "dpo", "dpo_online": "dpo",
                 "ppo": "ppo", "reward_model_online": "ppo", "eval": "ppo"}
STEP_LOG_EVERY = 50  # SFT / reward-model steps between metric rows
LOCK_FILE = ".lock"  # in the run directory: held (flock) by the process that runs it
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares; built by :func:`open_run`, never mutated."""

    config: PipelineConfig  # resolved (stop/pad tokens from the task): as saved in config.json
    mesh: Mesh
    root_key: jax.Array  # jax.random.key(config.seed)
    logger: RunLogger | NullLogger  # a NullLogger on every process but 0
    task: ToyTask | AdditionTask | TextTask
    checkpoints: Mapping[str, StageCheckpoints]  # per stage; empty when checkpoints are off

    def key(self, stream: str, step: int = 0) -> jax.Array:
        """The key of draw ``step`` of the named random stream."""
        return stream_key(self.root_key, stream, step)


# ------------------------------------------------------------------------------------ sampling, scoring


@functools.cache
def _sampler(model: ModelConfig, sampling: SamplingParams):
    return make_sampler(model, sampling)


@functools.cache
def _scorer(model: ModelConfig, pooling: str):
    return jax.jit(functools.partial(response_scores, model, pooling=pooling))


def sample(ctx: RunContext, params: dict, prompt, prompt_mask, key: jax.Array, *, greedy: bool = False):
    """Responses ``(tokens, mask)`` of the policy ``params`` for any number of prompts, in sampler
    batches of ``eval_batch_size`` (PPO's temperature / top-k / top-p, or greedy; stopping at the task's EOS)."""
    c = ctx.config
    sampling = SamplingParams(max_new_tokens=ctx.task.max_response_tokens, temperature=0.0 if greedy else c.ppo.temperature,
                              top_k=c.ppo.top_k, top_p=c.ppo.top_p, stop_token_ids=ctx.task.stop_token_ids,
                              pad_token_id=ctx.task.pad_token_id)
    sampler = _sampler(c.model, sampling)
    size, tokens, masks = c.eval_batch_size, [], []
    for chunk, start in enumerate(range(0, prompt.shape[0], size)):
        batch = shard_batch((prompt[start:start + size], prompt_mask[start:start + size]), ctx.mesh)
        out = sampler(params, *batch, jax.random.fold_in(key, chunk))
        tokens.append(out.tokens)
        masks.append(out.mask)
    return jnp.concatenate(tokens), jnp.concatenate(masks)


def _in_batches(ctx: RunContext, fn, params: dict, *args) -> jax.Array:
    """``fn(params, *args)`` of ``[B]`` rows computed in sharded batches of ``eval_batch_size``, concatenated."""
    size, n = ctx.config.eval_batch_size, args[0].shape[0]
    return jnp.concatenate([fn(params, *shard_batch(tuple(a[s:s + size] for a in args), ctx.mesh))
                            for s in range(0, n, size)])


def score(ctx: RunContext, reward_params: dict, *args) -> jax.Array:
    """Reward-model scores ``[B]`` of ``(prompt, prompt_mask, response, response_mask)``, in batches."""
    return _in_batches(ctx, _scorer(ctx.config.model, ctx.config.reward_model.pooling), reward_params, *args)


@functools.cache
def _summed_logprobs(model: ModelConfig, temperature: float):
    def summed(params, prompt, prompt_mask, response, response_mask):
        logprobs, _, _ = response_logprobs(model, params, prompt, prompt_mask, response, response_mask,
                                           temperature=temperature)
        return jnp.sum(logprobs * response_mask, axis=-1)

    return jax.jit(summed)


def sequence_kl(ctx: RunContext, params: dict, reference: dict, *args) -> float:
    r"""KL(π ‖ π_ref) per response, estimated on samples ``y ~ π`` (``args``: prompt, prompt_mask, response,
    response_mask): the mean over samples of :math:`\sum_t \log π(y_t \mid ·) − \log π_{ref}(y_t \mid ·)`,
    both at the sampling temperature (top-k / top-p truncation not modelled), in batches."""
    fn = _summed_logprobs(ctx.config.model, ctx.config.ppo.temperature)
    logprobs, ref_logprobs = (to_host(_in_batches(ctx, fn, p, *args)) for p in (params, reference))
    return float(np.mean(logprobs - ref_logprobs))


def evaluate(ctx: RunContext, params: dict, reward_params: dict | None = None, i: int = 0,
             samples_file: str = "", reference: dict | None = None) -> dict:
    """Gold (and proxy) reward of fresh samples of the policy on the fixed evaluation prompts;
    writes the first ``num_samples`` of them to ``samples_file`` when given. For a task whose gold
    reward is a verifier, also ``accuracy`` (of those samples, at PPO's temperature) and
    ``greedy_accuracy`` (of greedy responses). With ``reference`` (the SFT policy) also
    ``kl_to_sft``: :func:`sequence_kl` of the policy to it on those samples."""
    prompt, prompt_mask = ctx.task.eval_prompts()
    response, mask = sample(ctx, params, prompt, prompt_mask, ctx.key("eval-sample", i))
    args = tuple(to_host(a) for a in (prompt, prompt_mask, response, mask))
    gold = ctx.task.gold(*args)
    result = {"gold_reward": float(np.mean(gold)), "response_length": float(np.mean(np.sum(args[3], 1)))}
    if ctx.task.gold_is_accuracy:
        result["accuracy"] = result["gold_reward"]
        greedy = sample(ctx, params, prompt, prompt_mask, ctx.key("eval-sample", i), greedy=True)
        result["greedy_accuracy"] = float(np.mean(ctx.task.gold(*args[:2], *map(to_host, greedy))))
    if reference is not None:
        result["kl_to_sft"] = sequence_kl(ctx, params, reference, *args)
    proxy = None
    if reward_params is not None:
        proxy = to_host(score(ctx, reward_params, *args))
        result["proxy_reward"] = float(np.mean(proxy))
    if samples_file and ctx.config.num_samples:
        k = ctx.config.num_samples
        shown = ctx.task.render(*(a[:k] for a in args))
        for j, row in enumerate(shown):
            row["gold_reward"] = float(gold[j])
            if proxy is not None:
                row["proxy_reward"] = float(proxy[j])
        ctx.logger.write_json(samples_file, {"samples": shown})
    return result


# ---------------------------------------------------------------------------------------- checkpoints


def is_done(ctx: RunContext, stage: str) -> bool:
    """Whether the stage's newest checkpoint is marked done (the stage is skipped on resume)."""
    ckpt = ctx.checkpoints.get(stage)
    step = ckpt.latest_step() if ckpt else None
    return step is not None and bool(ckpt.read_meta(step).get("done"))


def resume(ctx: RunContext, stage: str, targets: dict):
    """``(start step, restored items or None, meta)`` from the stage's newest checkpoint."""
    ckpt = ctx.checkpoints.get(stage)
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        return 0, None, {}
    items, meta = ckpt.restore(step, targets)
    print(f"{stage}: resumed from {ckpt.directory / str(step)}")
    return step, items, meta


def params_digest(params: dict) -> str:
    """SHA-256 of a params tree (every leaf's path, dtype, shape and bytes, in path order): what a
    LoRA checkpoint records of the frozen base it was trained on."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda item: jax.tree_util.keystr(item[0])):
        value = to_host(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def base_meta(ctx: RunContext, base: dict | None) -> dict:
    """What a LoRA stage's checkpoints record of the frozen base: ``{"base": {"pretrained", "digest"}}``;
    ``{}`` without a base or without checkpoints (then nothing is saved or checked, so no digest is
    computed)."""
    if base is None or not ctx.checkpoints:
        return {}
    return {"base": {"pretrained": ctx.config.pretrained, "digest": params_digest(base)}}


def new_adapters(ctx: RunContext, stream: str) -> dict:
    """``{"lora": …}``: fresh LoRA adapters of ``lora.rank`` on ``lora.targets`` (B = 0), built sharded,
    from the named random stream: a LoRA stage's trained params before its heads."""
    c = ctx.config
    return init_sharded(lambda key: {"lora": init_adapters(c.model, key, rank=c.lora.rank, targets=c.lora.targets)},
                        ctx.mesh, ctx.key(stream))


def lora_dropout(ctx: RunContext, stream: str) -> dict:
    """The ``dropout_key`` keyword of a LoRA training step (SFT, reward model, DPO): the key of the named
    stream when ``lora.dropout > 0``, else none (the step then traces without dropout)."""
    return {"dropout_key": ctx.key(stream)} if ctx.config.lora.dropout > 0 else {}


def check_base(meta: dict, expected: dict, *, stage: str) -> None:
    """A restored LoRA checkpoint (``meta``) must have been trained on the base this run rebuilt
    (``expected``: ``{"base": {"pretrained", "digest"}}`` or ``{}`` without LoRA); InputError otherwise."""
    saved = meta.get("base")
    if saved is None or not expected:
        return
    if saved["digest"] != expected["base"]["digest"]:
        raise InputError(f"{stage} checkpoint: its LoRA adapters were trained on a base with digest "
                         f"{saved['digest'][:16]}… (pretrained {saved['pretrained']!r}); this run rebuilt a base "
                         f"with digest {expected['base']['digest'][:16]}… from {expected['base']['pretrained']!r}. "
                         "Resume with the same pretrained weights, or use a new --run-dir")


def save(ctx: RunContext, stage: str, step: int, items: dict, meta: dict | None = None) -> None:
    if stage in ctx.checkpoints:
        ctx.checkpoints[stage].save(step, items, meta)


def fit(ctx: RunContext, stage: str, state, step_fn, batch_at, steps: int, outputs: dict | None = None,
        recorded: dict | None = None):
    """``steps`` of ``state, metrics = step_fn(state, batch_at(i))`` with logs and periodic checkpoints.

    Returns ``(state, done_items, meta)``: when the stage's checkpoint says it is done, the saved
    outputs and meta instead of training again (``outputs`` are restore targets for those).
    Metrics reach the host once per logged step. ``recorded`` (LoRA: :func:`base_meta` of the frozen
    base) goes into every checkpoint's meta, and a restored one must match it (:func:`check_base`).
    """
    every = ctx.config.checkpoint.every_steps
    recorded = recorded or {}
    targets = {"state": state, **(outputs or {})} if is_done(ctx, stage) else {"state": state}
    start, items, meta = resume(ctx, stage, targets)
    check_base(meta, recorded, stage=stage)
    if items is not None:
        state = items["state"]
        if meta.get("done"):
            return state, items, meta
    bar = ctx.logger.progress(range(start, steps), desc=stage)
    for i in bar:
        state, metrics = step_fn(state, shard_batch(batch_at(i), ctx.mesh))
        if i % STEP_LOG_EVERY == 0 or i == steps - 1:
            bar.set_postfix(ctx.logger.log(stage, i, jax.device_get(metrics)))
        if (i + 1) % every == 0 and i + 1 < steps:
            save(ctx, stage, i + 1, {"state": state}, recorded)
    return state, None, {}


# ------------------------------------------------------------------------------------------- the run


def load_model(config: PipelineConfig):
    """``(base params or None, tokenizer or None)``; a pretrained checkpoint must match ``config.model``."""
    if not config.pretrained:
        return None, None
    from jaxppo.weights.hf import load_pretrained

    m = config.model
    try:
        loaded, params, tokenizer = load_pretrained(config.pretrained, param_dtype=m.param_dtype, dtype=m.dtype,
                                                    remat=m.remat, remat_policy=m.remat_policy)
    except ValueError as e:  # a malformed weights / config / tokenizer file: the message names it
        raise InputError(str(e)) from e
    for field in dataclasses.fields(m):
        if getattr(loaded, field.name) != getattr(m, field.name):
            raise InputError(f"config field `model.{field.name}`: {getattr(m, field.name)!r} does not match the "
                             f"pretrained checkpoint {config.pretrained} ({getattr(loaded, field.name)!r})")
    return params, tokenizer


class RunDirInUse(InputError):
    """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (created if missing) for the ``with`` block.

    A second process on the same directory stops at once with :class:`RunDirInUse`, naming the
    process that holds it. The lock is ``flock`` on ``run_dir/.lock``: the kernel drops it when its
    holder exits however it exits (``kill -9`` included), so a lock left by a dead process never
    blocks a resume. One process per run takes it: process 0 of a multi-process run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held for the block)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunDirInUse(f"{run_dir}: in use by {holder}; one process per run directory (stop it, or "
                              f"use another --run-dir)") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} (since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock


@contextlib.contextmanager
def lock_run(run_dir: Path) -> Iterator[None]:
    """:func:`lock_run_dir` taken by process 0 for every process of the run: process 0's outcome is
    broadcast, so when the directory is in use every process stops at once with the same error (none
    is left waiting at the first collective for a process 0 that has gone)."""
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(lock_run_dir(run_dir))
            except RunDirInUse as e:
                error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            message = np.zeros(512, np.uint8)
            if error is not None:
                text = str(error).encode()[:512]
                message[:len(text)] = np.frombuffer(text, np.uint8)
            message = np.asarray(multihost_utils.broadcast_one_to_all(message))
            if error is None and message.any():
                error = RunDirInUse(bytes(message[message > 0]).decode(errors="replace"))
        if error is not None:
            raise error
        yield


def _started(run_dir: Path) -> bool:
    """Whether an earlier run in ``run_dir`` got as far as a metrics row or a checkpoint."""
    metrics = run_dir / "metrics.jsonl"
    checkpoints = run_dir / "checkpoints"
    return ((metrics.exists() and metrics.stat().st_size > 0)
            or (checkpoints.is_dir() and any(p.is_dir() for stage in checkpoints.iterdir() if stage.is_dir()
                                             for p in stage.iterdir())))


def _check_run_config(run_dir: Path, config: dict) -> None:
    """A run directory belongs to one config: refuse to resume it with another (names the fields).

    Only once an earlier run started (logged a row or saved a checkpoint): a run that stopped before
    that, on a bad input say, does not tie the directory to its config.
    """
    path = run_dir / "config.json"
    if not path.exists() or not _started(run_dir):
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable ({e}); use a fresh --run-dir") from None
    diff = config_diff(saved, config)
    if diff:
        raise CheckpointError(f"{path}: this run directory was started with another config; "
                              f"mismatched fields: {'; '.join(diff)}. Use a fresh --run-dir or the same config.")


def _rewind(run_dir: Path, checkpoints: Mapping[str, StageCheckpoints]) -> None:
    """Cut ``metrics.jsonl`` back to the rows logged up to the newest checkpoint of the stage in progress."""
    current, resume_step = None, 0
    for stage in STAGES:
        ckpt = checkpoints[stage]
        step = ckpt.latest_step()
        if step is None:  # not started, or a stage that saves nothing (SFT of 0 steps)
            current = current or stage
        elif ckpt.read_meta(step).get("done"):
            current = None  # every stage up to here is finished (a skipped stage before it included)
        else:
            current, resume_step = stage, step
            later = [s for s in STAGES[STAGES.index(stage) + 1:] if checkpoints[s].latest_step() is not None]
            if later:  # its done checkpoint was damaged: the later stages were trained on what it finished
                raise CheckpointError(
                    f"{ckpt.directory}: {stage} would resume from step {step} (its newer checkpoint does not "
                    f"verify), but {', '.join(later)} already has checkpoints made after {stage} finished; move "
                    f"{', '.join(str(checkpoints[s].directory) for s in later)} away to run them again")
            break
    order = {s: i for i, s in enumerate(STAGES)}

    def keep(row: dict) -> bool:
        if row.get("stage") == "eval":  # written after PPO by every run, the resumed one too
            return False
        stage = METRIC_STAGES.get(row.get("stage"), row.get("stage"))
        if current is None or stage not in order:
            return True
        if order[stage] != order[current]:
            return order[stage] < order[current]
        return row.get("step", 0) < resume_step

    rewind_metrics(run_dir / "metrics.jsonl", keep)


def _check_metrics_file(run_dir: Path, checkpoints: Mapping[str, StageCheckpoints]) -> None:
    """Warn when a run resumes from checkpoints but its ``metrics.jsonl`` is gone: the run goes on and
    finishes; the rows logged before the checkpoint are lost (plots and summaries show only the rest)."""
    if (run_dir / "metrics.jsonl").exists():
        return
    resumed = [f"{stage}/{step}" for stage, ckpt in checkpoints.items() if (step := ckpt.latest_step()) is not None]
    if resumed:
        _log.warning(f"{run_dir / 'metrics.jsonl'}: missing, but the run resumes from checkpoints "
                     f"({', '.join(resumed)}); the metrics logged before them are lost, the run goes on")


@contextlib.contextmanager
def open_run(config: PipelineConfig, run_dir: str | Path) -> Iterator[tuple[RunContext, dict | None]]:
    """``(context, pretrained params or None)`` for a run in ``run_dir``, under the run's mesh.

    Every process of a multi-process run opens it with the same arguments: all of them compute and
    checkpoint (orbax coordinates the writes); only process 0 writes metrics, plots and files.
    """
    run_dir = Path(run_dir)
    main = jax.process_index() == 0
    mesh = make_mesh(config.mesh)  # checks the mesh against the devices before the directory is made
    with lock_run(run_dir):  # before the model and data load: a second run stops at once
        root_key = jax.random.key(config.seed)
        base_params, tokenizer = load_model(config)
        if isinstance(config.task, TextTaskConfig):
            task = TextTask(config.task, tokenizer, seed=config.seed, vocab_size=config.model.vocab_size)
            print(f"prompts: {config.task.prompts}: {task.num_truncated_prompts} truncated to "
                  f"{config.task.max_prompt_tokens} tokens")
        elif isinstance(config.task, AdditionTaskConfig):
            task = AdditionTask(config.task, functools.partial(stream_key, root_key))
        else:
            task = ToyTask(config.task, functools.partial(stream_key, root_key))
        config = config.resolved(stop_token_ids=task.stop_token_ids, pad_token_id=task.pad_token_id)
        as_json = to_json(config)
        _check_run_config(run_dir, as_json)
        checkpoints = {}
        if config.checkpoint.enabled:
            checkpoints = {name: StageCheckpoints(run_dir / "checkpoints" / name, keep=config.checkpoint.keep,
                                                  config=as_json) for name in CHECKPOINTED}
            if main:
                _check_metrics_file(run_dir, checkpoints)
                _rewind(run_dir, checkpoints)
        logger = RunLogger(run_dir, echo=None, wandb_project=config.wandb_project or None,
                           wandb_config=as_json) if main else NullLogger()
        with logger, jax.set_mesh(mesh):
            # written once every input has loaded and checked: the run is known to start
            logger.write_json("config.json", as_json)
            if base_params is not None:
                base_params = shard_tree(base_params, mesh)
            yield RunContext(config, mesh, root_key, logger, task, checkpoints), base_params
