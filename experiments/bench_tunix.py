"""The JAX peer of ``experiments/bench.py``: Tunix 0.1.7's PPOLearner on the same work, in its own venv.

    .venv-bench-tunix/bin/python experiments/bench_tunix.py --model DIR --prompts FILE.json --epochs 1 \
        --iterations 3 --new-tokens 64 --out FILE.json

Runs in the ``.venv-bench-tunix`` virtual environment (google-tunix==0.1.7, jax and flax on CPU); it
imports neither torch nor jaxppo. ``DIR`` is SmolLM2-135M-Instruct exported by jaxppo as a Hugging Face
directory (its ``config.json`` gives the sizes), loaded four times into Tunix's Llama3
(``params.create_model_from_safe_tensors``, fp32):
the actor (trained; it is also the rollout model, as all roles share one 1x1 ``("fsdp", "tp")`` mesh),
the reference (frozen), the critic (trained) and the reward model (frozen). Critic and reward model
are the Llama3 trunk (embedding, 30 decoder layers, final norm; no LM head) with a scalar ``score``
head, ``ScoreModel`` below, the way Tunix's Gemma ``GemmaWithScoreHead`` is built; Tunix 0.1.7
ships no such head for Llama3. The rollout engine is "vanilla" (Tunix's own KV-cache sampler).

The settings mirror jaxppo's and TRL's sides: one rollout batch of all prompts per iteration,
``mini_batch_size`` = the batch (one optimizer step per epoch), ``num_iterations=epochs``, exactly
``--new-tokens`` new tokens, temperature 0.7 (``top_p=1``: plain categorical sampling), KL in the
reward with β = 0.05 and the k1 estimator (``kl_method="kl"``), clip 0.2, value clip 0.2, γ = 1,
λ = 0.95, Adam with learning rate 1e-6, no checkpointing, no eval, no metrics backend. Tunix trains
the critic with its own optimizer on its own loss, so there is no ``vf_coef`` (TRL's 0.1 scales the
value loss inside one shared Adam, where a constant factor hardly changes the update); it costs
nothing either way.

Adaptations, none of which changes the amount of work:
- Prompts go in as token ids. Tunix's sampler only takes strings, which it encodes with the
  tokenizer it is given; ``IdTokenizer`` hands token-id lists through unchanged (the batch holds
  them in an object array), so nothing is decoded and re-encoded.
- No early stop: the rollout's ``eos_tokens`` is ``[-1]``, an id the sampler can never draw, so
  every response has exactly ``--new-tokens`` tokens.
- Pad id 0 (``<|endoftext|>``, which no prompt contains) instead of the tokenizer's pad, which is
  ``<|im_end|>`` (id 2): Tunix builds its attention masks as ``token != pad``, and every chat prompt
  contains ``<|im_end|>``.
- Prompts are left-padded to the longest prompt (as TRL does), the KV cache holds prompt + response.
- ``ScoreModel.__call__`` drops ``segment_ids``: Tunix's ``common.compute_score`` always passes them
  (to critic and reward model), and Llama3's trunk does not take them.

Timing: ``PPOLearner._run_global_step`` (one PPO iteration: rollout, reference/old log-probs, values,
rewards, advantages, then ``epochs`` actor and critic steps) is wrapped to stamp the first call's
start and every call's end after the updated weights are ready (an iteration is the time from one
end to the next, as TRL's side counts it); the first iteration is a warm-up (it compiles), the JSON
holds the median seconds per iteration of the rest. The rollout's ``generate`` is wrapped too
(it returns host arrays, so it is synchronous) for the generation seconds; ``response_tokens``
lists the distinct response lengths it returned (``[new_tokens]`` when nothing stopped early).
``tunix_known_issues`` lists the Tunix 0.1.7 bugs checked in its source, with file:line under
``site-packages/tunix`` (the integer reward also shows at run time, as JAX's scatter FutureWarning
"cannot safely cast value from dtype=float32 to dtype=int32").
"""

from __future__ import annotations

import json
import statistics
import time

from peer import peak_rss_mib, peer_parser  # beside this script (it runs without jaxppo)


NEVER_SAMPLED = -1  # the rollout's only stop token: no vocabulary id equals it
PAD_ID = 0  # <|endoftext|>: in no prompt, so Tunix's ``token != pad`` masks keep every prompt token

KNOWN_ISSUES = [
    ("rl/ppo/ppo_learner.py:353-356: the reward-model score is added into "
    "jnp.zeros_like(completion_ids), an int32 array, so the score is truncated to an integer "
    "before the KL penalty is subtracted"),
    ("rl/rollout/vanilla_rollout.py:82-91 (old log-probs) and rl/algo_core.py:198-209 (policy loss) "
    "compute the policy's log-probs at temperature 1, while rl/rl_cluster.py:1005-1017 computes the "
    "reference's at the sampling temperature (0.7): the k1 KL in the reward compares the two"),
    ("rl/common.py:431-436: compute_score (critic values, rewards, value loss) always passes "
    "segment_ids= to the model, which models/llama3/model.py:622-628 (Llama3.__call__) does not "
    "accept; worked around by ScoreModel.__call__ dropping it"),
    ("models/llama3/model.py:352-361: Attention.block calls apply_rope without rope_theta, so "
    "every Llama3 uses apply_rope's default 1_000_000 and ModelConfig.rope_theta (100000 for "
    "SmolLM2) is ignored (changes the numbers, not the speed)"),
]


