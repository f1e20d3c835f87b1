"""Independent float64 NumPy reference implementations for jaxppo tests.

Pure Python + NumPy, explicit loops over batch rows and time steps; clarity over
speed. Conventions: arrays are [B, T]; ``mask`` is 1.0 on valid response tokens
and 0.0 on padding, valid tokens of a row form a prefix (row length
L = mask[b].sum(), 0 <= L <= T). Outputs are 0.0 at masked positions unless
stated otherwise. Values at masked positions of the inputs are never read where
the spec says they must be ignored (they may be garbage / NaN).
"""

import math

import numpy as np


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _f64(x):
    """Convert to a float64 numpy array."""
    return np.asarray(x, dtype=np.float64)


def _row_lengths(mask):
    """Return per-row valid lengths L_b (ints) of a prefix mask [B, T]."""
    mask = _f64(mask)
    B, T = mask.shape
    lengths = []
    for b in range(B):
        L = 0
        for t in range(T):
            if mask[b, t] > 0.5:
                L += 1
        lengths.append(L)
    return lengths


def _log_softmax_row(logits_row):
    """Stable log-softmax of a 1-D float64 vector via max subtraction."""
    z = _f64(logits_row)
    m = -math.inf
    for v in z:
        if v > m:
            m = v
    shifted = np.empty_like(z)
    for i in range(z.shape[0]):
        shifted[i] = z[i] - m
    s = 0.0
    for i in range(z.shape[0]):
        s += math.exp(shifted[i])
    log_z = math.log(s)
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        out[i] = shifted[i] - log_z
    return out


def _logsumexp(xs):
    """Stable log(sum(exp(xs))) of a Python list of floats."""
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    s = 0.0
    for x in xs:
        s += math.exp(x - m)
    return m + math.log(s)


def _softplus_neg(z):
    """Stable -log(sigmoid(z)) = log(1 + exp(-z))."""
    if z >= 0:
        return math.log1p(math.exp(-z))
    return -z + math.log1p(math.exp(z))


# ----------------------------------------------------------------------------
# 1. GAE
# ----------------------------------------------------------------------------


def gae_ref(rewards, values, mask, gamma, lam):
    """GAE per row with V_L := 0 after the last valid token; returns (advantages, returns).

    For a row of length L: delta_t = r_t + gamma * V_{t+1} - V_t for t < L with
    V_{t+1} := 0 at t = L - 1 (values/rewards at padded positions are ignored);
    A_{L-1} = delta_{L-1}, A_t = delta_t + gamma * lam * A_{t+1};
    returns_t = A_t + V_t. Both outputs are 0 at masked positions.

    Worked example: T=3, gamma=1, lam=0.95, rewards (-0.1, -0.1, 4.9),
    values (2, 3, 4) -> advantages (2.56725, 1.755, 0.9),
    returns (4.56725, 4.755, 4.9).
    """
    rewards = _f64(rewards)
    values = _f64(values)
    B, T = rewards.shape
    lengths = _row_lengths(mask)
    advantages = np.zeros((B, T), dtype=np.float64)
    returns = np.zeros((B, T), dtype=np.float64)
    gamma = float(gamma)
    lam = float(lam)
    for b in range(B):
        L = lengths[b]
        next_adv = 0.0
        for t in range(L - 1, -1, -1):
            next_value = values[b, t + 1] if t + 1 < L else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            if t == L - 1:
                adv = delta
            else:
                adv = delta + gamma * lam * next_adv
            advantages[b, t] = adv
            returns[b, t] = adv + values[b, t]
            next_adv = adv
    return advantages, returns


# ----------------------------------------------------------------------------
# 2. whitening
# ----------------------------------------------------------------------------


def whiten_ref(x, mask, shift_mean=True, eps=1e-8):
    """Masked whitening over all valid entries of the batch (population variance)."""
    x = _f64(x)
    mask = _f64(mask)
    B, T = x.shape
    n = 0
    total = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t] > 0.5:
                n += 1
                total += x[b, t]
    out = np.zeros((B, T), dtype=np.float64)
    if n == 0:
        return out
    mean = total / n
    sq = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t] > 0.5:
                sq += (x[b, t] - mean) ** 2
    var = sq / n
    denom = math.sqrt(var + eps)
    for b in range(B):
        for t in range(T):
            if mask[b, t] > 0.5:
                val = (x[b, t] - mean) / denom
                if not shift_mean:
                    val += mean
                out[b, t] = val
    return out


