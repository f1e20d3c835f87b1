"""PPO on SmolLM2-135M-Instruct: jaxppo against TRL 1.12's PPOTrainer, Tunix 0.1.7's PPOLearner and
transformers ``generate``, one run.

    make bench                                   # sets up the peers' venvs, then runs this
    python -m experiments.bench [--iterations 4] [--epochs 1 4] [--out FILE.json] [--trl-python PY]
        [--tunix-python PY] [--skip-trl] [--skip-tunix]

The peers run one after the other, each in its own process and venv (``experiments/bench_trl.py``,
``experiments/bench_tunix.py``: their docstrings say how each mirrors the work below); Tunix's
process peaks at about 19 GB, never run it beside another big job.

The work (identical on every side): 16 chat prompts ("Write one sentence about <topic>.", ≤ 64
tokens, left-padded), 64 new tokens per prompt at temperature 0.7 with no stop token (every
response has exactly 64 tokens, so both sides do the same arithmetic), actor + separate critic +
frozen reference + frozen reward model (SmolLM2 trunk + scalar head), k1 KL in the reward (β 0.05),
GAE (γ 1, λ 0.95), one minibatch of 16 per epoch, and one or four PPO epochs; fp32 everywhere.

Reported, per epochs setting:
* seconds per PPO iteration — jaxppo's fused iteration (``ppo.make_iteration``: one XLA program)
  and TRL's ``PPOTrainer`` step (median over the iterations after a warm-up);
* rollout tokens/s — jaxppo's jitted rollout (sampling + the four scoring passes + GAE), and its
  sampler alone against ``transformers`` ``generate`` (KV cache, same prompts, 64 tokens forced);
* update tokens/s and MFU — model FLOPs of the update (actor and critic forward + backward over
  epochs × 16 × (P + 64) tokens, counted analytically and checked against XLA's cost analysis)
  per second, over the fp32 matmul peak measured in this run (the better of a measurement at the
  start and one at the end: on a shared machine a single one can land in a slow spell);
* compile seconds, compilations per jitted function (each must be 1), peak RSS of each process.

jaxppo runs with its two CPU levers on (``--plain`` turns them off): ``model.remat`` with the
``"dots"`` policy (the backward pass re-reads saved matmul outputs and recomputes the cheap
elementwise work: less memory traffic, −16% on the actor's step here) and
``ppo.sampler_logprobs`` (the old log-probs come from the sampler, whose log-softmax at the same
temperature equals the forward pass up to float rounding: one actor forward pass fewer). Neither
changes the arithmetic of the update the MFU counts.

The JSON (``--out``) has at least ``jaxppo_seconds_per_iteration``, ``trl_seconds_per_iteration``,
``tunix_seconds_per_iteration``,
``jaxppo_rollout_tokens_per_s``, ``hf_generate_tokens_per_s``, ``update_mfu`` and
``compiles_per_function`` (for the first epochs setting; every setting is under ``settings``).
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
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench_sampling import hf_generate_fn, make_prompts, write_json
from experiments.peer import peak_rss_mib
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_scalar_head
from jaxppo.ppo import init_ppo, make_iteration, make_update
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import make_rollout
from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.sharding import MeshConfig, make_mesh
from jaxppo.weights import load_pretrained
from jaxppo.weights.gguf import smollm2_gguf_path
from jaxppo.weights.hf import save_pretrained

ROOT = Path(__file__).resolve().parent.parent
BATCH, NEW_TOKENS, TEMPERATURE = 16, 64, 0.7
PEERS = {"trl": "TRL 1.12 PPOTrainer", "tunix": "Tunix 0.1.7 PPOLearner"}


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Seconds of the first call (compile + run) and of ``repeats`` more calls."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def time_ppo_forms(config, ppo, state, frozen, params, prompt, prompt_mask, *, repeats: int, score_fn=None) -> dict:
    """Times one iteration in its three forms, each as :func:`timed` (a first call, then ``repeats``):
    fused (one XLA program), the rollout and the update as two programs, and the sampler alone.

    ``prompt`` / ``prompt_mask`` are ``[1, B, P]``; every response must have ``ppo.max_new_tokens``
    tokens (no stop token). Returns ``{form: (jitted function, first seconds, seconds)}`` for
    ``iteration``, ``rollout``, ``update``, ``sampler``, plus the last ``state`` and ``traj``.
    """
    iteration = make_iteration(config, ppo, score_fn=score_fn)
    held = {"state": state}
    step = iter(range(10_000))

    def run_iteration():
        i = next(step)
        new_state, samples, metrics = iteration(held["state"], frozen, prompt, prompt_mask, jax.random.key(i)[None],
                                                jax.random.key(1000 + i)[None])
        jax.block_until_ready((new_state, metrics))
        held["state"] = new_state
        assert int(samples["response_mask"].sum()) == ppo.batch_size * ppo.max_new_tokens

    out = {"iteration": (iteration, *timed(run_iteration, repeats))}
    rollout, update = make_rollout(config, ppo, score_fn=score_fn), make_update(config, ppo)

    def run_rollout():
        s = held["state"]
        held["traj"], _ = rollout(s.actor.params, None if s.critic is None else s.critic.params, frozen.reference,
                                  frozen.reward, prompt[0], prompt_mask[0], jax.random.key(next(step)), s.kl.kl_coef)
        jax.block_until_ready(held["traj"])

    def run_update():
        s = held["state"]
        a, c, m = update(s.actor, s.critic, held["traj"], jax.random.key(next(step)), s.kl.kl_coef, None)
        jax.block_until_ready((a, m))
        held["state"] = s.replace(actor=a, critic=c)

    out["rollout"] = (rollout, *timed(run_rollout, repeats))
    out["update"] = (update, *timed(run_update, repeats))
    sampler = make_sampler(config, SamplingParams(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature,
                                                  pad_token_id=0))
    out["sampler"] = (sampler, *timed(
        lambda: jax.block_until_ready(sampler(params, prompt[0], prompt_mask[0], jax.random.key(next(step))).tokens),
        repeats))
    return {**out, "state": held["state"], "traj": held["traj"]}


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Achieved FLOP/s of a jitted fp32 ``n × n`` matmul: the machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    _, times = timed(lambda: mm(a, b).block_until_ready(), repeats)
    return 2 * n**3 / min(times)


def forward_flops(config: ModelConfig, tokens: int, length: int, *, lm_head_tokens: int = 0) -> float:
    """Matmul FLOPs of a forward pass over ``tokens`` tokens in sequences of ``length``: 2 × weights
    per token for the projections and MLP, 4 × length × heads × head_dim per token and layer for
    the (dense) attention scores and mix, and 2 × d × V for each of the ``lm_head_tokens`` tokens
    whose logits are computed (PPO needs them at the response positions only)."""
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    per_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * config.intermediate_size)
    per_layer += 4 * length * h * hd
    return tokens * config.num_layers * per_layer + lm_head_tokens * 2 * d * config.vocab_size


def update_flops(config: ModelConfig, *, epochs: int, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of one PPO update: epochs × (actor + critic) × 3 × forward (backward = 2 × forward)."""
    length = prompt_len + new_tokens
    actor = forward_flops(config, batch * length, length, lm_head_tokens=batch * new_tokens)
    critic = forward_flops(config, batch * length, length)
    return epochs * 3 * (actor + critic)


