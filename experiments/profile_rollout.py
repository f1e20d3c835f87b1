"""Where a decode step's time goes: an XLA profile of the engine and the static sampler, split by kind of work.

    python -m experiments.profile_rollout [--out FILE.json]

Runs each program once under :func:`jax.profiler.trace` (after a warm-up call), reads the trace's
XLA CPU thunk events (one per executed HLO instruction or fusion), takes each event's *own* time
(its duration less that of the events nested in it: a ``while`` thunk contains its body's), maps it
to the HLO instruction's ``op_name`` (the JAX name stack, which carries the Flax module path) and
sums by kind:

* ``weight matmuls`` — the Q/K/V, output, gate/up and down projections and the LM head;
* ``layer slices`` — the layer ``scan``'s copy of each layer's slice of the stacked weights and KV cache;
* ``attention`` — scores, mask, softmax, weighted sum of values, RoPE (everything else under ``attn/``);
* ``MLP + norms`` — SiLU·up, RMSNorms, residual adds, the embedding lookup;
* ``sampling`` — per-request keys (threefry), the inverse-CDF draw, log-softmax (``choose``);
* ``cache + output writes`` — the KV cache write (``dynamic_update_slice`` or the engine's per-row
  scatter) and the engine's token / log-prob output scatters;
* ``refill + compaction`` — the engine's ``lax.cond`` branch that copies a request's prompt
  keys/values into a slot, and the drain's compaction;
* ``LoRA adapters`` — the ``x A B`` of LoRA adapters (:mod:`jaxppo.lora`), where params hold them;
* ``prefill`` — everything outside the decode loop: the batched forward pass over the prompts, the set-up;
* ``loop + other`` — the loop itself, its conditions, masks, index arithmetic, copies (also XLA's
  unnamed ones).
The names come from ``jax.named_scope`` in :func:`jaxppo.sampling.choose`, the decoder's cache
write and the engine (free at run time) and from the Flax module path.

Workloads (SmolLM2-135M-Instruct fp32, T 0.7, the ``bench_rollout`` prompts): *uniform* — 16
prompts × 64 forced tokens, static sampler and engine (16 slots); *long tail* — 64 requests with
the ``bench_rollout`` caps, engine with 16 slots. Per-step figures divide by the decode steps.
Profiling adds overhead per thunk: read the split, not the absolute time (``bench_rollout`` times).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench_rollout import LONG_MAX, LONG_REQUESTS, LONG_SLOTS, TEMPERATURE, UNIFORM_BATCH, \
    UNIFORM_TOKENS, long_tail_caps
from experiments.bench import bench_ppo_config
from experiments.bench_sampling import make_prompts, write_json
from jaxppo.engine import make_generator
from jaxppo.models.heads import init_scalar_head
from jaxppo.ppo import init_ppo
from jaxppo.rollout import make_rollout
from jaxppo.sampling import SamplingParams, sample
from jaxppo.sharding import MeshConfig, make_mesh
from jaxppo.weights import load_pretrained
from jaxppo.weights.gguf import smollm2_gguf_path

KINDS = ("weight matmuls", "layer slices", "attention", "MLP + norms", "sampling", "cache + output writes",
         "refill + compaction", "LoRA adapters", "prefill", "loop + other")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', re.M)
PHASES = ("generate", "reward", "critic", "reference", "actor", "advantages + other")
_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ', re.M)
_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def kind_of(op_name: str, *, in_loop: bool) -> str:
    """The kind of work of an HLO instruction, from its JAX name stack (see the module docstring)."""
    if not op_name:
        return "loop + other"  # instructions XLA adds (copies of loop-carried buffers) carry no name
    if "refill" in op_name or "compact" in op_name:
        return "refill + compaction"
    if not in_loop:
        return "prefill"
    if "/lora/" in op_name:
        return "LoRA adapters"
    if any(p in op_name for p in _PROJECTIONS) or ("dot_general" in op_name and "/attn/" not in op_name):
        return "weight matmuls"  # the projections, and the LM head (the tied embedding) outside the layers
    if "Decoder/while/body/jit(dynamic_index_in_dim)" in op_name:
        return "layer slices"  # the layer scan's per-layer slice of the stacked weights and cache
    if "/attn/" in op_name:
        return "attention"
    if "sampling" in op_name or "token_keys" in op_name:
        return "sampling"
    if "cache_write" in op_name or "output_write" in op_name:
        return "cache + output writes"
    if "/mlp/" in op_name or "norm" in op_name or "/embed" in op_name or "/layers/" in op_name:
        return "MLP + norms"
    return "loop + other"


def op_names(compiled) -> dict[str, str]:
    """HLO instruction name → ``op_name`` metadata of a compiled program (``""`` where it has none)."""
    text = compiled.as_text()
    names = dict.fromkeys(_NAME.findall(text), "")
    names.update({m.group(1): m.group(2) for m in _INSTRUCTION.finditer(text)})
    return names


def own_times(events: list[dict]) -> dict[str, float]:
    """Σ own time (µs) per event name: each complete event's duration less its directly nested events'."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    own = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, time of its children]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done, children = stack.pop()
                own[done["name"]] += done["dur"] - children
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        for done, children in stack:
            own[done["name"]] += done["dur"] - children
    return own


