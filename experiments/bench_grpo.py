"""GRPO on SmolLM2-135M-Instruct: jaxppo against TRL's GRPOTrainer (current release), one run.

    make bench                                   # sets up the venvs, then runs this (after experiments.bench)
    python -m experiments.bench_grpo [--steps 3] [--out FILE.json] [--trl-python PY] [--skip-trl] [--plain]

The work (identical on both sides): 16 chat prompts ("Write one sentence about <topic>.", ≤ 64
tokens, left-padded: the prompts of ``experiments.bench``) × 4 samples each = 64 completions per
step, 64 new tokens at temperature 0.7 with no stop token (every completion has exactly 64 tokens,
so both sides do the same arithmetic), group-std-scaled GRPO advantages, the token-level clipped
surrogate (ε 0.2, token mean) plus β·KL to a frozen reference as a loss term (β = 0.04, the k3
estimator), one epoch of one minibatch (one AdamW update per batch, lr 1e-6), no critic, fp32.

The reward is ``even_token_fraction``: the share of response tokens with an even token id. It is
deterministic and cheap on both sides — a jitted elementwise op over ``[64, 64]`` ids inside
jaxppo's program (negligible next to a 135M-parameter forward pass), a Python loop over 4 096
ints in TRL — so the benchmark times the RL machinery, not the reward.

jaxppo runs ``ppo.make_iteration`` (rollout + update: one XLA program per step) with the levers of
``experiments.bench`` (``--plain`` turns them off): ``model.remat`` with the ``"dots"`` policy and
``ppo.sampler_logprobs`` (old log-probs from the sampler; TRL too skips that forward pass when
``num_iterations=1``, using the detached log-probs of its training forward pass). TRL's side is
``experiments/bench_trl_grpo.py`` in its own venv (``.venv-bench-grpo``), loading the same weights
exported by jaxppo as a Hugging Face directory and the same prompt token ids.

Reported: seconds per step on both sides (median over the steps after a warm-up) and the ratio
TRL / jaxppo (goal ≥ 2×); each side's step split into generation, rollout (generation + reference
pass + reward + advantages) and update (policy forward + backward + optimizer), to say what bounds
the ratio; compile seconds, compilations per jitted function, peak RSS.

The JSON (``--out``) has at least ``jaxppo_grpo_seconds_per_step``, ``trl_grpo_seconds_per_step``
and ``ratio`` (None with ``--skip-trl``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench import peak_rss_mib, time_ppo_forms
from experiments.bench_sampling import make_prompts, write_json
from jaxppo.ppo import init_ppo
from jaxppo.ppo_config import PPOConfig
from jaxppo.sharding import MeshConfig, make_mesh
from jaxppo.weights import load_pretrained
from jaxppo.weights.gguf import smollm2_gguf_path
from jaxppo.weights.hf import save_pretrained

ROOT = Path(__file__).resolve().parent.parent
PROMPTS, GROUP, NEW_TOKENS, TEMPERATURE, BETA = 16, 4, 64, 0.7, 0.04
COMPLETIONS = PROMPTS * GROUP


def even_token_fraction(prompt, prompt_mask, response, response_mask):
    """``[B]``: the share of each response's tokens with an even id (TRL's side computes the same)."""
    even = (response % 2 == 0).astype(jnp.float32) * response_mask
    return jnp.sum(even, axis=1) / jnp.maximum(jnp.sum(response_mask, axis=1), 1)


def grpo_config(steps: int, plain: bool) -> PPOConfig:
    return PPOConfig(
        estimator="grpo", group_size=GROUP, batch_size=COMPLETIONS, iterations=steps, epochs=1, minibatches=1,
        kl_in_reward=False, kl_coef=BETA, kl_estimator="k3", temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS,
        stop_token_ids=(), pad_token_id=0, missing_eos_penalty=0.0, clip_eps=0.2, learning_rate=1e-6,
        sampler_logprobs=not plain,
    )


def bench_jaxppo(config, params, tokens, mask, steps: int, plain: bool) -> dict:
    if not plain:
        config = dataclasses.replace(config, remat=True, remat_policy="dots")
    ppo = grpo_config(steps, plain)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    state, frozen = init_ppo(config, ppo, mesh, sft_params=params, reward_params=None, key=jax.random.key(2))
    assert state.critic is None, "GRPO builds no critic"
    # each prompt repeated GROUP times in consecutive rows: [1, 64, P]
    prompt = jnp.repeat(jnp.asarray(tokens), GROUP, axis=0)[None]
    prompt_mask = jnp.repeat(jnp.asarray(mask), GROUP, axis=0)[None]
    forms = time_ppo_forms(config, ppo, state, frozen, params, prompt, prompt_mask, repeats=steps - 1,
                           score_fn=even_token_fraction)
    iteration, first, times = forms["iteration"]
    rollout, rollout_first, rollout_times = forms["rollout"]
    update, update_first, update_times = forms["update"]
    sampler, _, sampler_times = forms["sampler"]
    seconds = statistics.median(times)
    return {
        "prompt_length": int(tokens.shape[1]), "levers": None if plain else ["model.remat=dots", "ppo.sampler_logprobs"],
        "seconds_per_step": seconds, "step_times": times, "compile_seconds": first - seconds,
        "generation_seconds": statistics.median(sampler_times),
        "rollout_seconds": statistics.median(rollout_times),
        "update_seconds": statistics.median(update_times),
        "rollout_compile_seconds": rollout_first - statistics.median(rollout_times),
        "update_compile_seconds": update_first - statistics.median(update_times),
        "compiles_per_function": {"iteration": iteration._cache_size(), "rollout": rollout._cache_size(),
                                  "update": update._cache_size(), "sampler": sampler._cache_size()},
        "peak_rss_mib": peak_rss_mib(),
    }


def bench_trl(python: str, model_dir: Path, prompts_file: Path, steps: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="jaxppo-bench-grpo-")) / "trl_grpo.json"
    cmd = [python, str(ROOT / "experiments" / "bench_trl_grpo.py"), "--model", str(model_dir), "--prompts",
           str(prompts_file), "--steps", str(steps), "--group-size", str(GROUP), "--new-tokens", str(NEW_TOKENS),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL GRPO benchmark failed, exit {proc.returncode} ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per side; the first warms up")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-bench-grpo" / "bin" / "python"),
                        help="python of the venv with torch==2.13.0 and the current trl (made by `make bench`)")
    parser.add_argument("--skip-trl", action="store_true", help="jaxppo only")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--plain", action="store_true",
                        help="jaxppo without remat(dots) and sampler log-probs (its library defaults)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first one warms up)")

    config, params, tokenizer = load_pretrained(smollm2_gguf_path())
    tokens, mask = make_prompts(tokenizer, PROMPTS)
    print(f"GRPO · SmolLM2-135M-Instruct fp32 · {PROMPTS} prompts (≤ {tokens.shape[1]} tokens) × {GROUP} samples · "
          f"{NEW_TOKENS} new tokens · T {TEMPERATURE} · β {BETA} (k3 loss) · 1 update/step · "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores · jax {jax.__version__} on "
          f"{jax.devices()[0].platform}", flush=True)
    trl = None
    if not args.skip_trl:  # TRL first: its process peaks at ~18 GiB, jaxppo's would still hold its own beside it
        with tempfile.TemporaryDirectory(prefix="jaxppo-bench-grpo-") as tmp:
            model_dir = save_pretrained(Path(tmp) / "smollm2", config, params, tokenizer)
            prompts_file = Path(tmp) / "prompts.json"
            prompts_file.write_text(json.dumps([row[m > 0].tolist() for row, m in zip(tokens, mask)]))
            trl = bench_trl(args.trl_python, model_dir, prompts_file, args.steps)
        print(f"TRL {trl['trl_version']}: {trl['seconds_per_step']:.2f} s/step (load average {trl['load_average']})",
              flush=True)
    load_before = os.getloadavg()
    jaxppo = bench_jaxppo(config, params, tokens, mask, args.steps, args.plain)
    jaxppo["load_average"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    print(f"jaxppo: {jaxppo['seconds_per_step']:.2f} s/step (load average {jaxppo['load_average']})", flush=True)

    ratio = trl["seconds_per_step"] / jaxppo["seconds_per_step"] if trl else None
    print_table(jaxppo, trl)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": jax.devices()[0].platform, "jax_version": jax.__version__},
        "work": {"prompts": PROMPTS, "group_size": GROUP, "completions": COMPLETIONS, "new_tokens": NEW_TOKENS,
                 "temperature": TEMPERATURE, "beta": BETA, "kl_estimator": "k3", "updates_per_step": 1},
        "jaxppo_grpo_seconds_per_step": jaxppo["seconds_per_step"],
        "trl_grpo_seconds_per_step": trl["seconds_per_step"] if trl else None,
        "ratio": ratio,
        "trl_version": trl["trl_version"] if trl else None,
        "jaxppo": jaxppo,
        "trl": trl,
    }
    write_json(args.out, result)
    return result


def print_table(j: dict, t: dict | None) -> None:
    ratio = lambda a, b: f"{a / b:.2f}x" if t and b else "-"
    peer = lambda key, fmt="{:.2f}": fmt.format(t[key]) if t else "-"
    rows = [
        ("s / GRPO step (64 completions, 1 update)", f"{j['seconds_per_step']:.2f}", peer("seconds_per_step"),
         ratio(t["seconds_per_step"], j["seconds_per_step"]) if t else "-", "TRL / jaxppo ≥ 2x"),
        ("  generation s (jaxppo sampler alone | TRL generate)", f"{j['generation_seconds']:.2f}",
         peer("generation_seconds_median"),
         ratio(t["generation_seconds_median"], j["generation_seconds"]) if t else "-", ""),
        ("  rollout s (generation + reference + reward + advantages)", f"{j['rollout_seconds']:.2f}",
         peer("rollout_seconds_median"), ratio(t["rollout_seconds_median"], j["rollout_seconds"]) if t else "-", ""),
        ("  update s (forward + backward + AdamW)", f"{j['update_seconds']:.2f}", peer("update_seconds_median"),
         ratio(t["update_seconds_median"], j["update_seconds"]) if t else "-", ""),
        ("compile s (step | rollout | update)",
         f"{j['compile_seconds']:.1f} | {j['rollout_compile_seconds']:.1f} | {j['update_compile_seconds']:.1f}",
         "", "", ""),
        ("compilations per function", " ".join(f"{k}={v}" for k, v in j["compiles_per_function"].items()), "", "",
         "each = 1"),
        ("peak RSS MiB", f"{j['peak_rss_mib']:.0f}", peer("peak_rss_mib", "{:.0f}"), "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'jaxppo':>30}  {'TRL':>8}  {'ratio':>7}  goal")
    for name, a, b, r, goal in rows:
        print(f"{name:<{width}}  {a:>30}  {b:>8}  {r:>7}  {goal}")
    print(f"(TRL = {'GRPOTrainer ' + t['trl_version'] + ', torch ' + t['torch_version'] if t else 'skipped'}; "
          "ratio = TRL seconds / jaxppo seconds)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
