"""Tasks: where prompts, demonstrations and preference labels come from, and the hidden gold reward.

The stages in :mod:`jaxppo.pipeline` see a task only through this small interface, so a fork can
add one without touching them:

* ``prompts(stream, step, n)`` → ``(prompt [n, P], prompt_mask [n, P])``, a pure function of
  ``(stream, step)`` so a resumed run sees the same data;
* ``eval_prompts()`` → the fixed evaluation prompts;
* ``demonstrations(stream, step, n, prompts=None)`` → an SFT batch dict or ``None`` (no data);
* ``preference_file()`` → file-labelled preference pairs / rankings or ``None`` (then the reward
  model learns from policy samples labelled by ``gold`` with noise ``preference_beta``, see
  :mod:`jaxppo.preferences`);
* ``gold(prompt, prompt_mask, response, response_mask)`` → ``[B]`` float64 on the host, and
  ``gold_fn``: the same as a jittable function (computed inside the PPO program) or None;
* ``render(...)`` → readable (prompt, response) strings for sample dumps.

Two tasks ship: :class:`ToyTask` (the embedded, download-free demo of :mod:`jaxppo.toy_task`) and
:class:`TextTask` (prompts from a local file, tokenized with the model's tokenizer and chat
template; gold reward by name from :data:`GOLD_REWARDS`, e.g. VADER sentiment).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo import toy_task
from jaxppo.config import require
from jaxppo.data import TextFormat, batch_indices, load_demonstrations, load_preferences, load_prompts, load_rankings
from jaxppo.rng import stream_seed

_log = logging.getLogger(__name__)

Array = jax.Array


# ------------------------------------------------------------------------------ gold rewards

@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(texts: list[str]) -> np.ndarray:
    """VADER compound sentiment in [−1, 1] of each text (Hutto & Gilbert 2014): 1 is most positive."""
    analyzer = _vader()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], np.float64)


GOLD_REWARDS: dict[str, tuple[Callable[[list[str]], np.ndarray], float]] = {
    # name: (score of response texts, best achievable score)
    "vader": (vader_sentiment, 1.0),
}


# ------------------------------------------------------------------------------------ toy task

class ToyTask:
    """The embedded task of :mod:`jaxppo.toy_task`; its data are drawn from keys ``key_fn(stream, step)``."""

    def __init__(self, config: toy_task.ToyTaskConfig, key_fn: Callable[[str, int], Array], eval_prompts: int = 512):
        self.config = config
        self._key = key_fn
        self.vocab_size = config.vocab_size
        self.stop_token_ids = (toy_task.EOS,)
        self.pad_token_id = toy_task.PAD
        self.max_response_tokens = config.max_response_tokens
        self.optimal_gold = config.optimal_gold
        self.tokenizer = None
        self.preference_beta = config.preference_beta
        self._eval = toy_task.sample_prompts(config, key_fn("eval", 0), eval_prompts)
        self.gold_fn = functools.partial(toy_task.gold_reward, config)  # jittable: computed inside PPO programs
        self._gold = jax.jit(self.gold_fn)

    def prompts(self, stream: str, step: int, n: int):
        return toy_task.sample_prompts(self.config, self._key(f"{stream}-prompts", step), n)

    def eval_prompts(self):
        return self._eval

    def demonstrations(self, stream: str, step: int, n: int, prompts=None) -> dict:
        prompt, prompt_mask = prompts if prompts is not None else self.prompts(stream, step, n)
        response, response_mask = toy_task.demonstrations(self.config, self._key(f"{stream}-demos", step),
                                                          prompt, prompt_mask)
        return {"prompt": prompt, "prompt_mask": prompt_mask, "response": response, "response_mask": response_mask}

    def preference_file(self):
        return None

    def gold(self, prompt, prompt_mask, response, response_mask) -> np.ndarray:
        return np.asarray(self._gold(prompt, prompt_mask, response, response_mask), np.float64)

    def render(self, prompt, prompt_mask, response, response_mask) -> list[dict]:
        def words(tokens, mask):
            return " ".join(str(int(t)) for t, m in zip(tokens, mask) if m)

        return [{"prompt": words(p, pm), "response": words(r, rm)}
                for p, pm, r, rm in zip(*map(np.asarray, (prompt, prompt_mask, response, response_mask)))]


# ----------------------------------------------------------------------------------- text task

@dataclasses.dataclass(frozen=True)
class TextTaskConfig:
    """Prompts (and optional SFT / preference data) from local files; gold reward by name."""

    prompts: str  # JSONL / JSON / Parquet of {"prompt": str} or {"messages": [...]} records
    eval_prompts: int = 64  # held out of `prompts` (a seed-shuffled split) for evaluation
    demonstrations: str = ""  # SFT data {"prompt", "response"}; "" = none
    preferences: str = ""  # reward-model pairs {"prompt", "chosen", "rejected"}; "" = label policy samples
    rankings: str = ""  # reward-model ranked lists {"prompt", "responses": [best, ..., worst]}
    gold: str = "vader"  # hidden gold reward of the response text, one of GOLD_REWARDS
    preference_beta: float = 8.0  # Bradley–Terry noise of gold labels: P(a ≻ b) = σ(β (gold_a − gold_b))
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template (instruct models)
    system_prompt: str = ""  # optional system turn of the chat template
    max_prompt_tokens: int = 48  # prompts are left-padded to this; longer ones are cut (see truncation)
    max_response_tokens: int = 32  # sampled response length (ppo.max_new_tokens must match)
    truncation: str = "left"  # a longer prompt keeps its end ("left") or is an error ("error")

    def __post_init__(self):
        require(bool(self.prompts), "task.prompts", "a prompts file is required")
        require(self.gold in GOLD_REWARDS, "task.gold", f"{self.gold!r} not in {sorted(GOLD_REWARDS)}")
        require(self.eval_prompts >= 1, "task.eval_prompts", f"must be >= 1, got {self.eval_prompts}")
        require(self.max_prompt_tokens >= 1, "task.max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}")
        require(self.max_response_tokens >= 1, "task.max_response_tokens",
                f"must be >= 1, got {self.max_response_tokens}")
        require(self.truncation in ("left", "error"), "task.truncation", f"{self.truncation!r} not in ('left', 'error')")
        require(not (self.preferences and self.rankings), "task.rankings", "give preferences or rankings, not both")

    @property
    def optimal_gold(self) -> float:
        return GOLD_REWARDS[self.gold][1]

    @property
    def text_format(self) -> TextFormat:
        return TextFormat(chat_template=self.chat_template, system_prompt=self.system_prompt or None,
                          max_prompt_tokens=self.max_prompt_tokens, max_response_tokens=self.max_response_tokens,
                          truncation=self.truncation)


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Check a tokenizer against the model's embedding rows (config field ``model.vocab_size``).

    Its special tokens (BOS, EOS, PAD, UNK) must have ids in ``[0, vocab_size)``: they end or pad every
    sequence, and JAX turns a gather past the end of the embedding table into NaNs, not an error.
    Other ids past the model (tokens added to a tokenizer but never used, say) are a warning: every
    record's ids are checked against the model as its file is read (naming the line), and the sampler
    only produces ids the model has.
    """
    require(tokenizer is not None, "pretrained",
            "the checkpoint has no tokenizer (tokenizer.json); a text task needs one")
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token_id = getattr(tokenizer, f"{role}_id")
        require(token_id is None or 0 <= token_id < vocab_size, "model.vocab_size",
                f"the tokenizer's {role} {getattr(tokenizer, role)!r} has id {token_id}, outside the model's "
                f"vocabulary [0, {vocab_size}): the model has no embedding row for it")
    ids = tokenizer.backend.get_vocab(with_added_tokens=True)
    outside = {token: i for token, i in ids.items() if not 0 <= i < vocab_size}
    if outside:
        token, token_id = max(outside.items(), key=lambda item: item[1])
        _log.warning(f"model.vocab_size: the model has {vocab_size} embedding rows but its tokenizer has "
                     f"{len(outside)} ids outside [0, {vocab_size}) (the largest: {token!r} = {token_id}); a data "
                     "record that uses one is refused when its file is read")