# ----------------------------------------------------------------------------
# 3. KL estimators
# ----------------------------------------------------------------------------


def _kl_scalar(logp, logq, estimator):
    """KL estimator for one token with d = logp - logq."""
    d = logp - logq
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return math.exp(-d) - (-d) - 1.0
    if estimator == "abs":
        return abs(d)
    raise ValueError(f"unknown KL estimator: {estimator!r}")


def kl_penalty_ref(logprobs, ref_logprobs, estimator):
    """Elementwise KL estimator ('k1', 'k2', 'k3', 'abs') of logp vs logq, unmasked."""
    logprobs = _f64(logprobs)
    ref_logprobs = _f64(ref_logprobs)
    out = np.zeros(logprobs.shape, dtype=np.float64)
    flat_p = logprobs.reshape(-1)
    flat_q = ref_logprobs.reshape(-1)
    flat_o = out.reshape(-1)
    for i in range(flat_p.shape[0]):
        flat_o[i] = _kl_scalar(flat_p[i], flat_q[i], estimator)
    return out


# ----------------------------------------------------------------------------
# 4. KL-shaped rewards
# ----------------------------------------------------------------------------


def kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """Per-token rewards -kl_coef*kl plus scores[b] at the last valid token; returns (rewards, kl)."""
    scores = _f64(scores)
    logprobs = _f64(logprobs)
    ref_logprobs = _f64(ref_logprobs)
    B, T = logprobs.shape
    lengths = _row_lengths(mask)
    kl = np.zeros((B, T), dtype=np.float64)
    rewards = np.zeros((B, T), dtype=np.float64)
    kl_coef = float(kl_coef)
    for b in range(B):
        L = lengths[b]
        for t in range(L):
            k = _kl_scalar(logprobs[b, t], ref_logprobs[b, t], estimator)
            kl[b, t] = k
            rewards[b, t] = -kl_coef * k
        if L > 0:
            rewards[b, L - 1] += scores[b]
    return rewards, kl


# ----------------------------------------------------------------------------
# 5. PPO clipped policy loss
# ----------------------------------------------------------------------------


def policy_loss_ref(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_eps=0.2,
    clip_eps_high=None,
    dual_clip=None,
    aggregation="token-mean",
):
    """PPO clipped (optionally asymmetric / dual-clip) policy loss; returns (loss, aux_dict)."""
    logprobs = _f64(logprobs)
    old_logprobs = _f64(old_logprobs)
    advantages = _f64(advantages)
    B, T = logprobs.shape
    lengths = _row_lengths(mask)
    eps_low = float(clip_eps)
    eps_high = float(clip_eps_high) if clip_eps_high is not None else eps_low

    n_tokens = 0
    total_loss = 0.0
    n_clipped = 0
    n_dual = 0
    total_approx_kl = 0.0
    row_means = []
    row_sums = []
    for b in range(B):
        L = lengths[b]
        row_sum = 0.0
        for t in range(L):
            log_ratio = logprobs[b, t] - old_logprobs[b, t]
            ratio = math.exp(log_ratio)
            A = advantages[b, t]
            clipped_ratio = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
            unclipped = -ratio * A
            clipped = -clipped_ratio * A
            l = max(unclipped, clipped)
            if clipped > unclipped:
                n_clipped += 1
            if dual_clip is not None and A < 0:
                bound = -float(dual_clip) * A
                if bound < l:
                    n_dual += 1
                l = min(l, bound)
            total_approx_kl += (ratio - 1.0) - log_ratio
            row_sum += l
            total_loss += l
            n_tokens += 1
        if L > 0:
            row_sums.append(row_sum)
            row_means.append(row_sum / L)

    if aggregation == "token-mean":
        loss = total_loss / n_tokens if n_tokens > 0 else 0.0
    elif aggregation == "seq-mean-token-mean":
        loss = sum(row_means) / len(row_means) if row_means else 0.0
    elif aggregation == "seq-mean-token-sum":
        loss = sum(row_sums) / len(row_sums) if row_sums else 0.0
    elif aggregation == "seq-mean-token-sum-norm":  # Dr. GRPO: each row's sum over the max length T
        loss = sum(r / np.shape(logprobs)[1] for r in row_sums) / len(row_sums) if row_sums else 0.0
    else:
        raise ValueError(f"unknown aggregation: {aggregation!r}")

    if n_tokens > 0:
        aux = {
            "clip_fraction": n_clipped / n_tokens,
            "approx_kl": float(total_approx_kl / n_tokens),
            "dual_clip_fraction": n_dual / n_tokens,
        }
    else:
        aux = {"clip_fraction": 0.0, "approx_kl": 0.0, "dual_clip_fraction": 0.0}
    return float(loss), aux


