"""Reward-model training from preferences: Bradley–Terry pairs or Plackett–Luce rankings.

A reward model is a trunk plus a linear ``reward_head``; its score of a (prompt, response) is the head
of the pooled final hidden state (:func:`jaxppo.sequences.response_features`: the last real token,
or the mean over the response). With a frozen trunk (a linear probe), :func:`fit_probe` trains the
head on features computed once.

* Pairs: ``prompt`` ``[B, P]``, ``prompt_mask``, ``chosen`` / ``rejected`` ``[B, N]`` with their masks,
  optional ``margin`` ``[B]``; loss :func:`jaxppo.losses.bradley_terry_loss`.
* Rankings: ``prompt``, ``prompt_mask``, ``responses`` ``[B, K, N]`` ordered best first with
  ``response_mask`` ``[B, K, N]``; loss :func:`jaxppo.losses.plackett_luce_loss`.

After training, :func:`normalize_reward_head` folds a gain and bias into the head so that scores of
policy samples have mean 0 and standard deviation 1 (Ziegler et al. 2019, lm-human-preferences).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from jaxppo.lora import compose, with_dropout_keys
from jaxppo.losses import OBJECTIVES, bradley_terry_loss, plackett_luce_loss, ranking_counts
from jaxppo.models.config import ModelConfig
from jaxppo.optim import accumulate_gradients, skipped_updates
from jaxppo.models.heads import scalar_head
from jaxppo.sequences import response_features
from jaxppo.sharding import constrain_tree



def item_dropout_keys(batch: dict, items: int, *, item_major: bool) -> jax.Array | None:
    """LoRA dropout's keys of the ``items`` responses of each row: row ``b``'s key (``batch["dropout_keys"]``,
    a training step's) folded with the item's index; item-major (``[K·B, 2]``) or row-major (``[B·K, 2]``)
    as the responses are stacked. None without keys (evaluation: no dropout)."""
    keys = batch.get("dropout_keys")
    if keys is None:
        return None
    per_item = jax.vmap(lambda i: jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i))(jnp.arange(items))
    return (per_item if item_major else per_item.swapaxes(0, 1)).reshape(-1, keys.shape[-1])


def pair_features(config: ModelConfig, params: dict, batch: dict, *, pooling: str = "last") -> tuple[jax.Array, jax.Array]:
    """Pooled features ``[B, D]`` of the chosen and the rejected responses, both in one forward pass
    (with LoRA dropout when the batch carries a training step's ``dropout_keys``)."""
    b = batch["prompt"].shape[0]
    prompt = jnp.concatenate([batch["prompt"]] * 2)
    prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2)
    responses = jnp.concatenate([batch["chosen"], batch["rejected"]])
    masks = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    features = response_features(config, params, prompt, prompt_mask, responses, masks, pooling=pooling,
                                 dropout_keys=item_dropout_keys(batch, 2, item_major=True))
    return features[:b], features[b:]


def list_features(config: ModelConfig, params: dict, batch: dict, *, pooling: str = "last") -> jax.Array:
    """Pooled features ``[B, K, D]`` of ranked lists of responses, all K in one forward pass (LoRA
    dropout as in :func:`pair_features`)."""
    b, k, n = batch["responses"].shape
    prompt = jnp.repeat(batch["prompt"], k, axis=0)
    prompt_mask = jnp.repeat(batch["prompt_mask"], k, axis=0)
    features = response_features(config, params, prompt, prompt_mask, batch["responses"].reshape(b * k, n),
                                 batch["response_mask"].reshape(b * k, n), pooling=pooling,
                                 dropout_keys=item_dropout_keys(batch, k, item_major=False))
    return features.reshape(b, k, -1)


def pair_scores(config: ModelConfig, params: dict, batch: dict, *, pooling: str = "last") -> tuple[jax.Array, jax.Array]:
    """Scores ``[B]`` of the chosen and the rejected responses, both in one forward pass."""
    chosen, rejected = pair_features(config, params, batch, pooling=pooling)
    return scalar_head(params["reward_head"], chosen), scalar_head(params["reward_head"], rejected)


def list_scores(config: ModelConfig, params: dict, batch: dict, *, pooling: str = "last") -> jax.Array:
    """Scores ``[B, K]`` of ranked lists of responses, all K in one forward pass."""
    return scalar_head(params["reward_head"], list_features(config, params, batch, pooling=pooling))


def preference_denominators(batch: dict, *, objective: str = "bradley_terry") -> dict:
    """The counts the reward-model loss of ``batch`` divides by: ``{"pairs"}`` (rows) for pairs,
    ``{"lists", "pairs"}`` (lists with >= 2 items; ranked pairs) for ranked lists
    (:func:`jaxppo.losses.ranking_counts`). Computed on a whole batch before micro-batching."""
    if objective == "bradley_terry":
        return {"pairs": jnp.float32(batch["prompt"].shape[0])}
    counts = ranking_counts(jnp.ones(batch["responses"].shape[:2], bool))  # every list holds K valid items
    return {"lists": counts["list_count"], "pairs": counts["pair_count"]}


def pair_loss(config: ModelConfig, params: dict, batch: dict, denominators: dict | None = None, *,
              use_margin: bool = False, pooling: str = "last"):
    """Bradley–Terry loss of a batch of pairs; ``denominators``: :func:`preference_denominators` of the
    whole batch when ``batch`` is a micro-batch of it (None: this batch's own)."""
    chosen, rejected = pair_scores(config, params, batch, pooling=pooling)
    return bradley_terry_loss(chosen, rejected, margin=batch["margin"] if use_margin else None,
                              pair_count=None if denominators is None else denominators["pairs"])


def ranking_loss(config: ModelConfig, params: dict, batch: dict, denominators: dict | None = None, *,
                 pooling: str = "last"):
    """Plackett–Luce loss of a batch of ranked lists; ``denominators`` as in :func:`pair_loss`."""
    counts = {} if denominators is None else {"list_count": denominators["lists"], "pair_count": denominators["pairs"]}
    return plackett_luce_loss(list_scores(config, params, batch, pooling=pooling), **counts)


def _loss_fn(config: ModelConfig, objective: str, use_margin: bool, pooling: str = "last"):
    if objective not in OBJECTIVES:
        raise ValueError(f"reward model `objective`={objective!r} is not one of {OBJECTIVES}")
    if objective == "bradley_terry":
        return functools.partial(pair_loss, config, use_margin=use_margin, pooling=pooling)
    return functools.partial(ranking_loss, config, pooling=pooling)


def head_only(loss_fn, head: str = "reward_head"):
    """``loss_fn`` with every parameter but ``head`` behind ``stop_gradient``: a linear probe on the
    frozen trunk's features. Their gradients are exact zeros (Adam then leaves them unchanged) and
    XLA prunes the trunk's backward pass, so a step costs about one forward pass."""
    def frozen_trunk_loss(params, batch, *args):
        return loss_fn({k: v if k == head else jax.lax.stop_gradient(v) for k, v in params.items()}, batch, *args)

    return frozen_trunk_loss


def make_reward_step(config: ModelConfig, *, objective: str = "bradley_terry", use_margin: bool = False,
                     micro_batches: int = 1, train_trunk: bool = True, pooling: str = "last"):
    """Jitted ``step(state, batch, base=None, dropout_key=None) -> (state, metrics)`` (loss, accuracy,
    grad norm); state donated.

    ``train_trunk=False`` trains the scalar head alone (:func:`head_only`); ``pooling`` as in
    :func:`jaxppo.sequences.response_scores`. With ``base`` (LoRA: frozen weights, not donated) the
    state's params are the reward model's own (adapters and head) and the model is
    :func:`jaxppo.lora.compose` of the two. ``dropout_key``: LoRA dropout as in
    :func:`jaxppo.sft.make_sft_step` (each response of a row its own masks).
    """
    loss_fn = _loss_fn(config, objective, use_margin, pooling)
    if not train_trunk:
        loss_fn = head_only(loss_fn)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: dict, base: dict | None = None, dropout_key: jax.Array | None = None):
        batch = with_dropout_keys(batch, dropout_key, state.step, rate=config.lora_dropout)

        def role_loss(params, *args):
            return loss_fn(compose(base, params), *args)

        loss, aux, grads = accumulate_gradients(role_loss, state.params, batch,
                                                preference_denominators(batch, objective=objective),
                                                micro_batches=micro_batches)
        state = constrain_tree(state.apply_gradients(grads=grads))
        metrics = {"loss": loss, "accuracy": aux["accuracy"], "grad_norm": optax.tree.norm(grads),
                   "skipped_updates": skipped_updates(state)}
        return state, metrics

    return step


