"""Writes data/arithmetic_prompts.jsonl: short arithmetic questions with their answers, for RL on a
verifiable reward (the answer is checked by parsing, :func:`jaxppo.verifiers.number_match`).

Run:  python -m experiments.make_arithmetic_data [--out data/arithmetic_prompts.jsonl] [--num 1200] [--seed 0]

Each record is ``{"prompt": "Calculate 37 + 48. Reply with just the number.", "answer": "85"}``: the
sum of two 2-digit numbers whose sum has 2 digits (10 <= a, b and a + b <= 99; 1,640 unordered pairs),
``--num`` of them drawn without replacement, each pair shown in a random order, so no question appears
twice, not even with its operands swapped. The output is a pure function of ``--num`` and ``--seed``
(numpy's ``default_rng``): the committed file is ``--num 1200 --seed 0`` and regenerates byte for byte.

Difficulty, measured on the file's last 128 prompts with SmolLM2-135M-Instruct (its chat template with
its default system turn, 32 new tokens; prompts are 46 tokens at most): 27% right greedy, 17% at
temperature 0.7, 7% at temperature 1 (11% with top_p=0.9, 9% with top_k=20). Greedy answers are ``"37 +
48 = 85"`` (~11 tokens with EOS; 95% end within 16 tokens, 98% within 24); sampled ones ramble more (at
T=1 43% end within 24 tokens), but the answer comes first, so a cut at 24 tokens loses almost no right
answers. The wording matters: "What is 37 + 48? Answer with the number." got 6% greedy (long
step-by-step replies cut off before the answer), 1-digit + 2-digit sums ("23 + 5") 9–14%, 1-digit +
1-digit sums ~60%.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "arithmetic_prompts.jsonl"
TEMPLATE = "Calculate {a} + {b}. Reply with just the number."


def all_pairs() -> list[tuple[int, int]]:
    """Every unordered pair ``(a, b)``, ``10 <= a <= b``, with ``a + b <= 99``: 1,640 pairs."""
    return [(a, b) for a in range(10, 50) for b in range(a, 100 - a)]


def make_records(num: int, seed: int) -> list[dict]:
    """``num`` distinct questions: a random sample of :func:`all_pairs`, each shown in a random order."""
    pairs = all_pairs()
    if not 1 <= num <= len(pairs):
        raise ValueError(f"--num must be in [1, {len(pairs)}], got {num}")
    rng = np.random.default_rng(seed)
    records = []
    for i in rng.permutation(len(pairs))[:num]:
        a, b = pairs[i]
        if rng.random() < 0.5:
            a, b = b, a
        records.append({"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b)})
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--num", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = make_records(args.num, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
