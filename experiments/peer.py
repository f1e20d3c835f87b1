"""What the peers' sides of ``experiments/bench.py`` share: the command line and the memory measure.

Standard library only: ``bench_trl.py`` and ``bench_tunix.py`` run as scripts in venvs without
jaxppo (``from peer import …`` finds this file beside them); ``bench.py`` measures its own process
with the same :func:`peak_rss_mib`, so the RSS rows compare like with like.
"""

from __future__ import annotations

import argparse
import resource


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, not inherited across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer_parser(doc: str, *, iterations: int) -> argparse.ArgumentParser:
    """The arguments every peer side takes: the exported model, the prompts, the work and the output."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists (one prompt each)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=iterations, help="PPO iterations; the first is a warm-up")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", required=True)
    return parser
