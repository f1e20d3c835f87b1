"""The rollout: sampler log-probs, micro-batched scoring, bfloat16 frozen roles, the missing-EOS penalty."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxppo.models.heads import init_scalar_head
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import make_rollout
from jaxppo.toy_task import sample_prompts
from tiny import MODEL, PPO, TASK, gold_score, setup


def test_sampler_logprobs_replace_the_actor_pass_up_to_rounding():
    """``ppo.sampler_logprobs``: one forward pass fewer in the compiled rollout, same tokens, old
    log-probs within float rounding of the forward pass, and everything downstream follows them."""
    actor, critic, ref, traj, rollout, _ = setup()
    _, _, _, fast, fast_rollout, _ = setup(dataclasses.replace(PPO, sampler_logprobs=True))
    args = (actor.params, critic.params, ref, None, traj.prompt, traj.prompt_mask, jax.random.key(0), 0.05)
    passes = [r.lower(*args).as_text().count("stablehlo.while") for r in (rollout, fast_rollout)]
    assert passes[1] == passes[0] - 2, passes  # the actor pass: its layer scan and its chunked log-softmax
    np.testing.assert_array_equal(np.asarray(fast.response), np.asarray(traj.response))
    mask = np.asarray(traj.response_mask) > 0
    gap = np.abs(np.asarray(fast.old_logprobs) - np.asarray(traj.old_logprobs))[mask]
    assert gap.max() < 1e-5, gap.max()
    assert np.all(np.asarray(fast.old_logprobs)[~mask] == 0)
    for name in ("ref_logprobs", "old_values", "scores"):
        np.testing.assert_array_equal(np.asarray(getattr(fast, name)), np.asarray(getattr(traj, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(fast.kl), np.asarray(traj.kl), atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.advantages), np.asarray(traj.advantages), atol=1e-4)


@pytest.mark.slow
def test_micro_batched_scoring_gives_the_same_trajectory_in_less_memory():
    actor, critic, ref, traj, rollout, _ = setup()
    ppo = dataclasses.replace(PPO, score_micro_batches=4)
    _, _, _, micro, micro_rollout, _ = setup(ppo)
    for name in ("response", "response_mask", "old_logprobs", "ref_logprobs", "old_values", "scores", "advantages"):
        np.testing.assert_allclose(np.asarray(getattr(micro, name)), np.asarray(getattr(traj, name)), atol=1e-5,
                                   err_msg=name)
    args = (actor.params, critic.params, ref, None, traj.prompt, traj.prompt_mask, jax.random.key(0), 0.05)
    temp = [r.lower(*args).compile().memory_analysis().temp_size_in_bytes for r in (rollout, micro_rollout)]
    assert temp[1] < temp[0], temp
    with pytest.raises(ValueError, match="ppo.score_micro_batches"):
        dataclasses.replace(PPO, score_micro_batches=3)


def test_bfloat16_frozen_roles_halve_their_memory_and_stay_close():
    from jaxppo.models.config import cast_params

    actor, _, ref, _, _, _ = setup()
    reward = {**ref, "reward_head": init_scalar_head(MODEL, jax.random.key(5), "reward_head")}
    prompts = sample_prompts(TASK, jax.random.key(7), PPO.batch_size)
    ppo = dataclasses.replace(PPO, critic="shared")
    actor_params = {**actor.params, "value_head": init_scalar_head(MODEL, jax.random.key(6), "value_head")}
    runs = {}
    for dtype in (None, "bfloat16"):
        frozen = cast_params((ref, reward), dtype)
        rollout = make_rollout(MODEL, dataclasses.replace(ppo, frozen_dtype=dtype))
        runs[dtype], _ = rollout(actor_params, None, *frozen, *prompts, jax.random.key(8), 0.05)
        if dtype:
            nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
            assert nbytes(frozen) == nbytes((ref, reward)) // 2
    fp32, bf16 = runs[None], runs["bfloat16"]
    np.testing.assert_array_equal(np.asarray(bf16.response), np.asarray(fp32.response))  # the actor is fp32
    np.testing.assert_array_equal(np.asarray(bf16.old_logprobs), np.asarray(fp32.old_logprobs))
    mask = np.asarray(fp32.response_mask) > 0
    gap = np.abs(np.asarray(bf16.ref_logprobs) - np.asarray(fp32.ref_logprobs))[mask]
    assert 0 < gap.max() < 0.1, gap.max()  # bfloat16 rounding: visible, small
    np.testing.assert_allclose(np.asarray(bf16.scores), np.asarray(fp32.scores), atol=0.05)


def test_default_ppo_config_does_not_penalise_responses_that_cannot_stop():
    """No stop tokens (the default): no response can end with one, so none loses the missing-EOS penalty."""
    ppo = PPOConfig(batch_size=8, minibatches=1, epochs=1, max_new_tokens=4, critic_init="sft")
    assert ppo.stop_token_ids == () and ppo.missing_eos_penalty == 1.0
    _, _, _, traj, _, _ = setup(ppo)
    prompts = (traj.prompt, traj.prompt_mask, traj.response, traj.response_mask)
    np.testing.assert_allclose(np.asarray(traj.scores), np.asarray(gold_score(*prompts)))
