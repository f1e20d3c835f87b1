"""One process of the two-process test in e2e/test_multi_device.py (also runs alone as its single-process reference).

    python tests/distributed_worker.py --out FILE [--coordinator HOST:PORT --num-processes N --process-id I]

On an FSDP mesh over all devices of all processes (the test gives each of the two processes one
CPU device, as on real hosts, and the single-process reference two): one SFT step and one PPO
iteration (rollout → update, the roles from ``init_ppo``) of a tiny model from fixed keys; writes the losses and parameter
checksums as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.ppo import init_ppo, make_iteration
from jaxppo.ppo_config import PPOConfig
from jaxppo.sft import make_sft_step
from jaxppo.sharding import MeshConfig, init_sharded, initialize_distributed, make_mesh, shard_batch, to_host
from jaxppo.toy_task import EOS, PAD, ToyTaskConfig, demonstrations, gold_reward, sample_prompts

TASK = ToyTaskConfig(num_topics=2, words_per_topic=4, context_words=1, max_response_tokens=6, demo_min_words=1,
                     demo_max_words=4)
MODEL = ModelConfig(vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=32, tie_word_embeddings=False)
PPO = PPOConfig(batch_size=16, minibatches=2, epochs=2, max_new_tokens=TASK.max_response_tokens, stop_token_ids=(EOS,),
                pad_token_id=PAD, learning_rate=1e-3, kl_coef=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    tx = make_optimizer(learning_rate=1e-3)
    values = {}
    with jax.set_mesh(mesh):
        key = jax.random.key(0)
        base = init_params(MODEL, key)
        # SFT step on a demonstration batch (host data identical on every process; each keeps its slices)
        prompts = sample_prompts(TASK, jax.random.key(1), 16)
        response, response_mask = demonstrations(TASK, jax.random.key(4), *prompts)
        batch = {"prompt": prompts[0], "prompt_mask": prompts[1], "response": response, "response_mask": response_mask}
        sft_state = init_sharded(lambda p: create_train_state(p, tx), mesh, base)
        sft_state, sft_metrics = make_sft_step(MODEL)(sft_state, shard_batch(jax.tree.map(np.asarray, batch), mesh))
        values["sft_loss"] = float(sft_metrics["loss"])
        values["sft_params_sum"] = float(sum(np.sum(to_host(x)) for x in jax.tree.leaves(sft_state.params)))
        # PPO iteration: the roles built sharded by init_ppo, one unfused iteration (rollout → update)
        ppo = dataclasses.replace(PPO, critic_init="sft", fused=False)
        state, frozen = init_ppo(MODEL, ppo, mesh, sft_params=base, reward_params=None, key=key)
        iterate = make_iteration(MODEL, ppo, score_fn=lambda *a: gold_reward(TASK, *a))
        prompt, prompt_mask = shard_batch(jax.tree.map(np.asarray, prompts), mesh)
        state, samples, metrics = iterate(state, frozen, prompt[None], prompt_mask[None], jax.random.key(2)[None],
                                          jax.random.key(3)[None])
        for name, value in metrics.items():
            values[name] = float(value[0])
        values["response_sum"] = float(np.sum(to_host(samples["response"])))
        values["actor_params_sum"] = float(sum(np.sum(to_host(x)) for x in jax.tree.leaves(state.actor.params)))
        values["critic_params_sum"] = float(sum(np.sum(to_host(x)) for x in jax.tree.leaves(state.critic.params)))
    Path(args.out).write_text(json.dumps({"num_processes": jax.process_count(), "values": values}))
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
