"""Orbax stage checkpoints: save/restore round trip, and one clear error for every mismatch or corruption."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.checkpoint import CheckpointError, StageCheckpoints
from jaxppo.optim import create_train_state, make_optimizer


def tiny_state(width: int = 4):
    params = {"w": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width), "b": jnp.zeros(width)}
    return create_train_state(params, make_optimizer(learning_rate=1e-3))


def test_mismatched_and_corrupt_checkpoints_raise_one_clear_error(tmp_path):
    ckpt = StageCheckpoints(tmp_path / "ppo", keep=2, config={"ppo": {"kl_coef": 0.1}})
    state = tiny_state()
    ckpt.save(4, {"actor": state}, {"done": False})
    items, meta = ckpt.restore(4, {"actor": tiny_state()})
    np.testing.assert_array_equal(items["actor"].params["w"], state.params["w"])
    assert meta["step"] == 4
    # a different model shape: names the checkpoint path and the mismatched array
    with pytest.raises(CheckpointError, match=r"ppo/4/actor.*params/w shape \(3, 4\) in the checkpoint, \(3, 5\) now"):
        ckpt.restore(4, {"actor": tiny_state(width=5)})
    # a different config
    other = StageCheckpoints(tmp_path / "ppo", keep=2, config={"ppo": {"kl_coef": 0.2}})
    with pytest.raises(CheckpointError, match=r"ppo/4: saved with a different config.*ppo.kl_coef"):
        other.restore(4, {"actor": tiny_state()})
    # a missing item
    with pytest.raises(CheckpointError, match=r"has no item 'critic'"):
        ckpt.restore(4, {"critic": tiny_state()})
    # corrupt array data: every file of the stored arrays overwritten with garbage
    for path in (tmp_path / "ppo" / "4" / "actor").rglob("*"):
        if path.is_file() and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"ppo/4"):
        ckpt.restore(4, {"actor": tiny_state()})