def features_of(config: ModelConfig, params: dict, batch: dict, *, objective: str = "bradley_terry",
                pooling: str = "last") -> dict:
    """The pooled features of a batch of preferences, as :func:`fit_probe` reads them:
    ``{"chosen", "rejected"}`` ``[B, D]`` (and ``margin`` when the batch has one) for pairs,
    ``{"responses"}`` ``[B, K, D]`` for ranked lists."""
    if objective == "bradley_terry":
        chosen, rejected = pair_features(config, params, batch, pooling=pooling)
        return {"chosen": chosen, "rejected": rejected, **({"margin": batch["margin"]} if "margin" in batch else {})}
    return {"responses": list_features(config, params, batch, pooling=pooling)}


def probe_loss(head: dict, features: dict, *, objective: str = "bradley_terry", use_margin: bool = False):
    """The reward-model loss of a linear ``head`` on cached features (:func:`features_of`)."""
    if objective == "bradley_terry":
        return bradley_terry_loss(scalar_head(head, features["chosen"]), scalar_head(head, features["rejected"]),
                                  margin=features["margin"] if use_margin else None)
    return plackett_luce_loss(scalar_head(head, features["responses"]))


@functools.partial(jax.jit, static_argnames=("objective", "use_margin"))
def fit_probe(state: TrainState, features: dict, rows: jax.Array, *, objective: str = "bradley_terry",
              use_margin: bool = False) -> tuple[TrainState, dict]:
    """Train a linear head on cached trunk features: one step per row of ``rows`` ``[S, batch]``.

    ``state`` holds the head alone (``{"kernel", "bias"}``) and its optimizer. With a frozen trunk
    this is the head-only step (:func:`make_reward_step` with ``train_trunk=False``) on the same
    batches, to float rounding, without a forward pass through the trunk per step — the trunk's
    features are computed once. Returns the state and the last step's metrics. One program: the
    steps are a ``lax.scan``.
    """
    def step(state, batch_rows):
        batch = jax.tree.map(lambda x: x[batch_rows], features)
        (loss, aux), grads = jax.value_and_grad(probe_loss, has_aux=True)(state.params, batch, objective=objective,
                                                                           use_margin=use_margin)
        state = state.apply_gradients(grads=grads)
        return state, {"loss": loss, "accuracy": aux["accuracy"], "grad_norm": optax.tree.norm(grads)}

    state, metrics = jax.lax.scan(step, state, rows)
    return state, jax.tree.map(lambda x: x[-1], metrics)


