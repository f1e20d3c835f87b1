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
* ``render(...)`` → readable (prompt, response) strings for sample dumps;
* ``reward_functions`` → the named :class:`~jaxppo.rewards.RewardFunction` s a run may score with
  instead of a reward model, and ``codec`` (a :class:`~jaxppo.rewards.TextCodec`) for host ones;
  ``gold_is_accuracy``: the gold reward is a 0/1 verifier (reported as accuracy).

Three tasks ship: :class:`ToyTask` (the embedded, download-free RLHF demo of :mod:`jaxppo.toy_task`),
:class:`AdditionTask` (the embedded verifiable task of :mod:`jaxppo.addition_task`) and
:class:`TextTask` (prompts from a local file, tokenized with the model's tokenizer and chat
template; gold reward by name from :data:`GOLD_REWARDS`, e.g. VADER sentiment, or a verifier of
the prompt file's answers).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo import addition_task, toy_task
from jaxppo.config import require
from jaxppo.data import DataError, TextFormat, batch_indices, load_demonstrations, load_preferences, load_prompts, load_rankings
from jaxppo.rewards import RewardFunction, TextCodec
from jaxppo.rng import stream_seed

_log = logging.getLogger(__name__)

Array = jax.Array


# ------------------------------------------------------------------------------ gold rewards

@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[str], responses: list[str], answers: list[str | None]) -> np.ndarray:
    """VADER compound sentiment in [−1, 1] of each response (Hutto & Gilbert 2014): 1 is most positive."""
    analyzer = _vader()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in responses], np.float64)


def _number_match(prompts: list[str], responses: list[str], answers: list[str | None]) -> np.ndarray:
    from jaxppo.verifiers import number_match

    return number_match(prompts, responses, answers)


class GoldReward(NamedTuple):
    """A gold reward of text: ``fn(prompts, responses, answers) -> [B]`` (a host reward function's
    signature, :mod:`jaxppo.rewards`), the best achievable score, and whether it is a 0/1 verifier
    (needs the prompt file's ``answer`` field; reported as accuracy)."""

    fn: Callable[[list[str], list[str], list[str | None]], np.ndarray]
    best: float
    is_accuracy: bool = False


GOLD_REWARDS: dict[str, GoldReward] = {
    "vader": GoldReward(vader_sentiment, 1.0),
    # the last number of the response equals the prompt's `answer` (jaxppo.verifiers.number_match)
    "number_match": GoldReward(_number_match, 1.0, is_accuracy=True),
}


# --------------------------------------------------------------------------------- embedded tasks

class _EmbeddedTask:
    """What the embedded tasks share: prompts and demonstrations drawn by a task module's
    ``sample_prompts(config, key, n)`` / ``demonstrations(config, key, prompt, prompt_mask)`` from keys
    ``key_fn(stream, step)``, a jittable gold reward ``gold_fn`` (computed inside PPO programs, and
    jitted for the host), no preference file and no tokenizer."""

    module = None  # the task module: toy_task or addition_task
    gold_is_accuracy = False

    def __init__(self, config, key_fn: Callable[[str, int], Array], *, eval_prompts, gold_fn):
        self.config = config
        self._key = key_fn
        self.vocab_size = config.vocab_size
        self.stop_token_ids = (self.module.EOS,)
        self.pad_token_id = self.module.PAD
        self.max_response_tokens = config.max_response_tokens
        self.optimal_gold = config.optimal_gold
        self.tokenizer = None
        self.preference_beta = config.preference_beta
        self._eval = eval_prompts
        self.gold_fn = gold_fn
        self._gold = jax.jit(gold_fn)

    def prompts(self, stream: str, step: int, n: int):
        return self.module.sample_prompts(self.config, self._key(f"{stream}-prompts", step), n)

    def eval_prompts(self):
        return self._eval

    def demonstrations(self, stream: str, step: int, n: int, prompts=None) -> dict:
        prompt, prompt_mask = prompts if prompts is not None else self.prompts(stream, step, n)
        response, response_mask = self.module.demonstrations(self.config, self._key(f"{stream}-demos", step),
                                                             prompt, prompt_mask)
        return {"prompt": prompt, "prompt_mask": prompt_mask, "response": response, "response_mask": response_mask}

    def preference_file(self):
        return None

    def gold(self, prompt, prompt_mask, response, response_mask) -> np.ndarray:
        return np.asarray(self._gold(prompt, prompt_mask, response, response_mask), np.float64)


class ToyTask(_EmbeddedTask):
    """The embedded RLHF task of :mod:`jaxppo.toy_task`; its data are drawn from keys ``key_fn(stream, step)``."""

    module = toy_task

    def __init__(self, config: toy_task.ToyTaskConfig, key_fn: Callable[[str, int], Array], eval_prompts: int = 512):
        super().__init__(config, key_fn, eval_prompts=toy_task.sample_prompts(config, key_fn("eval", 0), eval_prompts),
                         gold_fn=functools.partial(toy_task.gold_reward, config))
        # RL on the hidden gold reward itself: the oracle setting (no reward model to over-optimise)
        self.reward_functions = {"gold": RewardFunction(self.gold_fn)}
        self.codec = None

    def render(self, prompt, prompt_mask, response, response_mask) -> list[dict]:
        def words(tokens, mask):
            return " ".join(str(int(t)) for t, m in zip(tokens, mask) if m)

        return [{"prompt": words(p, pm), "response": words(r, rm)}
                for p, pm, r, rm in zip(*map(np.asarray, (prompt, prompt_mask, response, response_mask)))]