# ----------------------------------------------------------------------------
# 6. value loss
# ----------------------------------------------------------------------------


def value_loss_ref(values, old_values, returns, mask, clip_eps=None):
    """0.5 * token-mean of (optionally clipped, max-of-two) squared value error; returns (loss, aux)."""
    values = _f64(values)
    old_values = _f64(old_values)
    returns = _f64(returns)
    B, T = values.shape
    lengths = _row_lengths(mask)
    n = 0
    total = 0.0
    n_clipped = 0
    for b in range(B):
        for t in range(lengths[b]):
            V = values[b, t]
            R = returns[b, t]
            u = (V - R) ** 2
            if clip_eps is None:
                l = u
            else:
                ce = float(clip_eps)
                v_clip = old_values[b, t] + min(max(V - old_values[b, t], -ce), ce)
                c = (v_clip - R) ** 2
                l = max(u, c)
                if c > u:
                    n_clipped += 1
            total += l
            n += 1
    if n == 0:
        return 0.0, {"clip_fraction": 0.0}
    return float(0.5 * total / n), {"clip_fraction": n_clipped / n}


# ----------------------------------------------------------------------------
# 7. entropy
# ----------------------------------------------------------------------------


def entropy_ref(logits, mask):
    """Mean over valid tokens of the softmax entropy of logits [B, T, V]."""
    logits = _f64(logits)
    B, T, _ = logits.shape
    lengths = _row_lengths(mask)
    n = 0
    total = 0.0
    for b in range(B):
        for t in range(lengths[b]):
            logp = _log_softmax_row(logits[b, t])
            H = 0.0
            for v in range(logp.shape[0]):
                p = math.exp(logp[v])
                if p > 0.0:  # 0 * log 0 := 0 (e.g. -inf logits)
                    H -= p * logp[v]
            total += H
            n += 1
    return float(total / n) if n > 0 else 0.0


# ----------------------------------------------------------------------------
# 8. SFT loss
# ----------------------------------------------------------------------------


def sft_loss_ref(logits, targets, mask):
    """Mean over valid tokens of the negative log-likelihood of targets under softmax(logits)."""
    logits = _f64(logits)
    targets = np.asarray(targets)
    B, T, _ = logits.shape
    lengths = _row_lengths(mask)
    n = 0
    total = 0.0
    for b in range(B):
        for t in range(lengths[b]):
            logp = _log_softmax_row(logits[b, t])
            total += -logp[int(targets[b, t])]
            n += 1
    return float(total / n) if n > 0 else 0.0


# ----------------------------------------------------------------------------
# 9. Bradley-Terry
# ----------------------------------------------------------------------------


def bradley_terry_ref(chosen, rejected, margin=None):
    """Mean of -log sigmoid(chosen - rejected - margin); aux accuracy = mean(chosen > rejected)."""
    chosen = _f64(chosen).reshape(-1)
    rejected = _f64(rejected).reshape(-1)
    B = chosen.shape[0]
    if margin is None:
        margins = [0.0] * B
    else:
        m = _f64(margin)
        if m.ndim == 0:
            margins = [float(m)] * B
        else:
            m = m.reshape(-1)
            margins = [float(m[b]) for b in range(B)]
    if B == 0:
        return 0.0, {"accuracy": 0.0}
    total = 0.0
    correct = 0
    for b in range(B):
        z = chosen[b] - rejected[b] - margins[b]
        total += _softplus_neg(z)
        if chosen[b] > rejected[b]:
            correct += 1
    return float(total / B), {"accuracy": correct / B}


# ----------------------------------------------------------------------------
# 10. Plackett-Luce
# ----------------------------------------------------------------------------


