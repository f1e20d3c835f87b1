"""Reward functions: programmatic, verifiable scores of responses, in place of a reward model.

A run lists the ones it uses by name (``PipelineConfig.reward_functions``, weights in
``reward_weights``); the task offers them (``task.reward_functions``). The score of a response is
the weighted sum, and each function's mean is logged as ``reward_<name>``. Two kinds:

* **jittable** (``host=False``): ``fn(prompt, prompt_mask, response, response_mask) -> [B]`` of token
  ids, traced into the rollout: it stays inside the one XLA program of a PPO iteration;
* **host** (``host=True``): ``fn(prompts: list[str], responses: list[str], answers: list[str | None])
  -> [B]`` of decoded text — a math verifier that parses the last number, a unit-test runner —
  called from inside the program through :func:`jax.pure_callback`: the program pauses, the token
  ids go to the host, are decoded, scored, and the scores come back. ``answers`` are the
  per-prompt ground truth (the ``answer`` field of a prompt file), looked up by each row's prompt
  tokens. The cost of leaving the program is measured in ``experiments/bench_rewards.py``.

:func:`make_score_fn` combines them into the rollout's ``score_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class RewardFunction(NamedTuple):
    """One named reward: ``fn`` as in the module docstring; ``host`` says which kind it is."""

    fn: Callable
    host: bool = False


class TextCodec(NamedTuple):
    """What a host reward function needs from the task: ``decode(tokens [B, T], mask [B, T]) ->
    list[str]`` (prompts and responses alike), and ``answers(prompt [B, P], prompt_mask [B, P]) ->
    list[str | None]`` (each prompt's ground truth, None where it has none)."""

    decode: Callable[[np.ndarray, np.ndarray], list[str]]
    answers: Callable[[np.ndarray, np.ndarray], list[str | None]]


def _host_scores(fn: Callable, codec: TextCodec):
    """The host side of a host reward function: token ids → texts → scores ``float32 [B]``."""

    def callback(prompt, prompt_mask, response, response_mask):
        prompt, prompt_mask = np.asarray(prompt), np.asarray(prompt_mask)
        prompts = codec.decode(prompt, prompt_mask)
        responses = codec.decode(np.asarray(response), np.asarray(response_mask))
        scores = np.asarray(fn(prompts, responses, codec.answers(prompt, prompt_mask)), np.float64)
        if scores.shape != (len(responses),):
            raise ValueError(f"reward function returned shape {scores.shape}, expected ({len(responses)},)")
        return scores.astype(np.float32)

    return callback


def make_score_fn(functions: dict[str, RewardFunction], weights: Sequence[float] | None = None, *,
                  codec: TextCodec | None = None):
    """``score_fn(prompt, prompt_mask, response, response_mask) -> (score [B], {name: [B]})``.

    .. math:: s_i = \\sum_k w_k\\, f_k(\\text{response}_i)

    over the named ``functions`` in order (``weights`` default to 1). Jittable: jittable functions are
    traced in; host functions run through :func:`jax.pure_callback` with ``codec`` (required then).
    """
    names = list(functions)
    weights = [1.0] * len(names) if weights is None or len(weights) == 0 else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"make_score_fn: {len(weights)} weights for {len(names)} reward functions {names}")
    if any(f.host for f in functions.values()) and codec is None:
        raise ValueError("make_score_fn: a host reward function needs the task's TextCodec (decode, answers)")
    host = {name: _host_scores(f.fn, codec) for name, f in functions.items() if f.host}

    def score_fn(prompt, prompt_mask, response, response_mask):
        batch = response.shape[0]
        parts = {}
        for name in names:
            if name in host:
                parts[name] = jax.pure_callback(host[name], jax.ShapeDtypeStruct((batch,), jnp.float32), prompt,
                                                prompt_mask, response, response_mask, vmap_method="sequential")
            else:
                parts[name] = functions[name].fn(prompt, prompt_mask, response, response_mask).astype(jnp.float32)
        total = sum(w * parts[name] for w, name in zip(weights, names))
        return total, parts

    return score_fn