# the addition task's text, for host reward functions: rendered tokens; no per-prompt answers (the prompt holds it)
ADDITION_CODEC = TextCodec(decode=lambda tokens, mask: [addition_task.render(t, m) for t, m in zip(tokens, mask)],
                           answers=lambda prompt, prompt_mask: [None] * len(prompt))


class AdditionTask(_EmbeddedTask):
    """The embedded verifiable task of :mod:`jaxppo.addition_task`; data drawn from keys ``key_fn(stream, step)``.

    Its gold reward is ``exact_match`` (so the gold reward is the accuracy); its reward functions are
    ``exact_match`` and ``format`` (jittable) and ``exact_match_text`` (the same check as a host
    function of decoded text)."""

    module = addition_task
    gold_is_accuracy = True

    def __init__(self, config: addition_task.AdditionTaskConfig, key_fn: Callable[[str, int], Array],
                 eval_prompts: int = 512):
        super().__init__(config, key_fn, eval_prompts=addition_task.eval_problems(config, eval_prompts),
                         gold_fn=functools.partial(addition_task.exact_match, config))
        self.reward_functions = {
            "exact_match": RewardFunction(self.gold_fn),
            "format": RewardFunction(functools.partial(addition_task.format_reward, config)),
            "exact_match_text": RewardFunction(addition_task.exact_match_text, host=True),
        }
        self.codec = ADDITION_CODEC

    def render(self, prompt, prompt_mask, response, response_mask) -> list[dict]:
        return [{"prompt": addition_task.render(p, pm), "response": addition_task.render(r, rm)}
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
        return GOLD_REWARDS[self.gold].best

    @property
    def reward_function_names(self) -> tuple[str, ...]:
        """Reward functions a run may score with (``reward_functions``): the gold reward, as a host function."""
        return (self.gold,)

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
        gold = GOLD_REWARDS[config.gold]
        self._score, self.gold_is_accuracy = gold.fn, gold.is_accuracy
        # ground truth by prompt tokens: the host reward functions see token ids, and look their answer up
        self._answers, self._token_dtype = {}, prompts.prompt.dtype
        answers = getattr(prompts, "answers", None) or (None,) * len(prompts)
        for row, answer in enumerate(answers):
            key = prompts.prompt[row][prompts.prompt_mask[row] > 0].tobytes()
            if self._answers.get(key, answer) != answer:
                raise DataError(f"{config.prompts}: the prompt {prompts.texts[row]!r} appears with two answers, "
                                f"{self._answers[key]!r} and {answer!r}")
            self._answers[key] = answer
        require(not gold.is_accuracy or any(a is not None for a in answers), "task.gold",
                f"{config.gold!r} checks responses against the prompts' `answer` field; {config.prompts} has none")
        if gold.is_accuracy:  # checked here: an error inside the PPO program's host callback cannot be reported
            from jaxppo.verifiers import bad_answer

            bad = bad_answer(answers)
            if bad is not None:
                raise DataError(f"{config.prompts}: the answer {answers[bad]!r} of prompt {prompts.texts[bad]!r} is "
                                "not a number like '85', '-3', '1,234' or '2.5'")
        self.reward_functions = {config.gold: RewardFunction(self._score, host=True)}
        self.codec = TextCodec(decode=self.texts, answers=self.answers)

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

    def texts(self, tokens, mask, *, skip_special_tokens: bool = True) -> list[str]:
        """Decoded text of each row's valid tokens."""
        return [self.tokenizer.decode([int(t) for t, m in zip(r, rm) if m], skip_special_tokens=skip_special_tokens)
                for r, rm in zip(np.asarray(tokens), np.asarray(mask))]

    def response_texts(self, response, response_mask) -> list[str]:
        return self.texts(response, response_mask)

    def answers(self, prompt, prompt_mask) -> list[str | None]:
        """Each prompt's ``answer`` from the prompt file (None where it has none or is not from the file)."""
        prompt, prompt_mask = np.asarray(prompt), np.asarray(prompt_mask)
        return [self._answers.get(p[m > 0].astype(self._token_dtype).tobytes()) for p, m in zip(prompt, prompt_mask)]

    def gold(self, prompt, prompt_mask, response, response_mask) -> np.ndarray:
        return self._score(self.texts(prompt, prompt_mask), self.response_texts(response, response_mask),
                           self.answers(prompt, prompt_mask))

    def render(self, prompt, prompt_mask, response, response_mask) -> list[dict]:
        prompts = self.texts(prompt, prompt_mask, skip_special_tokens=False)
        return [{"prompt": p, "response": r} for p, r in zip(prompts, self.response_texts(response, response_mask))]
