"""The pipeline package's host helpers: iterations per call, rewinding metrics on resume (the stages
themselves run in tests/e2e/)."""

from __future__ import annotations

import functools

import pytest

from jaxppo.pipeline.ppo import iterations_in_call


def test_iterations_in_call_stop_at_host_work():
    calls = functools.partial(iterations_in_call, iterations=10, per_call=4)
    assert calls(0, host_every=(0, 0)) == 4
    assert calls(8, host_every=(0,)) == 2  # the end of the run
    assert calls(0, host_every=(3, 0)) == 3 and calls(3, host_every=(3, 2)) == 1  # a checkpoint, a refresh
    assert iterations_in_call(5, iterations=10, per_call=1, host_every=(7,)) == 1


def _checkpoints(root, done: dict):
    """Stage checkpoints under ``root``: ``done[stage]`` is None (never saved), a step in progress,
    or ``(step, True)`` for a finished stage."""
    import jax.numpy as jnp

    from jaxppo.checkpoint import StageCheckpoints
    from jaxppo.pipeline.context import CHECKPOINTED

    out = {name: StageCheckpoints(root / name, keep=2, config={}) for name in CHECKPOINTED}
    for stage, state in done.items():
        if state is not None:
            step, finished = state if isinstance(state, tuple) else (state, False)
            out[stage].save(step, {"state": {"w": jnp.zeros(2)}}, {"done": finished})
    return out


@pytest.mark.parametrize("sft, expected_stages", [
    ((10, True), {"sft", "reward_model", "reward_model_eval", "ppo<4"}),
    (None, {"reward_model", "reward_model_eval", "ppo<4"}),  # sft.steps = 0 saves nothing; RM rows are kept
])
def test_rewind_cuts_metrics_back_to_the_newest_checkpoint(tmp_path, sft, expected_stages):
    from jaxppo.logging import RunLogger, read_metrics
    from jaxppo.pipeline.context import _rewind

    with RunLogger(tmp_path, echo=None, tensorboard=False) as run:
        if sft is not None:
            run.log("sft", 0, {"loss": 1.0})
        run.log("reward_model", 0, {"loss": 1.0})
        run.log("reward_model_eval", 10, {"accuracy": 0.9})
        for it in range(6):
            run.log("ppo", it, {"kl": 0.1})
        run.log("reward_model_online", 4, {"loss": 0.5})
        run.log("eval", 6, {"gold_reward": 1.0})
    _rewind(tmp_path, _checkpoints(tmp_path / "checkpoints", {"sft": sft, "reward_model": (10, True), "ppo": 4}))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    kept = {r["stage"] if r["stage"] != "ppo" else "ppo<4" for r in rows}
    assert kept == expected_stages
    assert [r["step"] for r in rows if r["stage"] == "ppo"] == [0, 1, 2, 3]  # iteration 4 on reruns