def main(argv=None) -> None:
    parser = peer_parser(__doc__, iterations=3)
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first one warms up)")

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import tunix
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.ppo import ppo_learner
    from tunix.rl.rollout import base_rollout

    class ScoreModel(nnx.Module):
        """A Llama3 trunk (no LM head) with a scalar ``score`` head: the critic and the reward model."""

        def __init__(self, trunk: llama3.Llama3, *, rngs: nnx.Rngs):
            self.trunk = trunk
            self.config = trunk.config
            dim = trunk.config.embed_dim
            self.score = nnx.Linear(dim, 1, use_bias=False, rngs=rngs,
                                    kernel_init=nnx.initializers.normal(stddev=1 / np.sqrt(dim + 1)))

        def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
            del cache, segment_ids  # Tunix's compute_score passes segment_ids; Llama3's layers don't take them
            x = self.trunk.embedder.encode(input_tokens)
            for layer in self.trunk.layers:
                _, x = layer(x, positions, None, attention_mask)
            return self.score(self.trunk.final_norm(x)), None

    class IdTokenizer:
        """Tunix's tokenizer interface over the HF tokenizer; ``encode`` hands token-id prompts through."""

        def __init__(self, hf):
            self.hf = hf

        def encode(self, prompt, **kwargs):
            return [int(t) for t in prompt] if not isinstance(prompt, str) else self.hf.encode(prompt, **kwargs)

        def decode(self, ids, **kwargs):
            return self.hf.decode(ids, **kwargs)

        def bos_id(self):
            return self.hf.bos_token_id  # prompts already start with it; Tunix dedups the one it prepends

        def eos_id(self):
            return self.hf.eos_token_id  # only a static argument to Tunix's scoring functions

        def pad_id(self):
            return PAD_ID

    prompts = json.load(open(args.prompts))
    assert not any(PAD_ID in p for p in prompts), "a prompt contains the pad id"
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    tokenizer = IdTokenizer(AutoTokenizer.from_pretrained(args.model))

    hf = json.load(open(f"{args.model}/config.json"))  # the Llama architecture's sizes, as exported
    config = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
        num_kv_heads=hf["num_key_value_heads"], rope_theta=hf["rope_theta"], norm_eps=hf["rms_norm_eps"],
        weight_tying=hf["tie_word_embeddings"],
    )
    # A jax.make_mesh mesh (explicit axis types) breaks Llama3's embedding lookup; a plain Mesh works.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 1), ("fsdp", "tp"))

    def load():
        return llama3_params.create_model_from_safe_tensors(args.model, config, mesh, dtype=jnp.float32)

    def with_score_head(seed):
        model = ScoreModel(load(), rngs=nnx.Rngs(seed))
        state = nnx.state(model)  # the new head is on the default device; put everything on the mesh
        nnx.update(model, jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        return model

    actor, reference, critic, reward = load(), load(), with_score_head(1), with_score_head(2)

    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.new_tokens, temperature=0.7, top_p=1.0, top_k=None, seed=0,
        max_prompt_length=prompt_len, kv_cache_size=prompt_len + args.new_tokens, eos_tokens=[NEVER_SAMPLED],
        data_type=jnp.float32,
    )
    training_config = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adam(1e-6), critic_optimizer=optax.adam(1e-6),
        eval_every_n_steps=10**9, max_steps=args.iterations * args.epochs,
        mini_batch_size=batch, train_micro_batch_size=batch,
        rollout_micro_batch_size=batch, compute_logps_micro_batch_size=batch,
        checkpoint_root_directory=None, metrics_logging_options=None,
    )
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.CRITIC,
             rl_cluster_lib.Role.REWARD, rl_cluster_lib.Role.ROLLOUT)
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, critic=critic, reward=reward, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in roles}, rollout_engine="vanilla", offload_to_cpu=False,
            training_config=training_config, rollout_config=rollout_config,
        ),
    )
    ppo_config = ppo_learner.PPOConfig(
        num_iterations=args.epochs, gamma=1.0, gae_lambda=0.95, beta=0.05, kl_method="kl",
        epsilon=0.2, clip_range_value=0.2, entropy_coef=None,
    )
    learner = ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=ppo_config)

    generation_seconds, response_tokens = [], set()
    generate = cluster.rollout.generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        generation_seconds.append(time.perf_counter() - start)
        response_tokens.update(len(tokens) for tokens in out.tokens)
        return out

    cluster.rollout.generate = timed_generate

    stamps = []
    global_step = learner._run_global_step

    def timed_global_step(*a, **k):
        if not stamps:
            stamps.append(time.perf_counter())
        global_step(*a, **k)
        jax.block_until_ready((nnx.state(cluster.actor_trainer.model), nnx.state(cluster.critic_trainer.model)))
        stamps.append(time.perf_counter())

    learner._run_global_step = timed_global_step

    ids = np.empty(batch, dtype=object)
    for i, p in enumerate(prompts):
        ids[i] = np.asarray(p, dtype=np.int32)
    learner.train([{"prompts": ids} for _ in range(args.iterations)])

    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {
        "tunix_version": tunix.__version__, "jax_version": jax.__version__, "flax_version": flax.__version__,
        "epochs": args.epochs, "batch": batch, "new_tokens": args.new_tokens,
        "response_tokens": sorted(response_tokens),
        "iteration_seconds": seconds, "generation_seconds": generation_seconds,
        "seconds_per_iteration": statistics.median(seconds[1:]),
        "generation_seconds_median": statistics.median(generation_seconds[1:]),
        "peak_rss_mib": peak_rss_mib(),
        "tunix_known_issues": KNOWN_ISSUES,
    }
    json.dump(result, open(args.out, "w"), indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
