"""The peer side of ``experiments/bench_grpo.py``: TRL's GRPOTrainer (current release) on the same work, in its own venv.

    .venv-bench-grpo/bin/python experiments/bench_trl_grpo.py --model DIR --prompts FILE.json --steps 3 \
        --out FILE.json

Runs in the ``make bench`` GRPO virtual environment (torch==2.13.0 CPU and the TRL release the
Makefile pins, 1.16.0 as of Nov 2026; TRL dropped PPOTrainer after 1.12, hence a venv of its own);
it imports neither jax nor jaxppo. ``DIR`` is SmolLM2-135M-Instruct exported by jaxppo as a Hugging
Face directory: the policy, and the frozen reference TRL loads from the same path. ``FILE.json``
holds the prompts as token-id lists; TRL takes prompts as text, so each is decoded and the script
checks that the tokenizer gives back exactly those ids.

The settings mirror jaxppo's side exactly: 16 prompts × ``num_generations=4`` = one generation batch
of 64 completions per step and one optimizer update (``num_iterations=1``), ``max_completion_length``
new tokens with EOS suppressed until then (``min_new_tokens``, as bench_trl.py forces PPO's length:
every completion has exactly 64 tokens), temperature 0.7, top-k/top-p off, β = 0.04 with TRL's KL
loss (k3, to a reference model), rewards scaled by the group std (``scale_rewards="group"``),
token-level clip 0.2 with the ``"dapo"`` aggregation (token mean over the batch; with equal lengths
every aggregation gives the same number), AdamW at lr 1e-6, fp32 (``bf16=False``: TRL's default is
bf16) and no gradient checkpointing (TRL's default is on; off is its faster setting at this size),
no vLLM, CPU. The update's forward + backward runs over ``--micro-batches`` gradient-accumulation
slices of the 64 (default 4 × 16): TRL's own memory lever, with the same arithmetic (``"dapo"``
divides by the whole batch's tokens) — in one slice of 64 TRL's process peaked at 18 GiB and was
killed on a 24 GiB machine shared with other work. The reference pass runs in the same slices.

The reward is ``even_token_fraction``: the share of completion tokens with an even id — cheap,
deterministic, the same function jaxppo's side jits.

The first step is a warm-up; the JSON holds the median seconds per step of the rest, the
generation seconds (``transformers`` ``generate`` inside ``_generate_single_turn``), the rollout
seconds (``_generate_and_score_completions``: generation + reference pass + rewards + advantages;
the step's remainder is the update: policy forward + backward + AdamW) and the peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

# run as a script (experiments/ is sys.path[0]) in the bench venv: bench_trl.py beside it imports no jax either
from bench_trl import peak_rss_mib


def even_token_fraction(completion_ids, **kwargs) -> list[float]:
    """The share of each completion's tokens whose id is even (jaxppo's side computes the same)."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists (one prompt each)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps; the first is a warm-up")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="gradient-accumulation slices of the step's completions (one optimizer update)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.prompts) as f:
        prompts = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
    for ids, text in zip(prompts, texts):  # TRL tokenizes the text again: it must give the same ids
        again = tokenizer(text)["input_ids"]
        if again != ids:
            raise ValueError(f"prompt does not round-trip through the tokenizer: {ids} -> {text!r} -> {again}")

    completions = len(prompts) * args.group_size
    if completions % args.micro_batches:
        parser.error(f"--micro-batches {args.micro_batches} must divide the {completions} completions")
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-bench-"), per_device_train_batch_size=completions // args.micro_batches,
        gradient_accumulation_steps=args.micro_batches, generation_batch_size=completions, num_generations=args.group_size, num_iterations=1, max_steps=args.steps,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=0.7, top_k=0, top_p=1.0, beta=0.04, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, model_init_kwargs={"dtype": "float32"}, bf16=False, fp16=False,
        gradient_checkpointing=False, use_vllm=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, log_completions=False, seed=0,
    )
    dataset = Dataset.from_dict({"prompt": texts})

    timings = {"generation": [], "rollout": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            timings[name].append(time.perf_counter() - start)
            return out
        return wrapper

    stamps = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(model=args.model, reward_funcs=even_token_fraction, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Stamp()])
    trainer._generate_single_turn = timed("generation", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    load_before = os.getloadavg()
    # one generation of all completions per optimizer step, and no extra old-log-prob pass
    assert trainer.args.steps_per_generation == args.micro_batches, trainer.args.steps_per_generation
    trainer.train()
    load_average = [round(x, 2) for x in (*load_before, *os.getloadavg())]

    # every completion had exactly new_tokens tokens (no EOS was sampled before the limit)
    lengths = [h for h in trainer.state.log_history if "completions/min_length" in h]
    assert all(h["completions/min_length"] == args.new_tokens for h in lengths), lengths
    seconds = [b - a for a, b in itertools.pairwise(stamps)]
    generation, rollout = timings["generation"], timings["rollout"]
    assert len(seconds) == len(rollout) == args.steps, (seconds, rollout)
    update = [s - r for s, r in zip(seconds, rollout)]
    result = {
        "trl_version": trl.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts), "group_size": args.group_size, "completions": completions,
        "new_tokens": args.new_tokens, "micro_batches": args.micro_batches, "prompt_length": max(map(len, prompts)),
        "step_seconds": seconds, "generation_seconds": generation, "rollout_seconds": rollout,
        "seconds_per_step": statistics.median(seconds[1:]),
        "generation_seconds_median": statistics.median(generation[1:]),
        "rollout_seconds_median": statistics.median(rollout[1:]),
        "update_seconds_median": statistics.median(update[1:]),
        "completion_length_min": min(h["completions/min_length"] for h in lengths),
        "peak_rss_mib": peak_rss_mib(),
        "load_average": load_average,  # 1/5/15-minute load before and after the steps: a shared machine shows here
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