def make_reward_eval(config: ModelConfig, *, objective: str = "bradley_terry", use_margin: bool = False,
                     pooling: str = "last"):
    """Jitted ``evaluate(params, batch) -> {"loss", "accuracy"}`` on held-out preferences."""
    loss_fn = _loss_fn(config, objective, use_margin, pooling)

    @jax.jit
    def evaluate(params: dict, batch: dict):
        loss, aux = loss_fn(params, batch)
        return {"loss": loss, "accuracy": aux["accuracy"]}

    return evaluate


def normalize_reward_head(params: dict, scores: jax.Array, *, head: str = "reward_head", eps: float = 1e-6) -> dict:
    r"""Params whose head scores ``(s − μ)/σ``: kernel·g and bias·g − μ·g with g = 1/σ.

    ``scores`` are the current head's scores of samples from the policy RL starts from (the SFT
    model), so PPO begins with rewards of mean 0 and standard deviation 1.
    """
    mean, std = jnp.mean(scores), jnp.std(scores)
    gain = 1.0 / (std + eps)
    new_head = {"kernel": params[head]["kernel"] * gain, "bias": (params[head]["bias"] - mean) * gain}
    return {**params, head: new_head}


def standardize_features(features: dict, eps: float = 1e-6) -> tuple[dict, np.ndarray, np.ndarray]:
    r"""Each feature dimension to mean 0, std 1 over all responses of a :func:`features_of` dict.

    A transformer's hidden dimensions differ in scale by orders of magnitude, which a
    per-coordinate learning rate handles badly, so :func:`fit_probe` trains on
    :math:`\tilde h = (h − μ)/σ`. Returns ``(standardised features, μ [D], σ [D])`` (host arrays;
    ``margin`` passes through).
    """
    responses = np.concatenate([np.asarray(v).reshape(-1, np.shape(v)[-1]) for k, v in features.items()
                                if k != "margin"])
    mu, sigma = responses.mean(0), responses.std(0) + eps
    return {k: v if k == "margin" else (np.asarray(v) - mu) / sigma for k, v in features.items()}, mu, sigma


def head_on_standardized(head: dict, mu: np.ndarray, sigma: np.ndarray) -> dict:
    r"""The head that scores standardised features as ``head`` scores raw ones: ``w_s = σ ⊙ w``,
    ``b_s = b + μ · w`` (inverse of :func:`head_on_raw`)."""
    kernel, bias = (np.asarray(head[k]) for k in ("kernel", "bias"))
    return {"kernel": jnp.asarray(kernel * sigma[:, None]), "bias": jnp.asarray(bias + mu @ kernel)}


def head_on_raw(head: dict, mu: np.ndarray, sigma: np.ndarray) -> dict:
    r"""A head trained on standardised features folded back to score raw features:
    ``w = w_s / σ``, ``b = b_s − (μ / σ) · w_s``."""
    kernel, bias = (np.asarray(head[k]) for k in ("kernel", "bias"))
    return {"kernel": jnp.asarray(kernel / sigma[:, None]), "bias": jnp.asarray(bias - (mu / sigma) @ kernel)}


def pair_gold_accuracy(chosen_scores, rejected_scores, gold_diff) -> float:
    """Fraction of pairs with a strict gold order (``gold_diff`` ≠ 0) whose score order agrees."""
    diff = np.asarray(gold_diff)
    agree = np.sign(np.asarray(chosen_scores) - np.asarray(rejected_scores)) == np.sign(diff)
    return float(agree[diff != 0].mean())


def list_gold_accuracy(scores, gold) -> float:
    """Fraction of the pairs (i, j) within lists ``[B, K]`` with different gold rewards whose score
    order agrees with the gold order."""
    scores, gold = np.asarray(scores), np.asarray(gold)
    i, j = np.triu_indices(scores.shape[1], 1)
    strict = gold[:, i] != gold[:, j]
    agree = np.sign(scores[:, i] - scores[:, j]) == np.sign(gold[:, i] - gold[:, j])
    return float(agree[strict].mean())
