"""Forward passes over (prompt, response): pooled reward-model scores."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.toy_task import sample_prompts
from tiny import MODEL, TASK, demonstrations_of


@pytest.mark.slow
def test_mean_pooled_score_is_the_mean_of_last_token_scores_of_the_response_prefixes():
    """A causal model's head at response token t is the last-token score of the response cut after t."""
    from jaxppo.sequences import response_scores

    params = {**{k: v for k, v in init_params(MODEL, jax.random.key(0)).items() if k != "lm_head"},
              "reward_head": init_scalar_head(MODEL, jax.random.key(1), "reward_head")}
    prompts, mask = sample_prompts(TASK, jax.random.key(2), 4)
    response, response_mask = demonstrations_of(prompts, mask, seed=3)
    response_mask = response_mask.at[0].set(0)  # an empty response scores the head's bias
    pooled = np.asarray(response_scores(MODEL, params, prompts, mask, response, response_mask, pooling="mean"))
    n = response.shape[1]
    for b in range(4):
        length = int(response_mask[b].sum())
        if length == 0:
            np.testing.assert_allclose(pooled[b], float(params["reward_head"]["bias"][0]), rtol=1e-6)
            continue
        prefix_scores = []
        for t in range(length):
            prefix_mask = (jnp.arange(n) <= t).astype(jnp.int32)[None]
            prefix_scores.append(float(response_scores(MODEL, params, prompts[b:b + 1], mask[b:b + 1],
                                                       response[b:b + 1], prefix_mask)[0]))
        np.testing.assert_allclose(pooled[b], np.mean(prefix_scores), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        response_scores(MODEL, params, prompts, mask, response, response_mask, pooling="max")