def flops_check(config, params, reward, traj, ppo) -> dict:
    """The analytic update FLOPs against XLA's cost analysis of the compiled update, on a one-layer
    copy of the model (the cost analysis counts a loop body once: the decoder layers are a
    ``lax.scan``, so only with one layer, one epoch and one minibatch is every loop run once)."""
    one = dataclasses.replace(config, num_layers=1)
    first = lambda p: {**p, "layers": jax.tree.map(lambda x: x[:1], p["layers"])}  # noqa: E731
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    state, _ = init_ppo(one, ppo, mesh, sft_params=first(params), reward_params=first(reward), key=jax.random.key(0))
    update = make_update(one, ppo)
    compiled = update.lower(state.actor, state.critic, traj, jax.random.key(0), 0.05, None).compile()
    xla = float(compiled.cost_analysis()["flops"])
    batch, new_tokens = traj.response.shape
    analytic = update_flops(one, epochs=ppo.epochs, batch=batch, prompt_len=traj.prompt.shape[1], new_tokens=new_tokens)
    return {"analytic": analytic, "xla": xla, "ratio": xla / analytic}


def bench_ppo_config(*, epochs: int, iterations: int, plain: bool) -> PPOConfig:
    """The PPO settings of the benchmark's work (the TRL and Tunix sides mirror them)."""
    return PPOConfig(iterations=iterations, batch_size=BATCH, minibatches=1, epochs=epochs,
                     max_new_tokens=NEW_TOKENS, sampler_logprobs=not plain, temperature=TEMPERATURE,
                     stop_token_ids=(), pad_token_id=0, missing_eos_penalty=0.0, kl_coef=0.05, kl_estimator="k1",
                     clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, learning_rate=1e-6,
                     critic="separate")


