"""The peer side of ``experiments/bench.py``: TRL 1.12's PPOTrainer on the same work, in its own venv.

    .venv-bench/bin/python experiments/bench_trl.py --model DIR --prompts FILE.json --epochs 1 \
        --iterations 4 --out FILE.json

Runs in the ``make bench`` virtual environment (torch==2.13.0 CPU, trl==1.12.0); it imports neither
jax nor jaxppo. ``DIR`` is SmolLM2-135M-Instruct exported by jaxppo as a Hugging Face directory;
policy and reference are its causal LM, reward and value models its trunk with a scalar
``score`` head (``AutoModelForSequenceClassification``, as TRL's examples build them). The
settings mirror jaxppo's side exactly: one rollout batch of all prompts, ``num_mini_batches=1``,
``num_ppo_epochs=epochs``, ``response_length`` new tokens with no stop token (every response has
exactly that many tokens), temperature 0.7, k1 KL in the reward with β = 0.05, clip 0.2, value clip
0.2, vf_coef 0.1, γ = 1, λ = 0.95. The first iteration is a warm-up; the JSON holds the median
seconds per iteration of the rest, the generation seconds (``batch_generation``, timed by a
wrapper) and the process's peak RSS.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from peer import peak_rss_mib, peer_parser  # beside this script (it runs without jaxppo)


def main(argv=None) -> None:
    parser = peer_parser(__doc__, iterations=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trainer_module

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = json.load(open(args.prompts))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(args.model, **load)
    reference = AutoModelForCausalLM.from_pretrained(args.model, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, **load)
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id

    batch = len(prompts)
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=args.epochs, total_episodes=batch * args.iterations, local_rollout_forward_batch_size=batch,
        response_length=args.new_tokens, temperature=0.7, stop_token=None, missing_eos_penalty=None,
        kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        learning_rate=1e-6, num_sample_generations=0, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, logging_steps=1, seed=0, dataloader_drop_last=True,
    )
    dataset = Dataset.from_dict({"input_ids": prompts})

    generation_seconds = []
    original = trainer_module.batch_generation

    def timed_generation(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        generation_seconds.append(time.perf_counter() - start)
        return out

    trainer_module.batch_generation = timed_generation

    stamps = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value, callbacks=[Stamp()])
    trainer.train()
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {
        "trl_version": trl.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "epochs": args.epochs, "batch": batch, "new_tokens": args.new_tokens,
        "iteration_seconds": seconds, "generation_seconds": generation_seconds,
        "seconds_per_iteration": statistics.median(seconds[1:]),
        "generation_seconds_median": statistics.median(generation_seconds[1:]),
        "peak_rss_mib": peak_rss_mib(),
    }
    json.dump(result, open(args.out, "w"), indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