def plackett_luce_ref(scores, mask=None):
    """Plackett-Luce NLL of lists [B, K] ordered best first; with K=2 equals bradley_terry_ref."""
    scores = _f64(scores)
    B, K = scores.shape
    if mask is None:
        mask = np.ones((B, K), dtype=np.float64)
    mask = _f64(mask)
    nlls = []
    n_pairs = 0
    n_correct = 0
    for b in range(B):
        v = [scores[b, k] for k in range(K) if mask[b, k] > 0.5]
        n = len(v)
        for i in range(n):
            for j in range(i + 1, n):
                n_pairs += 1
                if v[i] > v[j]:
                    n_correct += 1
        if n < 2:
            continue
        nll = 0.0
        for k in range(n):
            nll -= v[k] - _logsumexp(v[k:])
        nlls.append(nll)
    loss = sum(nlls) / len(nlls) if nlls else 0.0
    acc = n_correct / n_pairs if n_pairs > 0 else 0.0
    return float(loss), {"accuracy": acc}


# ----------------------------------------------------------------------------
# 11. adaptive KL controller
# ----------------------------------------------------------------------------


def adaptive_kl_ref(kl_coef, kl, n_steps, target, horizon):
    """Ziegler et al. (2019) adaptive KL coefficient update."""
    e = float(kl) / float(target) - 1.0
    e = min(max(e, -0.2), 0.2)
    return float(kl_coef) * (1.0 + e * float(n_steps) / float(horizon))


# ----------------------------------------------------------------------------
# 12. critic-free estimators (REINFORCE / GRPO / Dr. GRPO / RLOO / REINFORCE++)
# ----------------------------------------------------------------------------


def reward_to_go_ref(rewards, mask, gamma):
    """G_t = sum over valid k >= t of gamma^(k - t) r_k; 0 at masked positions.

    Written as the explicit double sum (no recursion), so it is independent of a reverse scan.
    """
    rewards = _f64(rewards)
    B, T = rewards.shape
    lengths = _row_lengths(mask)
    out = np.zeros((B, T), dtype=np.float64)
    gamma = float(gamma)
    for b in range(B):
        L = lengths[b]
        for t in range(L):
            g = 0.0
            for k in range(t, L):
                g += gamma ** (k - t) * rewards[b, k]
            out[b, t] = g
    return out


def sequence_return_ref(rewards, mask):
    """R_b = sum of the valid rewards of row b ([B]); 0 for an empty row."""
    rewards = _f64(rewards)
    lengths = _row_lengths(mask)
    out = np.zeros(rewards.shape[0], dtype=np.float64)
    for b in range(rewards.shape[0]):
        total = 0.0
        for t in range(lengths[b]):
            total += rewards[b, t]
        out[b] = total
    return out


def group_relative_ref(returns, group_size, kind, eps=1e-6):
    """Per-response advantages of contiguous groups of ``group_size`` rows ([B] -> [B]).

    kind 'grpo':    (R_i - mean_g) / (sample std_g (ddof = 1) + eps)
    kind 'dr_grpo': R_i - mean_g
    kind 'rloo':    R_i - mean of the other n - 1 returns of the group
    """
    returns = _f64(returns)
    n = int(group_size)
    out = np.zeros(returns.shape[0], dtype=np.float64)
    for start in range(0, returns.shape[0], n):
        group = [float(returns[start + j]) for j in range(n)]
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        for j in range(n):
            if kind == "grpo":
                out[start + j] = (group[j] - mean) / (std + eps)
            elif kind == "dr_grpo":
                out[start + j] = group[j] - mean
            elif kind == "rloo":
                others = [group[k] for k in range(n) if k != j]
                out[start + j] = group[j] - sum(others) / (n - 1)
            else:
                raise ValueError(f"unknown group estimator: {kind!r}")
    return out


def per_token_ref(sequence_values, mask):
    """[B] -> [B, T]: row b's value on its valid tokens, 0 on padding."""
    sequence_values = _f64(sequence_values)
    mask = _f64(mask)
    B, T = mask.shape
    lengths = _row_lengths(mask)
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        for t in range(lengths[b]):
            out[b, t] = sequence_values[b]
    return out