def profile(jitted, *args) -> dict[str, float]:
    """Own XLA thunk seconds per HLO ``op_name`` for one call of ``jitted(*args)`` (warmed up first)."""
    compiled = jitted.lower(*args).compile()
    names = op_names(compiled)
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory(prefix="jaxppo-profile-") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*args))
        trace = next(Path(tmp).rglob("*perfetto_trace.json.gz"))
        data = json.load(gzip.open(trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    seconds = collections.Counter()
    for name, micros in own_times(events).items():
        if name in names:
            seconds[names[name]] += micros / 1e6
    return seconds


def by_kind(seconds: dict[str, float], *, loop_scope: str = "") -> dict[str, float]:
    """Seconds per kind of work (:func:`kind_of`); the decode loop is the first ``while`` below the
    jitted functions and ``loop_scope`` (a named scope the sampler runs in, e.g. the rollout's ``generate``)."""
    split = dict.fromkeys(KINDS, 0.0)
    for op, sec in seconds.items():
        outer = re.sub(r"^(jit\([^)]*\)/)+", "", op)  # the name stack below the jitted functions
        if loop_scope:
            outer = outer.removeprefix(loop_scope + "/")
            outer = re.sub(r"^(jit\([^)]*\)/)+", "", outer)
        split[kind_of(op, in_loop=outer == "while" or outer.startswith("while/"))] += sec
    return split


def by_phase(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of a PPO rollout (:mod:`jaxppo.rollout`'s named scopes)."""
    split = dict.fromkeys(PHASES, 0.0)
    for op, sec in seconds.items():
        outer = re.sub(r"^(jit\([^)]*\)/)+", "", op)
        split[next((p for p in PHASES[:-1] if outer.startswith(p + "/")), PHASES[-1])] += sec
    return split


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the splits as JSON here")
    args = parser.parse_args(argv)

    config, params, tokenizer = load_pretrained(smollm2_gguf_path())
    pad = tokenizer.pad_token_id
    tokens, mask = map(jnp.asarray, make_prompts(tokenizer, LONG_REQUESTS))
    key = jax.random.key(0)
    u_tokens, u_mask = tokens[:UNIFORM_BATCH], mask[:UNIFORM_BATCH]
    u_sampling = SamplingParams(max_new_tokens=UNIFORM_TOKENS, temperature=TEMPERATURE, pad_token_id=pad)
    long_sampling = SamplingParams(max_new_tokens=LONG_MAX, temperature=TEMPERATURE, pad_token_id=pad)
    caps = jnp.asarray(long_tail_caps())

    runs = {}
    static = jax.jit(lambda p, t, m, k: sample(config, p, t, m, k, sampling=u_sampling))
    runs["uniform, static sampler"] = (by_kind(profile(static, params, u_tokens, u_mask, key)), UNIFORM_TOKENS)
    engine = make_generator(config, u_sampling, slots=UNIFORM_BATCH)
    steps = int(engine(params, u_tokens, u_mask, key)[1].steps)
    runs["uniform, engine (16 slots)"] = (by_kind(profile(engine, params, u_tokens, u_mask, key)), steps)
    long_engine = jax.jit(lambda p, t, m, k, c: make_generator(config, long_sampling, slots=LONG_SLOTS)(
        p, t, m, k, max_lengths=c))
    steps = int(long_engine(params, tokens, mask, key, caps)[1].steps)
    runs["long tail, engine (16 slots)"] = (by_kind(profile(long_engine, params, tokens, mask, key, caps)), steps)

    # the PPO benchmark's whole rollout (experiments/bench.py: the engine + reward model, critic, reference passes)
    ppo = bench_ppo_config(epochs=1, iterations=2, plain=False)
    reward = {**{k: v for k, v in params.items() if k != "lm_head"},
              "reward_head": init_scalar_head(config, jax.random.key(1), "reward_head")}
    state, frozen = init_ppo(config, ppo, make_mesh(MeshConfig(tensor=1), jax.devices()[:1]), sft_params=params,
                             reward_params=reward, key=jax.random.key(2))
    rollout = make_rollout(config, ppo)
    rollout_seconds = profile(rollout, state.actor.params, state.critic.params, frozen.reference, frozen.reward,
                              u_tokens, u_mask, key, state.kl.kl_coef)
    phases = by_phase(rollout_seconds)
    runs["PPO rollout: its engine"] = (by_kind({op: sec for op, sec in rollout_seconds.items()
                                               if "generate/" in op}, loop_scope="generate"), UNIFORM_TOKENS)

    print(f"SmolLM2-135M-Instruct fp32 · jax {jax.__version__} on {jax.devices()[0].platform} · own XLA thunk time "
          f"per decode step (ms) and share; the prefill in seconds")
    header = f"{'kind':<24}" + "".join(f"{name:>32}" for name in runs)
    print(header)
    for kind in KINDS:
        cells = []
        for split, steps in runs.values():
            total = sum(v for k, v in split.items() if k != "prefill")
            if kind == "prefill":
                cells.append(f"{split[kind]:.2f} s")
            else:
                cells.append(f"{split[kind] / steps * 1e3:.1f} ms {split[kind] / total:6.1%}")
        print(f"{kind:<24}" + "".join(f"{c:>32}" for c in cells))
    print(f"{'decode steps':<24}" + "".join(f"{steps:>32}" for _, steps in runs.values()))
    total = sum(phases.values())
    print(f"\nPPO rollout ({UNIFORM_BATCH} prompts × {UNIFORM_TOKENS} tokens, experiments/bench.py's): "
          "own XLA time by phase")
    for phase, sec in phases.items():
        print(f"{phase:<24}{sec:>8.2f} s {sec / total:7.1%}")
    result = {name: {"decode_steps": steps, "seconds": split} for name, (split, steps) in runs.items()}
    result["ppo_rollout_phases_seconds"] = phases
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
