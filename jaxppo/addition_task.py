"""An embedded *verifiable* task: multi-digit addition written as tokens, no download.

Vocabulary: ``PAD, BOS, EOS, PLUS, EQUALS`` and the ten digits. A prompt is
``BOS a₁…a_d PLUS b₁…b_d EQUALS`` (operands of ``digits`` digits, leading zeros kept); the answer
is the sum's ``digits + 1`` digits (leading zero kept) *least significant first* — the order in
which a carry is computed, so a small causal model can learn it — then EOS. ``37 + 48`` is
``BOS 3 7 + 4 8 =`` and its answer ``5 8 0 EOS`` (085 reversed).

The reward is verifiable: ``exact_match`` is 1 when the response is the answer's digits then EOS,
else 0 (it is also the task's gold reward, so ``gold_reward`` is the accuracy); ``format`` is 1
when the response is ``digits + 1`` digits then EOS, right or wrong. ``exact_match_text`` is the
same check as ``exact_match`` written as a host function of decoded text, the way a math
verifier is (parse the response's number, compare with the answer).

Demonstrations are *often wrong*: with probability ``demo_error_prob`` a demonstration makes a
plausible mistake — it forgets one carry, or one digit is off by one — so the SFT policy's sampled
accuracy is well below 1, while the right answer stays in its support for RL to find. About one
problem in ``eval_modulus`` is held out for evaluation (a fixed pseudo-random split of all
``10^d × 10^d`` problems); training never draws them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.config import require, require_range

Array = jax.Array
PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
DIGIT0 = 5  # token of digit k: DIGIT0 + k
VOCAB_SIZE = DIGIT0 + 10
SYMBOLS = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", PLUS: "+", EQUALS: "="}


@dataclasses.dataclass(frozen=True)
class AdditionTaskConfig:
    digits: int = 2  # digits of each operand (leading zeros kept), 1–3
    demo_error_prob: float = 0.5  # a demonstration is wrong (a forgotten carry, a digit off by one) with this chance
    eval_modulus: int = 10  # about 1 problem in this many is held out for evaluation (a fixed random split)
    extra_response_tokens: int = 2  # room past the answer's digits + EOS (a wrong response may run longer)
    preference_beta: float = 4.0  # a run with a reward model: its labels P(a ≻ b) = σ(β (gold_a − gold_b))

    def __post_init__(self):
        require(1 <= self.digits <= 3, "task.digits", f"must be in [1, 3], got {self.digits}")
        require_range(self.demo_error_prob, "task.demo_error_prob", ge=0, le=1)
        require(self.eval_modulus >= 2, "task.eval_modulus", f"must be >= 2, got {self.eval_modulus}")
        require(self.extra_response_tokens >= 0, "task.extra_response_tokens",
                f"must be >= 0, got {self.extra_response_tokens}")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def prompt_length(self) -> int:
        return 3 + 2 * self.digits

    @property
    def answer_length(self) -> int:
        """Digits of the answer (the sum has at most ``digits + 1``), EOS not included."""
        return self.digits + 1

    @property
    def max_response_tokens(self) -> int:
        return self.answer_length + 1 + self.extra_response_tokens

    @property
    def optimal_gold(self) -> float:
        return 1.0

    @property
    def reward_function_names(self) -> tuple[str, ...]:
        return ("exact_match", "format", "exact_match_text")


def _digits_lsb_first(x: Array, n: int) -> Array:
    """``[B]`` non-negative ints → ``[B, n]`` decimal digits, least significant first."""
    return (x[:, None] // (10 ** jnp.arange(n))[None, :]) % 10


def _split(task: AdditionTaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` problem ids ``a·10^d + b``: a fixed pseudo-random split (seed 0), about one
    problem in ``eval_modulus`` held out, independent of the operands' digits."""
    hi = 10 ** task.digits
    held = np.random.default_rng(0).random(hi * hi) < 1.0 / task.eval_modulus
    return np.flatnonzero(~held), np.flatnonzero(held)


