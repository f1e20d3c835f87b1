"""What the SPMD partitioner does to the sampler's decode loop under each mesh layout (compile only).

Run:  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.hlo_check

Compiles :func:`jaxppo.sampling.sample` for a small Llama (4 layers) on 8 devices and lists, for
the ``while`` loop that decodes one token per iteration, every all-gather and its result shape, and
the all-gathers outside the loop. Under ``fsdp`` the per-token loop should gather one layer's weight
at a time (``[1, ...]`` slices inside the layer scan), never the stacked ``[L, ...]`` parameters.
"""

from __future__ import annotations

import re
from collections import Counter

import jax

from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params
from jaxppo.sampling import SamplingParams, sample
from jaxppo.sharding import MeshConfig, make_mesh, shard_batch, shard_tree

MODEL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False)
LAYOUTS = {"data=8": MeshConfig(data=8, fsdp=1, tensor=1), "fsdp=8": MeshConfig(data=1, fsdp=8, tensor=1),
           "fsdp=4 x tensor=2": MeshConfig(data=1, fsdp=4, tensor=2)}


def _computations(hlo: str) -> dict[str, str]:
    """Name → body of every computation in an HLO module's text."""
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        match = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if match and not line.startswith(" "):
            name, lines = match.group(1), []
        elif line == "}" and name:
            out[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return out


def _reachable(computations: dict[str, str], roots: list[str]) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        stack.extend(re.findall(r"(?:body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)",
                                computations[name]))
    return seen


def _gathers(text: str) -> Counter:
    return Counter(re.findall(r"= (\w+\[[\d,]*\])[^=]*? all-gather\(", text))


def main() -> None:
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, stop_token_ids=(2,), pad_token_id=0)
    params = init_params(MODEL, jax.random.key(0))
    prompt = jax.numpy.ones((16, 16), jax.numpy.int32)
    for name, layout in LAYOUTS.items():
        mesh = make_mesh(layout)
        with jax.set_mesh(mesh):
            fn = jax.jit(lambda p, t, m, k: sample(MODEL, p, t, m, k, sampling=sampling))
            hlo = fn.lower(shard_tree(params, mesh), *shard_batch((prompt, prompt), mesh),
                           jax.random.key(1)).compile().as_text()
        comps = _computations(hlo)
        loops = [m for m in re.findall(r"while\([^)]*\).*?body=%?([\w.\-]+)", hlo)]
        # the decode loop: the while body that itself contains another loop (the layer scan)
        decode = [b for b in loops if any("while(" in comps.get(c, "") for c in _reachable(comps, [b]) - {b})]
        inside = Counter()
        for body in decode[:1]:
            for comp in _reachable(comps, [body]):
                inside += _gathers(comps[comp])
        total = _gathers(hlo)
        outside = total - inside
        print(f"\n{name}: {sum(inside.values())} all-gathers per decoded token, {sum(outside.values())} outside the loop")
        for shape, count in sorted(inside.items()):
            print(f"  in the decode loop: {count} x {shape}")
        for shape, count in sorted(outside.items()):
            print(f"  once per call:      {count} x {shape}")


if __name__ == "__main__":
    main()
