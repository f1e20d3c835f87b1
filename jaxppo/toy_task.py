"""An embedded RLHF task with a hidden gold reward: the whole pipeline on a laptop, no download.

Vocabulary: ``PAD, BOS, EOS, SEP``, ``num_topics`` topic tokens, ``num_topics ×
words_per_topic`` topic words — each topic *likes* its own block — and ``neutral_words`` that no
topic likes. A prompt is
``BOS topic w w SEP`` (a topic and random context words); a response is up to
``max_response_tokens`` words ending with EOS.

The hidden **gold reward** of a response is

    gold = #distinct liked words − #repeats of liked words − [no EOS]

so the best achievable gold is ``min(words_per_topic, max_response_tokens − 1)``: every liked word
once, then EOS. Demonstrations are *mediocre* on average and uneven, like human ones: a few
words, each liked with a per-demonstration probability q ~ Beta(p·κ, (1 − p)·κ) of mean
p = ``demo_liked_prob`` (κ = ``demo_quality_concentration``; κ = 1 makes most demonstrations poor
and a few excellent), liked words never repeated. The reward model only ever sees preference labels drawn from
the gold reward with Bradley–Terry noise, P(a ≻ b) = σ(β (gold_a − gold_b)). Preference data
rarely contains repeated liked words, so a learned reward model tends to reward "more liked
words" without learning the repeat penalty: a policy that optimises it without a KL anchor can
repeat words and over-optimise (proxy up, gold down) — the classic RLHF picture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxppo.config import require

Array = jax.Array
PAD, BOS, EOS, SEP = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ToyTaskConfig:
    num_topics: int = 4  # topics; each likes its own block of words
    words_per_topic: int = 6  # words liked by each topic (the best response says each once)
    neutral_words: int = 8  # words no topic likes
    context_words: int = 2  # random words in a prompt after the topic token
    max_response_tokens: int = 8  # response length cap, EOS included
    demo_liked_prob: float = 0.3  # demonstrations: mean chance a word is liked, in (0, 1)
    demo_quality_concentration: float = 1.0  # per-demo chance ~ Beta(p·κ, (1 − p)·κ): small κ, uneven demos
    demo_min_words: int = 2  # demonstrations: fewest words before EOS, >= 1
    demo_max_words: int = 6  # demonstrations: most words before EOS, < max_response_tokens
    preference_beta: float = 2.0  # preference noise: P(a ≻ b) = σ(β (gold_a − gold_b)); larger is less noisy

    def __post_init__(self):
        require(self.num_topics >= 1, "task.num_topics", f"must be >= 1, got {self.num_topics}")
        require(self.words_per_topic >= 1, "task.words_per_topic", f"must be >= 1, got {self.words_per_topic}")
        require(self.num_topics > 1 or self.neutral_words > 0, "task.neutral_words",
                "one topic needs neutral words (demonstrations draw their unliked words from them)")
        require(1 <= self.demo_min_words <= self.demo_max_words < self.max_response_tokens, "task.demo_max_words",
                "need 1 <= demo_min_words <= demo_max_words < max_response_tokens")
        require(0 < self.demo_liked_prob < 1, "task.demo_liked_prob", f"must be in (0, 1), got {self.demo_liked_prob}")
        require(self.demo_quality_concentration > 0, "task.demo_quality_concentration",
                f"must be > 0, got {self.demo_quality_concentration}")

    @property
    def first_word(self) -> int:
        return 4 + self.num_topics

    @property
    def num_words(self) -> int:
        return self.num_topics * self.words_per_topic + self.neutral_words

    @property
    def vocab_size(self) -> int:
        return self.first_word + self.num_words

    @property
    def prompt_length(self) -> int:
        return 3 + self.context_words

    @property
    def reward_function_names(self) -> tuple[str, ...]:
        """Reward functions a run may score with instead of a reward model: the gold reward itself (an oracle)."""
        return ("gold",)

    @property
    def optimal_gold(self) -> float:
        """The best gold reward any response can get."""
        return float(min(self.words_per_topic, self.max_response_tokens - 1))


def sample_prompts(task: ToyTaskConfig, key: Array, n: int) -> tuple[Array, Array]:
    """``n`` prompts ``[n, P]`` (all real tokens: mask of ones) ``BOS topic w… SEP``."""
    k_topic, k_words = jax.random.split(key)
    topics = jax.random.randint(k_topic, (n,), 0, task.num_topics)
    words = jax.random.randint(k_words, (n, task.context_words), 0, task.num_words) + task.first_word
    tokens = jnp.concatenate([
        jnp.full((n, 1), BOS), (4 + topics)[:, None], words, jnp.full((n, 1), SEP)], axis=1).astype(jnp.int32)
    return tokens, jnp.ones_like(tokens)


def prompt_topics(task: ToyTaskConfig, prompt: Array, prompt_mask: Array) -> Array:
    """The topic index ``[B]`` of each prompt (the token after BOS, wherever left padding puts it)."""
    start = jnp.argmax(prompt_mask > 0, axis=1)
    return jnp.take_along_axis(prompt, start[:, None] + 1, axis=1)[:, 0] - 4


def gold_reward(task: ToyTaskConfig, prompt: Array, prompt_mask: Array, response: Array, response_mask: Array) -> Array:
    """The hidden gold reward ``[B]`` (see the module docstring). Jittable."""
    topic = prompt_topics(task, prompt, prompt_mask)
    word = response - task.first_word
    valid = response_mask > 0
    is_word = valid & (word >= 0) & (word < task.num_words)
    liked = is_word & (word // task.words_per_topic == topic[:, None])
    counts = jnp.sum(jax.nn.one_hot(jnp.where(liked, word, 0), task.num_words) * liked[..., None], axis=1)
    distinct = jnp.sum(counts > 0, axis=1)
    repeats = jnp.sum(jnp.maximum(counts - 1, 0), axis=1)
    has_eos = jnp.any(valid & (response == EOS), axis=1)
    return (distinct - repeats - (~has_eos)).astype(jnp.float32)


def demonstrations(task: ToyTaskConfig, key: Array, prompt: Array, prompt_mask: Array) -> tuple[Array, Array]:
    """Mediocre demonstrations ``[B, N]`` for the prompts: a few words, rarely liked, then EOS."""
    n, length = prompt.shape[0], task.max_response_tokens
    k_len, k_like, k_pick, k_other = jax.random.split(key, 4)
    n_words = jax.random.randint(k_len, (n,), task.demo_min_words, task.demo_max_words + 1)
    topic = prompt_topics(task, prompt, prompt_mask)
    # liked words without repetition: a random permutation of the topic's block
    perm = jax.vmap(lambda k: jax.random.permutation(k, task.words_per_topic))(jax.random.split(k_pick, n))
    liked_words = topic[:, None] * task.words_per_topic + perm[:, : length]
    liked_words = jnp.pad(liked_words, ((0, 0), (0, max(0, length - liked_words.shape[1]))), mode="edge")[:, :length]
    k_like, k_quality = jax.random.split(k_like)
    p, kappa = task.demo_liked_prob, task.demo_quality_concentration
    quality = jax.random.beta(k_quality, p * kappa, (1 - p) * kappa, (n, 1))
    use_liked = jax.random.uniform(k_like, (n, length)) < quality
    liked_rank = jnp.cumsum(use_liked, axis=1) - 1  # the k-th liked word used in the row
    use_liked &= liked_rank < task.words_per_topic  # a demonstration never repeats a liked word
    liked_choice = jnp.take_along_axis(liked_words, jnp.clip(liked_rank, 0, length - 1), axis=1)
    # other words: anything outside the topic's block (other topics' words and neutral words)
    other = jax.random.randint(k_other, (n, length), 0, task.num_words - task.words_per_topic)
    other = jnp.where(other >= topic[:, None] * task.words_per_topic, other + task.words_per_topic, other)
    words = jnp.where(use_liked, liked_choice, other) + task.first_word
    positions = jnp.arange(length)[None, :]
    tokens = jnp.where(positions < n_words[:, None], words, jnp.where(positions == n_words[:, None], EOS, PAD))
    mask = (positions <= n_words[:, None]).astype(jnp.int32)
    return tokens.astype(jnp.int32), mask