def group_center_scores_ref(rewards, scores, mask, group_size):
    """Rewards with the group-mean score subtracted at each row's last valid token (REINFORCE++-baseline).

    The group mean is over all ``group_size`` scores of the group, an empty row's included (its score
    is still a sample of the prompt's reward); an empty row itself has no token to carry it, so its
    output is all 0. Other valid tokens keep their reward; padding is 0.
    """
    rewards = _f64(rewards)
    scores = _f64(scores)
    n = int(group_size)
    B, T = rewards.shape
    lengths = _row_lengths(mask)
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        start = (b // n) * n
        group_mean = sum(float(scores[start + j]) for j in range(n)) / n
        L = lengths[b]
        for t in range(L):
            out[b, t] = rewards[b, t]
        if L > 0:
            out[b, L - 1] -= group_mean
    return out


def reinforce_pp_ref(rewards, mask, gamma, eps=1e-8):
    """REINFORCE++: the reward-to-go whitened over all valid tokens (population variance)."""
    return whiten_ref(reward_to_go_ref(rewards, mask, gamma), mask, shift_mean=True, eps=eps)


def gspo_token_advantages_ref(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high=None):
    """GSPO loss with per-token advantages [B, T]; returns (loss, clip_fraction).

    A_i = mean of row i's valid advantages, s_i = exp(mean_t over valid t of (logpi - logpi_old)),
    loss = -mean over non-empty rows of min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i);
    clip_fraction = fraction of non-empty rows where the clipped term is strictly the smaller.
    """
    logprobs = _f64(logprobs)
    old_logprobs = _f64(old_logprobs)
    advantages = _f64(advantages)
    lengths = _row_lengths(mask)
    eps_low = float(clip_eps)
    eps_high = eps_low if clip_eps_high is None else float(clip_eps_high)
    terms = []
    n_clipped = 0
    for b in range(logprobs.shape[0]):
        L = lengths[b]
        if L == 0:
            continue
        log_ratio_sum = 0.0
        adv_sum = 0.0
        for t in range(L):
            log_ratio_sum += logprobs[b, t] - old_logprobs[b, t]
            adv_sum += advantages[b, t]
        s = math.exp(log_ratio_sum / L)
        a = adv_sum / L
        clipped_s = min(max(s, 1.0 - eps_low), 1.0 + eps_high)
        terms.append(min(s * a, clipped_s * a))
        if clipped_s * a < s * a:
            n_clipped += 1
    if not terms:
        return 0.0, 0.0
    return -sum(terms) / len(terms), n_clipped / len(terms)


def gspo_unclipped_grad_ref(logprobs, old_logprobs, advantages, mask):
    """d/d logprobs of -(1/S) sum_i s_i A_i (A_i: row mean of the token advantages), by hand:

    d s_i / d logpi_it = s_i / |y_i| on valid t, so the gradient is -(1/S) A_i s_i / |y_i| there, 0 elsewhere.
    """
    logprobs = _f64(logprobs)
    old_logprobs = _f64(old_logprobs)
    advantages = _f64(advantages)
    B, T = logprobs.shape
    lengths = _row_lengths(mask)
    S = sum(1 for L in lengths if L > 0)
    grad = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        L = lengths[b]
        if L == 0:
            continue
        s = math.exp(sum(logprobs[b, t] - old_logprobs[b, t] for t in range(L)) / L)
        a = sum(advantages[b, t] for t in range(L)) / L
        for t in range(L):
            grad[b, t] = -a * s / L / S
    return grad


def informative_groups_ref(scores, group_size):
    """[B] bools: the row's group (contiguous rows of ``group_size``) has scores that are not all equal."""
    scores = [float(s) for s in _f64(scores).reshape(-1)]
    n = int(group_size)
    out = []
    for start in range(0, len(scores), n):
        group = scores[start:start + n]
        informative = any(s != group[0] for s in group)
        out.extend([informative] * n)
    return np.asarray(out, dtype=bool)


def keep_informative_first_ref(scores, group_size, groups):
    """Row indices of the first ``groups`` whole groups in the order: informative groups in sampling
    order, then the uninformative ones in sampling order."""
    flags = informative_groups_ref(scores, group_size)
    n = int(group_size)
    n_groups = len(flags) // n
    informative = [g for g in range(n_groups) if flags[g * n]]
    rest = [g for g in range(n_groups) if not flags[g * n]]
    rows = []
    for g in (informative + rest)[:groups]:
        rows.extend(range(g * n, g * n + n))
    return np.asarray(rows, dtype=np.int64)


# ----------------------------------------------------------------------------
# 13. direct preference optimisation (DPO / cDPO / IPO / SimPO / ORPO)
# ----------------------------------------------------------------------------


def _pair_aux(chosen_rewards, rejected_rewards):
    """accuracy / margin / chosen_reward / rejected_reward means over pairs, by a loop."""
    n = len(chosen_rewards)
    correct = 0
    margin = 0.0
    for c, r in zip(chosen_rewards, rejected_rewards):
        margin += c - r
        if c - r > 0:
            correct += 1
    return {"accuracy": correct / n, "margin": margin / n,
            "chosen_reward": sum(chosen_rewards) / n, "rejected_reward": sum(rejected_rewards) / n}


def dpo_ref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """Mean over pairs of -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
    h = (pi_c - ref_c) - (pi_r - ref_r); rewards beta (pi - ref)."""
    pc, pr, rc, rr = (_f64(x).reshape(-1) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    n = pc.shape[0]
    total = 0.0
    chosen_rewards, rejected_rewards = [], []
    for b in range(n):
        h = (pc[b] - rc[b]) - (pr[b] - rr[b])
        total += (1.0 - label_smoothing) * _softplus_neg(beta * h) + label_smoothing * _softplus_neg(-beta * h)
        chosen_rewards.append(beta * (pc[b] - rc[b]))
        rejected_rewards.append(beta * (pr[b] - rr[b]))
    return total / n, _pair_aux(chosen_rewards, rejected_rewards)


def ipo_ref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, tau, len_chosen=None, len_rejected=None):
    """Mean over pairs of (h - 1/(2 tau))^2 with h the margin of (length-averaged when lengths are given)
    log-ratios; rewards are those log-ratios."""
    pc, pr, rc, rr = (_f64(x).reshape(-1) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    n = pc.shape[0]
    lc = [1.0] * n if len_chosen is None else [max(float(x), 1.0) for x in _f64(len_chosen).reshape(-1)]
    lr = [1.0] * n if len_rejected is None else [max(float(x), 1.0) for x in _f64(len_rejected).reshape(-1)]
    total = 0.0
    chosen_rewards, rejected_rewards = [], []
    for b in range(n):
        c = (pc[b] - rc[b]) / lc[b]
        r = (pr[b] - rr[b]) / lr[b]
        total += (c - r - 1.0 / (2.0 * tau)) ** 2
        chosen_rewards.append(c)
        rejected_rewards.append(r)
    return total / n, _pair_aux(chosen_rewards, rejected_rewards)


def simpo_ref(policy_chosen, policy_rejected, len_chosen, len_rejected, beta, gamma):
    """Mean over pairs of -log sigmoid(beta pi_c/|y_c| - beta pi_r/|y_r| - gamma); rewards beta pi/|y|."""
    pc, pr, lc, lr = (_f64(x).reshape(-1) for x in (policy_chosen, policy_rejected, len_chosen, len_rejected))
    n = pc.shape[0]
    total = 0.0
    chosen_rewards, rejected_rewards = [], []
    for b in range(n):
        c = beta * pc[b] / max(lc[b], 1.0)
        r = beta * pr[b] / max(lr[b], 1.0)
        total += _softplus_neg(c - r - gamma)
        chosen_rewards.append(c)
        rejected_rewards.append(r)
    return total / n, _pair_aux(chosen_rewards, rejected_rewards)


def orpo_ref(policy_chosen, policy_rejected, len_chosen, len_rejected, nll_chosen, lam):
    """nll - lam * mean log sigmoid(odds_c - odds_r), odds = log p - log(1 - p), log p = pi/|y|;
    nll is the scalar itself or the mean of a [B] array; rewards are the log odds."""
    pc, pr, lc, lr = (_f64(x).reshape(-1) for x in (policy_chosen, policy_rejected, len_chosen, len_rejected))
    n = pc.shape[0]
    nll_arr = _f64(nll_chosen)
    nll = float(nll_arr) if nll_arr.ndim == 0 else sum(float(x) for x in nll_arr) / n

    def log_odds(logp):
        return logp - math.log(-math.expm1(logp))  # log(1 - e^x) = log(-(e^x - 1))

    total = 0.0
    chosen_rewards, rejected_rewards = [], []
    for b in range(n):
        c = log_odds(pc[b] / max(lc[b], 1.0))
        r = log_odds(pr[b] / max(lr[b], 1.0))
        total += _softplus_neg(c - r)
        chosen_rewards.append(c)
        rejected_rewards.append(r)
    aux = _pair_aux(chosen_rewards, rejected_rewards)
    aux["nll"] = nll
    return nll + lam * total / n, aux