def operands(task: AdditionTaskConfig, prompt: Array, prompt_mask: Array) -> tuple[Array, Array]:
    """The operands ``(a [B], b [B])`` of left-padded prompts (read after BOS, wherever padding puts it)."""
    start = jnp.argmax(prompt_mask > 0, axis=1) + 1
    d = task.digits
    idx = start[:, None] + jnp.arange(2 * d + 1)[None, :]
    body = jnp.take_along_axis(prompt, jnp.minimum(idx, prompt.shape[1] - 1), axis=1) - DIGIT0
    weights = 10 ** jnp.arange(d - 1, -1, -1)
    return jnp.sum(body[:, :d] * weights, axis=1), jnp.sum(body[:, d + 1:] * weights, axis=1)


def encode_prompts(task: AdditionTaskConfig, a: Array, b: Array) -> tuple[Array, Array]:
    d, n = task.digits, a.shape[0]
    msb = lambda x: _digits_lsb_first(x, d)[:, ::-1] + DIGIT0  # noqa: E731
    tokens = jnp.concatenate([jnp.full((n, 1), BOS), msb(a), jnp.full((n, 1), PLUS), msb(b),
                              jnp.full((n, 1), EQUALS)], axis=1).astype(jnp.int32)
    return tokens, jnp.ones_like(tokens)


