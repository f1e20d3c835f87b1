"""The pipeline package's pure helpers (the stages themselves run in tests/e2e/)."""

from __future__ import annotations

import functools


from jaxppo.pipeline.ppo import iterations_in_call


def test_iterations_in_call_stop_at_host_work():
    calls = functools.partial(iterations_in_call, iterations=10, per_call=4)
    assert calls(0, host_every=(0, 0)) == 4
    assert calls(8, host_every=(0,)) == 2  # the end of the run
    assert calls(0, host_every=(3, 0)) == 3 and calls(3, host_every=(3, 2)) == 1  # a checkpoint, a refresh
    assert iterations_in_call(5, iterations=10, per_call=1, host_every=(7,)) == 1