def bench_jaxppo(config, params, tokens, mask, epochs: int, iterations: int, plain: bool) -> dict:
    if not plain:
        config = dataclasses.replace(config, remat=True, remat_policy="dots")
    ppo = bench_ppo_config(epochs=epochs, iterations=iterations, plain=plain)
    reward = {**{k: v for k, v in params.items() if k != "lm_head"},
              "reward_head": init_scalar_head(config, jax.random.key(1), "reward_head")}
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    # actor from the policy, critic from the reward model (its head → value head), frozen reference + reward
    ppo_state, frozen = init_ppo(config, ppo, mesh, sft_params=params, reward_params=reward, key=jax.random.key(2))
    prompt, prompt_mask = jnp.asarray(tokens)[None], jnp.asarray(mask)[None]
    length = tokens.shape[1] + NEW_TOKENS

    forms = time_ppo_forms(config, ppo, ppo_state, frozen, params, prompt, prompt_mask, repeats=iterations - 1)
    iteration, first, times = forms["iteration"]
    rollout, rollout_first, rollout_times = forms["rollout"]
    update, update_first, update_times = forms["update"]
    sampler, sampler_first, sampler_times = forms["sampler"]
    seconds = statistics.median(times)
    rollout_s, update_s = statistics.median(rollout_times), statistics.median(update_times)

    flops = update_flops(config, epochs=epochs, batch=BATCH, prompt_len=tokens.shape[1], new_tokens=NEW_TOKENS)
    check = flops_check(config, params, reward, forms["traj"], ppo) if epochs == 1 else None
    memory = iteration.lower(forms["state"], frozen, prompt, prompt_mask, jax.random.key(0)[None],
                             jax.random.key(1)[None]).compile().memory_analysis()
    return {
        "epochs": epochs, "prompt_length": int(tokens.shape[1]),
        "seconds_per_iteration": seconds, "iteration_times": times, "compile_seconds": first - seconds,
        "rollout_seconds": rollout_s, "rollout_tokens_per_s": BATCH * NEW_TOKENS / rollout_s,
        "rollout_compile_seconds": rollout_first - rollout_s,
        "sampler_tokens_per_s": BATCH * NEW_TOKENS / statistics.median(sampler_times),
        "update_seconds": update_s, "update_tokens_per_s": epochs * BATCH * length / update_s,
        "update_compile_seconds": update_first - update_s,
        "update_model_flops": flops, "flops_check_one_layer": check,
        "update_flops_per_s": flops / update_s,
        "compiles_per_function": {"iteration": iteration._cache_size(), "rollout": rollout._cache_size(),
                                  "update": update._cache_size(), "sampler": sampler._cache_size()},
        "xla_temp_mib": memory.temp_size_in_bytes / 2**20, "xla_argument_mib": memory.argument_size_in_bytes / 2**20,
        "peak_rss_mib": peak_rss_mib(),
    }


def bench_hf_generate(tokens, mask, pad_token_id: int, repeats: int) -> dict:
    run, info = hf_generate_fn(tokens, mask, pad_token_id=pad_token_id, new_tokens=NEW_TOKENS,
                               temperature=TEMPERATURE)
    first, times = timed(run, repeats)
    return {"tokens_per_s": BATCH * NEW_TOKENS / statistics.median(times), **info}