def sample_prompts(task: AdditionTaskConfig, key: Array, n: int) -> tuple[Array, Array]:
    """``n`` training problems ``[n, P]`` drawn uniformly (all real tokens: mask of ones); never a held-out one."""
    train, _ = _split(task)
    ids = jnp.asarray(train)[jax.random.randint(key, (n,), 0, len(train))]
    return encode_prompts(task, ids // 10 ** task.digits, ids % 10 ** task.digits)


def eval_problems(task: AdditionTaskConfig, n: int) -> tuple[Array, Array]:
    """The first ``n`` held-out problems in a fixed shuffled order (all of them when ``n`` is larger)."""
    _, held = _split(task)
    ids = held[np.random.default_rng(1).permutation(len(held))[:n]]
    return encode_prompts(task, jnp.asarray(ids // 10 ** task.digits), jnp.asarray(ids % 10 ** task.digits))


def answers(task: AdditionTaskConfig, prompt: Array, prompt_mask: Array) -> Array:
    """The answer tokens ``[B, digits + 2]``: the sum's digits, least significant first, then EOS."""
    a, b = operands(task, prompt, prompt_mask)
    digits = _digits_lsb_first(a + b, task.answer_length) + DIGIT0
    return jnp.concatenate([digits, jnp.full((digits.shape[0], 1), EOS)], axis=1).astype(jnp.int32)


def exact_match(task: AdditionTaskConfig, prompt: Array, prompt_mask: Array, response: Array,
                response_mask: Array) -> Array:
    """1.0 where the response is exactly the answer's digits then EOS (nothing after), else 0.0. Jittable."""
    target = answers(task, prompt, prompt_mask)
    n = target.shape[1]
    width = response.shape[1]
    if width < n:
        return jnp.zeros(response.shape[:1], jnp.float32)
    valid = response_mask > 0
    same = jnp.all((response[:, :n] == target) & valid[:, :n], axis=1)
    return (same & (jnp.sum(valid, axis=1) == n)).astype(jnp.float32)


def format_reward(task: AdditionTaskConfig, prompt: Array, prompt_mask: Array, response: Array,
                  response_mask: Array) -> Array:
    """1.0 where the response is ``digits + 1`` digits then EOS (a well-formed answer, right or wrong). Jittable."""
    n = task.answer_length
    if response.shape[1] < n + 1:
        return jnp.zeros(response.shape[:1], jnp.float32)
    valid = response_mask > 0
    is_digit = (response >= DIGIT0) & (response < DIGIT0 + 10)
    ok = jnp.all(is_digit[:, :n] & valid[:, :n], axis=1) & (response[:, n] == EOS) & (jnp.sum(valid, axis=1) == n + 1)
    return ok.astype(jnp.float32)


def render(tokens, mask) -> str:
    """Valid tokens as text: digits, ``+``, ``=``, ``</s>`` for EOS, and a leading BOS dropped (a prompt's);
    any other BOS or PAD shows as ``<s>`` / ``<pad>``, so a response that holds one never reads as an answer."""
    out = []
    for i, t in enumerate(int(t) for t, m in zip(np.asarray(tokens), np.asarray(mask)) if m):
        if i == 0 and t == BOS:
            continue
        out.append(str(t - DIGIT0) if DIGIT0 <= t < DIGIT0 + 10 else SYMBOLS.get(t, "?"))
    return "".join(out)


def exact_match_text(prompts: list[str], responses: list[str], answers: list[str] | None = None) -> np.ndarray:
    """:func:`exact_match` as a host function of decoded text (a verifier's way): ``prompts`` are
    ``"37+48="``, ``responses`` ``"580</s>"`` (the answer's digits least significant first, then
    EOS). 1.0 where the response, read back to a number, is the sum and has exactly the answer's
    form, else 0.0. ``answers`` is unused (the answer follows from the prompt)."""
    out = np.zeros(len(prompts), np.float64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        left, right = p.rstrip("=").split("+")
        width = len(left) + 1
        body = r[:-len("</s>")] if r.endswith("</s>") else None
        if body is not None and len(body) == width and body.isdigit():
            out[i] = float(int(body[::-1]) == int(left) + int(right))
    return out


def demonstrations(task: AdditionTaskConfig, key: Array, prompt: Array, prompt_mask: Array) -> tuple[Array, Array]:
    """Demonstrations ``[B, N]``: the answer, or with probability ``demo_error_prob`` a plausible wrong
    one — half of them forget one carry (where the sum has a carry), the rest have one digit off by
    one — then EOS and padding."""
    a, b = operands(task, prompt, prompt_mask)
    n, length = a.shape[0], task.max_response_tokens
    k_wrong, k_kind, k_carry, k_pos, k_sign = jax.random.split(key, 5)
    total = a + b
    d = task.answer_length
    wrong = jax.random.uniform(k_wrong, (n,)) < task.demo_error_prob
    # a forgotten carry: the digit above a carrying position stays one too low
    # position i carries into i + 1 when the operands' last i + 1 digits overflow (chains of carries included)
    place = 10 ** jnp.arange(1, d)[None, :]
    carries = (a[:, None] % place) + (b[:, None] % place) >= place
    has_carry = jnp.any(carries, axis=1)
    carry_pos = jnp.argmax(carries * jax.random.uniform(k_carry, carries.shape), axis=1)  # a random carrying position
    forgot = total - 10 ** (carry_pos + 1)
    # one digit off by one (kept a digit: 9 + 1 wraps to 8, 0 − 1 to 1)
    pos = jax.random.randint(k_pos, (n,), 0, d)
    digit = (total // 10 ** pos) % 10
    step = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n,)), 1, -1)
    step = jnp.where(digit + step > 9, -1, jnp.where(digit + step < 0, 1, step))
    off = total + step * 10 ** pos
    use_carry = has_carry & jax.random.bernoulli(k_kind, 0.5, (n,))
    shown = jnp.where(wrong, jnp.where(use_carry, forgot, off), total)
    digits = _digits_lsb_first(shown, d) + DIGIT0
    tokens = jnp.concatenate([digits, jnp.full((n, 1), EOS), jnp.full((n, length - d - 1), PAD)], axis=1)
    mask = (jnp.arange(length)[None, :] <= d).astype(jnp.int32) * jnp.ones((n, 1), jnp.int32)
    return tokens.astype(jnp.int32), mask