def _existing(path: str, field: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"config field `{field}`: file not found: {path}")
    return Path(path)


class TextTask:
    """Prompts from a file, the model's tokenizer, and a gold reward of the decoded response text."""

    def __init__(self, config: TextTaskConfig, tokenizer, *, seed: int, vocab_size: int):
        check_tokenizer(tokenizer, vocab_size)  # before any file is read: every id below then fits the model
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        fmt = config.text_format
        prompts = load_prompts(_existing(config.prompts, "task.prompts"), tokenizer, fmt, vocab_size=vocab_size)
        require(len(prompts) > config.eval_prompts, "task.eval_prompts",
                f"{config.prompts} has {len(prompts)} prompts; need more than eval_prompts={config.eval_prompts}")
        self.num_truncated_prompts = prompts.num_truncated
        order = np.random.default_rng([seed, 7]).permutation(len(prompts))
        eval_rows, train_rows = order[: config.eval_prompts], order[config.eval_prompts:]
        self._train = (prompts.prompt[train_rows], prompts.prompt_mask[train_rows])
        self._eval = (jnp.asarray(prompts.prompt[eval_rows]), jnp.asarray(prompts.prompt_mask[eval_rows]))
        self._demos = None
        if config.demonstrations:
            self._demos = load_demonstrations(_existing(config.demonstrations, "task.demonstrations"),
                                              tokenizer, fmt, vocab_size=vocab_size).as_dict()
        self._preferences = None
        self.num_identical_preferences = 0  # file pairs / lists dropped: their responses were the same tokens
        labelled = None
        if config.preferences:
            labelled = load_preferences(_existing(config.preferences, "task.preferences"), tokenizer, fmt,
                                        vocab_size=vocab_size)
        elif config.rankings:
            labelled = load_rankings(_existing(config.rankings, "task.rankings"), tokenizer, fmt, vocab_size=vocab_size)
        if labelled is not None:
            self._preferences = labelled.as_dict()
            self.num_identical_preferences = labelled.num_identical
        self.vocab_size = vocab_size
        eos = tokenizer.eos_token_id
        require(eos is not None, "pretrained", "the tokenizer has no EOS token to stop sampling at")
        self.stop_token_ids = (int(eos),)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        self.max_response_tokens = config.max_response_tokens
        self.optimal_gold = config.optimal_gold
        self.preference_beta = config.preference_beta
        self.gold_fn = None  # the gold reward reads decoded text: computed on the host
        self._score = GOLD_REWARDS[config.gold][0]

    def _stream_seed(self, stream: str) -> int:
        return stream_seed(self.seed, stream)

    def prompts(self, stream: str, step: int, n: int):
        """``n`` training prompts; more than the file holds repeats it in whole reshuffled epochs
        (e.g. preference data with several sampled pairs per prompt)."""
        num_rows = self._train[0].shape[0]
        if n <= num_rows:
            rows = batch_indices(num_rows, n, seed=self._stream_seed(stream), step=step)
        else:
            epochs = -(-n // num_rows)
            rows = np.concatenate([batch_indices(num_rows, num_rows, seed=self._stream_seed(stream), step=step * epochs + e)
                                   for e in range(epochs)])[:n]
        return jnp.asarray(self._train[0][rows]), jnp.asarray(self._train[1][rows])

    def eval_prompts(self):
        return self._eval

    def demonstrations(self, stream: str, step: int, n: int, prompts=None) -> dict | None:
        if self._demos is None:
            return None
        rows = batch_indices(self._demos["prompt"].shape[0], n, seed=self._stream_seed(stream), step=step)
        return {k: jnp.asarray(v[rows]) for k, v in self._demos.items()}

    def preference_file(self) -> dict | None:
        return self._preferences

    def response_texts(self, response, response_mask) -> list[str]:
        return [self.tokenizer.decode([int(t) for t, m in zip(r, rm) if m], skip_special_tokens=True)
                for r, rm in zip(np.asarray(response), np.asarray(response_mask))]

    def gold(self, prompt, prompt_mask, response, response_mask) -> np.ndarray:
        return self._score(self.response_texts(response, response_mask))

    def render(self, prompt, prompt_mask, response, response_mask) -> list[dict]:
        prompts = [self.tokenizer.decode([int(t) for t, m in zip(p, pm) if m])
                   for p, pm in zip(np.asarray(prompt), np.asarray(prompt_mask))]
        return [{"prompt": p, "response": r} for p, r in zip(prompts, self.response_texts(response, response_mask))]
