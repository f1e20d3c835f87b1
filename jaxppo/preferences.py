"""Preference data from policy samples: noisy gold labels (pairs or rankings), tie handling, splits.

The embedded task and gold-reward text tasks have a hidden *gold* reward; a simulated labeller
shown K responses to a prompt answers with

* **pairs** (K = 2, Bradley–Terry): P(a ≻ b) = σ(β (gold_a − gold_b)) (:func:`label_pairs`);
* **rankings** (K ≥ 2, Plackett–Luce): the order of ``β·gold + Gumbel noise``, best first — a draw
  from the Plackett–Luce model with utilities β·gold (:func:`label_rankings`).

The results are the batch dicts :mod:`jaxppo.reward_model` trains on, plus the gold labels
(``gold_diff`` for pairs, ``gold`` for rankings) that measure agreement with the hidden order.
Everything here is a pure function of arrays and a key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.config import require

Array = jax.Array
GOLD_LABELS = ("gold", "gold_diff")  # label columns that the reward model never sees


def bradley_terry_labels(key: Array, gold_a, gold_b, *, beta: float) -> Array:
    """Noisy labels ``[B]`` (True: a ≻ b) drawn with P(a ≻ b) = σ(β (gold_a − gold_b))."""
    p = jax.nn.sigmoid(beta * (jnp.asarray(gold_a, jnp.float32) - jnp.asarray(gold_b, jnp.float32)))
    return jax.random.uniform(key, p.shape) < p


def label_pairs(key: Array, prompt, prompt_mask, responses, masks, golds, *, beta: float,
                drop_ties: bool) -> dict:
    """Pairs from two responses per prompt (``responses``, ``masks`` ``[2][B, N]``, ``golds`` ``[2][B]``).

    Returns ``prompt``, ``prompt_mask``, ``chosen``/``rejected`` (+ masks) ``[B, N]``, ``margin`` =
    |gold_a − gold_b| and ``gold_diff`` = gold_chosen − gold_rejected ``[B]``. With ``drop_ties`` (a
    labeller shown two equally good responses says "tie") tied pairs are moved last, stably, and
    ``num_pairs`` counts the others: fixed shapes (for checkpoints), cut by :func:`usable`.
    """
    a_wins = bradley_terry_labels(key, golds[0], golds[1], beta=beta)
    pick = lambda a, b: jnp.where(a_wins[:, None], a, b)  # noqa: E731
    gold_a, gold_b = (jnp.asarray(g, jnp.float32) for g in golds)
    pairs = {"prompt": prompt, "prompt_mask": prompt_mask,
             "chosen": pick(responses[0], responses[1]), "chosen_mask": pick(masks[0], masks[1]),
             "rejected": pick(responses[1], responses[0]), "rejected_mask": pick(masks[1], masks[0]),
             "margin": jnp.abs(gold_a - gold_b), "gold_diff": jnp.where(a_wins, gold_a - gold_b, gold_b - gold_a)}
    if drop_ties:
        keep = jnp.abs(gold_a - gold_b) > 0
        order = jnp.argsort(~keep, stable=True)
        pairs = {name: v[order] for name, v in pairs.items()}
        pairs["num_pairs"] = jnp.sum(keep).astype(jnp.int32)
    return pairs


def label_rankings(key: Array, prompt, prompt_mask, responses, masks, golds, *, beta: float) -> dict:
    """Rankings of K responses per prompt (``[K][B, N]``, golds ``[K][B]``), best first: the order of
    ``β·gold + Gumbel`` (a Plackett–Luce draw). Returns ``responses``/``response_mask`` ``[B, K, N]``
    and ``gold`` ``[B, K]`` in the drawn order."""
    gold = jnp.stack([jnp.asarray(g, jnp.float32) for g in golds], axis=1)
    order = jnp.argsort(-(beta * gold + jax.random.gumbel(key, gold.shape)), axis=1)
    take = lambda x: jnp.take_along_axis(x, order[:, :, None], axis=1)  # noqa: E731
    return {"prompt": prompt, "prompt_mask": prompt_mask, "responses": take(jnp.stack(responses, 1)),
            "response_mask": take(jnp.stack(masks, 1)), "gold": jnp.take_along_axis(gold, order, axis=1)}


def usable(data: dict) -> dict:
    """Labelled preference data without the tied pairs that :func:`label_pairs` moved to the end."""
    data = dict(data)
    n = int(data.pop("num_pairs", data["prompt"].shape[0]))
    return {k: v[:n] for k, v in data.items()}


def split(data: dict, *, eval_fraction: float, batch_size: int) -> tuple[dict, dict, dict]:
    """``(train, held_out, gold labels of held_out)``: the first ``max(batch_size, eval_fraction · n)``
    usable rows are held out; gold labels are removed from both parts."""
    data = usable(data)
    n = data["prompt"].shape[0]
    n_eval = max(batch_size, int(n * eval_fraction))
    require(n - n_eval >= batch_size, "reward_model.num_prompts",
            f"only {n} usable preference pairs/lists; need > {n_eval + batch_size} for a held-out set and one batch")
    labels = {k: data.pop(k)[:n_eval] for k in GOLD_LABELS if k in data}
    return {k: v[n_eval:] for k, v in data.items()}, {k: v[:n_eval] for k, v in data.items()}, labels


def rows(data: dict, indices) -> dict:
    """Each column of ``data`` at ``indices``."""
    return {k: v[indices] for k, v in data.items()}


def concatenate(a: dict, b: dict) -> dict:
    """Two preference datasets with the same columns, one after the other (host arrays)."""
    return {k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in a}