def bench_peer(script: str, python: str, model_dir: Path, prompts_file: Path, epochs: int, iterations: int) -> dict:
    """Runs a peer's side (``experiments/bench_trl.py`` or ``bench_tunix.py``) in its own venv; its JSON."""
    out = Path(tempfile.mkdtemp(prefix="jaxppo-bench-")) / f"{Path(script).stem}_{epochs}.json"
    cmd = [python, str(ROOT / "experiments" / script), "--model", str(model_dir), "--prompts", str(prompts_file),
           "--epochs", str(epochs), "--iterations", str(iterations), "--new-tokens", str(NEW_TOKENS), "--out",
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peer benchmark failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations per side; the first warms up")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                        help="python of the venv with torch==2.13.0 and trl==1.12.0 (made by `make bench`)")
    parser.add_argument("--tunix-python", default=str(ROOT / ".venv-bench-tunix" / "bin" / "python"),
                        help="python of the venv with google-tunix==0.1.7 (made by `make bench`)")
    parser.add_argument("--skip-trl", action="store_true", help="without TRL")
    parser.add_argument("--skip-tunix", action="store_true", help="without Tunix (its process peaks at ~19 GB)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--plain", action="store_true",
                        help="jaxppo without remat(dots) and sampler log-probs (its library defaults)")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first one warms up)")

    peak = matmul_peak()
    config, params, tokenizer = load_pretrained(smollm2_gguf_path())
    tokens, mask = make_prompts(tokenizer, BATCH)
    print(f"SmolLM2-135M-Instruct fp32 · {BATCH} prompts × ≤ {tokens.shape[1]} tokens · {NEW_TOKENS} new tokens · "
          f"T {TEMPERATURE} · {platform.processor() or platform.machine()}, {os.cpu_count()} cores · "
          f"jax {jax.__version__} on {jax.devices()[0].platform} · fp32 matmul peak (start) {peak / 1e9:.0f} GFLOP/s"
          f" · jaxppo {'defaults' if args.plain else 'with model.remat=dots, ppo.sampler_logprobs'}", flush=True)
    settings = {}
    for epochs in args.epochs:
        settings[epochs] = {"jaxppo": bench_jaxppo(config, params, tokens, mask, epochs, args.iterations,
                                                  args.plain)}
        print(f"jaxppo, {epochs} epoch(s): {settings[epochs]['jaxppo']['seconds_per_iteration']:.2f} s/iteration",
              flush=True)
    jax_rss = peak_rss_mib()
    hf = bench_hf_generate(tokens, mask, tokenizer.pad_token_id, args.iterations - 1)
    peers = {name: (script, python) for name, script, python, skip in (
        ("trl", "bench_trl.py", args.trl_python, args.skip_trl),
        ("tunix", "bench_tunix.py", args.tunix_python, args.skip_tunix)) if not skip}
    if peers:
        with tempfile.TemporaryDirectory(prefix="jaxppo-bench-") as tmp:
            model_dir = save_pretrained(Path(tmp) / "smollm2", config, params, tokenizer)
            prompts_file = Path(tmp) / "prompts.json"
            prompts_file.write_text(json.dumps([row[m > 0].tolist() for row, m in zip(tokens, mask)]))
            for name, (script, python) in peers.items():  # one peer process at a time (Tunix's peaks at ~19 GB)
                for epochs in args.epochs:
                    settings[epochs][name] = bench_peer(script, python, model_dir, prompts_file, epochs,
                                                        args.iterations)
                    print(f"{PEERS[name]}, {epochs} epoch(s): "
                          f"{settings[epochs][name]['seconds_per_iteration']:.2f} s/iteration", flush=True)

    peak = max(peak, matmul_peak())
    for setting in settings.values():
        setting["jaxppo"]["update_mfu"] = setting["jaxppo"]["update_flops_per_s"] / peak
    print_table(settings, hf, peak, jax_rss)
    first = settings[args.epochs[0]]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": jax.devices()[0].platform, "jax_version": jax.__version__},
        "matmul_peak_flops_per_s": peak,
        "jaxppo_levers": None if args.plain else {"model.remat_policy": "dots", "ppo.sampler_logprobs": True},
        "jaxppo_seconds_per_iteration": first["jaxppo"]["seconds_per_iteration"],
        "trl_seconds_per_iteration": first["trl"]["seconds_per_iteration"] if "trl" in first else None,
        "tunix_seconds_per_iteration": first["tunix"]["seconds_per_iteration"] if "tunix" in first else None,
        "jaxppo_rollout_tokens_per_s": first["jaxppo"]["rollout_tokens_per_s"],
        "jaxppo_sampler_tokens_per_s": first["jaxppo"]["sampler_tokens_per_s"],
        "hf_generate_tokens_per_s": hf["tokens_per_s"],
        "update_mfu": first["jaxppo"]["update_mfu"],
        "compiles_per_function": first["jaxppo"]["compiles_per_function"],
        "jaxppo_peak_rss_mib": jax_rss,
        "hf_generate": hf,
        "settings": {str(k): v for k, v in settings.items()},
    }
    write_json(args.out, result)
    return result


def print_table(settings: dict, hf: dict, peak: float, jax_rss: float) -> None:
    rows = []
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
    for epochs, s in settings.items():
        j = s["jaxppo"]
        for name, label in PEERS.items():
            t = s.get(name)
            rows.append((f"s / PPO iteration, {epochs} epoch(s), vs {label}", f"{j['seconds_per_iteration']:.2f}",
                         f"{t['seconds_per_iteration']:.2f}" if t else "-",
                         ratio(t["seconds_per_iteration"], j["seconds_per_iteration"]) if t else "-",
                         "peer / jaxppo ≥ 2x"))
            if t:
                gen = BATCH * NEW_TOKENS / t["generation_seconds_median"]
                rows.append((f"rollout tokens/s, {epochs} ep (jaxppo rollout | {name} generation)",
                             f"{j['rollout_tokens_per_s']:.0f}", f"{gen:.0f}", ratio(j["rollout_tokens_per_s"], gen),
                             ""))
        rows.append((f"update tokens/s, {epochs} epoch(s)", f"{j['update_tokens_per_s']:.0f}", "", "", ""))
        rows.append((f"update MFU, {epochs} epoch(s) ({j['update_flops_per_s'] / 1e9:.0f} GFLOP/s)",
                     f"{100 * j['update_mfu']:.1f}%", "", "", "≥ 50%"))
        rows.append((f"compile s, {epochs} ep (iteration | rollout | update)",
                     f"{j['compile_seconds']:.1f} | {j['rollout_compile_seconds']:.1f} | "
                     f"{j['update_compile_seconds']:.1f}", "", "", ""))
        rows.append((f"compilations per function, {epochs} ep",
                     " ".join(f"{k}={v}" for k, v in j["compiles_per_function"].items()), "", "", "each = 1"))
        for name in PEERS:
            if name in s:
                rows.append((f"peak RSS MiB, {epochs} ep (jaxppo | {name})", f"{jax_rss:.0f}",
                             f"{s[name]['peak_rss_mib']:.0f}", "", ""))
    j = next(iter(settings.values()))["jaxppo"]
    rows.append(("sampler tokens/s (jaxppo | transformers generate)", f"{j['sampler_tokens_per_s']:.0f}",
                 f"{hf['tokens_per_s']:.0f}", f"{j['sampler_tokens_per_s'] / hf['tokens_per_s']:.2f}x", "≥ 2x"))
    rows.append(("jaxppo rollout tokens/s vs transformers generate", f"{j['rollout_tokens_per_s']:.0f}",
                 f"{hf['tokens_per_s']:.0f}", f"{j['rollout_tokens_per_s'] / hf['tokens_per_s']:.2f}x", "≥ 2x"))
    check = j.get("flops_check_one_layer")
    if check:
        rows.append(("update FLOPs of a 1-layer copy (analytic | XLA cost analysis)", f"{check['analytic'] / 1e9:.2f} G",
                     f"{check['xla'] / 1e9:.2f} G", f"{check['ratio']:.2f}x", "≈ 1"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'jaxppo':>22}  {'peer':>10}  {'ratio':>7}  goal")
    for name, a, b, r, goal in rows:
        print(f"{name:<{width}}  {a:>22}  {b:>10}  {r:>7}  {goal}")
    print(f"(matmul peak {peak / 1e9:.0f} GFLOP/s fp32; peer = the named one, or transformers generate)")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
