"""GRPO: rule-based rewards, group advantages, clipped policy losses (GRPO, Dr. GRPO, DAPO), the RL loop.

Group Relative Policy Optimization (DeepSeekMath §4.1) is PPO without a value network: for each
prompt q sample a *group* of G outputs o_1..o_G from the old policy, score each with a reward r_i,
and use the output's standing inside its own group as the advantage of every one of its tokens:

    Â_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)

    J(θ) = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε) Â_i) - β KL_k3(π_θ || π_ref)_it ]
    ρ_it = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t)

and the loss is -J. DeepSeek-R1-Zero (R1 §2.2) runs it on a base model with two rule rewards: the
final answer checked by a program, and the format ``<think>…</think><answer>…</answer>``.

Two later papers change the aggregation. Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
Training") drops the 1/|o_i| (which favours long wrong answers and short right ones) and the std
division (which up-weights groups that are nearly all right or all wrong): tokens are summed and
divided by a *constant* (the response budget). DAPO (Yu et al. 2025) clips asymmetrically
(ε_low 0.2, ε_high 0.28: "clip-higher", room for unlikely tokens to grow), averages over all tokens
of the batch (each token counts once, whatever its output's length), and drops groups whose
rewards are all equal (their advantages are 0: they only dilute the batch).

Traps this module is written against (FAULTS kinds G, H, I; tests/test_grpo.py):

* advantages per *prompt*, from a group-id tensor (prompts may be interleaved), never per batch; a
  group whose rewards are all equal gets exactly 0, never 0/0;
* padding never enters a loss, whatever garbage its log-probs hold: masked with `torch.where`
  before any arithmetic, and normalisers that do not depend on the padded width;
* the clipped side of the surrogate has zero gradient; on-policy (ρ = 1) the loss value is
  -mean(Â) ≈ 0 while its gradient is Σ Â ∇log π -- the policy-gradient theorem;
* the k3 KL estimator exp(d) - d - 1 overflows for large log-ratios d: clamped before `exp` and
  continued linearly beyond the bound (`kl_k3`);
* rewards never execute model text: `tasks.parse_expression` is a bounded hand-written parser, and
  every reward does a bounded amount of work on any input.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GRPOConfig, ModelConfig, get_preset
from .model import Transformer
from .tasks import CharTokenizer, ExpressionError, Problem, make_task, parse_expression, parse_integer

# --- rewards (R1 §2.2.2) ---------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
MAX_RESPONSE_CHARS = 4096  # longer responses score 0 before any scan


def parse_r1_layout(text: str) -> tuple[str, str] | None:
    """Split an R1-Zero response into (reasoning, answer), or None if the layout is broken.

    The layout: optional whitespace, ``<think>``, reasoning (any characters, newlines included, no
    tag), ``</think>``, optional whitespace, ``<answer>``, answer (no tag), ``</answer>``, optional
    whitespace. Each tag exactly once, so nested or repeated tags fail. Linear time (``str.count`` and
    ``str.find``; no backtracking regex); texts over `MAX_RESPONSE_CHARS` fail at once.
    """
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    if any(text.count(tag) != 1 for tag in TAGS):
        return None
    a, b, c, d = (text.find(tag) for tag in TAGS)
    if not a < b < c < d:
        return None
    ws = " \t\r\n"
    if text[:a].strip(ws) or text[b + len(THINK_CLOSE):c].strip(ws) or text[d + len(ANSWER_CLOSE):].strip(ws):
        return None
    return text[a + len(THINK_OPEN):b], text[c + len(ANSWER_OPEN):d]


def format_reward(text: str) -> float:
    """1.0 if `text` follows the R1-Zero layout (`parse_r1_layout`), else 0.0."""
    return 1.0 if parse_r1_layout(text) is not None else 0.0


def check_answer(answer: str, problem: Problem) -> bool:
    """Whether the text inside ``<answer>`` solves `problem`. Never executes anything.

    * arithmetic: an integer literal equal to the reference (an expression is refused: copying the
      question ``"47+38"`` must not score);
    * countdown: an expression over + - * / and parentheses using each given number exactly once
      (no unary minus, no other numbers) whose exact value is the target.

    A reference that does not parse makes every answer wrong.
    """
    if problem.task == "arithmetic":
        ref = parse_integer(problem.answer)
        got = parse_integer(answer)
        return ref is not None and got is not None and got == ref
    if problem.task == "countdown":
        target = parse_integer(problem.answer)
        if target is None or not problem.numbers:
            return False
        try:
            value, used = parse_expression(answer, unary_minus=False)
        except ExpressionError:
            return False
        return sorted(used) == sorted(problem.numbers) and value == target
    return False


def accuracy_reward(text: str, problem: Problem) -> float:
    """1.0 if the response has the R1 layout and its answer is correct (`check_answer`), else 0.0."""
    parsed = parse_r1_layout(text)
    return 1.0 if parsed is not None and check_answer(parsed[1], problem) else 0.0


def score_responses(texts: Sequence[str], problems: Sequence[Problem], format_weight: float = 0.1
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Rewards of a batch: r = accuracy + format_weight * format.

    Returns:
        (rewards, accuracy, format), each (N,) float32.
    Raises:
        ValueError: if the two sequences differ in length.
    """
    if len(texts) != len(problems):
        raise ValueError(f"{len(texts)} responses for {len(problems)} problems")
    acc = torch.tensor([accuracy_reward(t, p) for t, p in zip(texts, problems)], dtype=torch.float32)
    fmt = torch.tensor([format_reward(t) for t in texts], dtype=torch.float32)
    return acc + format_weight * fmt, acc, fmt


# --- group advantages (DeepSeekMath §4.1.2) ---------------------------------------------------------


def _group_index(group_ids: Tensor, n: int) -> tuple[Tensor, int]:
    if group_ids.dim() != 1 or group_ids.numel() != n:
        raise ValueError(f"group_ids must be ({n},), got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    _, inv = torch.unique(group_ids, return_inverse=True)  # (N,) in 0..P-1, any layout
    return inv, int(inv.max()) + 1 if n else 0


def equal_reward_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(N,) bool: True for every sample whose group's rewards are all equal (zero-variance groups)."""
    inv, P = _group_index(group_ids, rewards.numel())
    r = rewards.float()
    hi = torch.full((P,), -math.inf).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((P,), math.inf).scatter_reduce(0, inv, r, "amin")
    return (hi == lo)[inv]


def group_advantages(rewards: Tensor, group_ids: Tensor, scale: bool = True) -> Tensor:
    """Group-relative advantages: (r - mean of its group) / std of its group.

    DeepSeekMath §4.1.2 (outcome supervision); Dr. GRPO uses `scale=False` (mean-centred only).

    Args:
        rewards: (N,) float, one per response.
        group_ids: (N,) integer; responses with equal ids answer the same prompt. Any layout works
            (``[0,0,1,1]`` or interleaved ``[0,1,0,1]``; ids need not be contiguous).
        scale: divide by the group's std (population std, ddof 0, so the advantages of a scaled
            group have mean 0 and variance 1).
    Returns:
        (N,) float32, computed in float64. A group whose rewards are all equal gives exactly 0 (no 0/0,
        no epsilon).
    Raises:
        ValueError: on mismatched shapes or float group ids.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got {tuple(rewards.shape)}")
    inv, P = _group_index(group_ids, rewards.numel())
    # float64 throughout: rewards that differ in their last bits (100 vs 100.00001) would otherwise
    # leave a mean that is off by a rounding step next to deviations of the same size
    r = rewards.double()
    inv = inv.to(r.device)
    count = torch.bincount(inv, minlength=P).double()  # (P,)
    mean = torch.zeros(P, dtype=torch.float64, device=r.device).index_add(0, inv, r) / count  # (P,)
    centred = r - mean[inv]  # (N,)
    adv = centred
    equal = equal_reward_groups(rewards, group_ids).to(r.device)
    if scale:
        std = (torch.zeros(P, dtype=torch.float64, device=r.device).index_add(0, inv, centred**2) / count).sqrt()
        adv = centred / torch.where(equal, torch.ones_like(r), std[inv])  # std: (P,) ddof 0
    return torch.where(equal, torch.zeros_like(adv), adv).float()


# --- KL and the policy losses ------------------------------------------------------------------------

KL_LOG_RATIO_MAX = 20.0  # k3 is exact for log(π_ref/π_θ) <= 20 (ratio e^20 ≈ 4.9e8); linear beyond
KL_LOG_RATIO_LIMIT = 1e6  # |log(π_ref/π_θ)| is clamped here first: k3 stays below ~5e14, finite in fp32/bf16
RATIO_LOG_MAX = 20.0  # log(π_θ/π_old) is clamped to ±20 in the surrogate; far beyond any clip range


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref) (Schulman 2020; DeepSeekMath eq. 4).

    With d = ref_logp - logp: k3 = exp(d) - d - 1 >= 0, unbiased for the KL when tokens are sampled
    from π_θ. `exp` overflows fp32 beyond d ≈ 88, so d is clamped at `KL_LOG_RATIO_MAX` (20) before
    the `exp` and k3 continues beyond it along its tangent, (e^20 - 1)(d - 20) + k3(20): still
    convex, increasing, finite for any finite d (d = 1e4 gives about 4.9e12) with a finite gradient
    that keeps pulling towards the reference. For d -> -inf, exp(d) -> 0 and k3 ≈ -d - 1. Before
    all that, d is clamped to ±`KL_LOG_RATIO_LIMIT` (1e6 nats, far beyond any real log-prob gap), so
    k3 < 5e14 and is finite for *any* input, inf included (the gradient is 0 only beyond ±1e6).

    Args:
        logp, ref_logp: (...) log-probabilities of the same tokens under π_θ and π_ref.
    Returns:
        (...) k3 values in fp32, or fp64 for fp64 inputs (fp16 and bf16 inputs are upcast). For fp16
        inputs the exact range ends at 10, not 20, so that the gradient, up to e^bound, fits fp16.
    """
    given = torch.promote_types(logp.dtype, ref_logp.dtype)
    dtype = torch.promote_types(given, torch.float32)  # fp16 / bf16 inputs: computed in fp32
    # the bound's slope e^bound must fit the inputs' dtype, where the gradient goes: fp16 caps it at 10
    bound = min(KL_LOG_RATIO_MAX, math.floor(math.log(torch.finfo(given).max)) - 1)
    d = (ref_logp.to(dtype) - logp.to(dtype)).clamp(-KL_LOG_RATIO_LIMIT, KL_LOG_RATIO_LIMIT)
    dc = d.clamp(max=bound)
    slope = math.expm1(bound)  # derivative of exp(d) - d - 1 at the bound
    return torch.exp(dc) - dc - 1 + slope * F.relu(d - bound)


@dataclass
class LossOutput:
    """What `policy_loss` returns.

    Attributes:
        loss: () the scalar to minimise (-J).
        kl: () mean k3 KL over valid tokens (0 when no reference log-probs are given).
        clip_frac: () share of valid tokens whose clip is active (their gradient is 0).
        ratio_mean: () mean of ρ over valid tokens.
        n_tokens: () valid tokens counted.
    """

    loss: Tensor
    kl: Tensor
    clip_frac: Tensor
    ratio_mean: Tensor
    n_tokens: Tensor


LOSS_VARIANTS = ("grpo", "dr_grpo", "dapo")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                ref_logp: Tensor | None = None, variant: str = "grpo", clip_eps_low: float = 0.2,
                clip_eps_high: float = 0.2, beta: float = 0.0, max_tokens: int | None = None,
                keep: Tensor | None = None) -> LossOutput:
    """Clipped surrogate loss with a k3 KL penalty, aggregated the way each variant prescribes.

    Per token: ℓ_t = -min(ρ_t Â, clip(ρ_t, 1 - ε_low, 1 + ε_high) Â) + β k3_t, ρ_t = exp(logp - old_logp).

    * "grpo" (DeepSeekMath eq. 3): mean over each output's tokens, then over the outputs.
    * "dr_grpo" (Dr. GRPO, Liu et al. 2025): sum over each output's tokens / `max_tokens` (a
      constant), then mean over the outputs. Pair with ``group_advantages(scale=False)``.
    * "dapo" (DAPO's token-level loss, Yu et al. 2025): sum over all tokens of all kept outputs /
      their number. Pass `keep` = ``~equal_reward_groups(...)`` to drop zero-variance groups, and
      ε_high = 0.28.

    Args:
        logp: (B, T) log π_θ of the response tokens (requires grad).
        old_logp: (B, T) log π_old of the same tokens, as stored when sampling (no grad).
        advantages: (B,) one per response (`group_advantages`).
        mask: (B, T) bool, True on response tokens; False on padding, whose values in every other
            tensor may be anything (even NaN or inf) and never change the loss or its gradient.
        ref_logp: (B, T) log π_ref, needed when beta > 0.
        variant: one of `LOSS_VARIANTS`.
        clip_eps_low, clip_eps_high: the clip range [1 - ε_low, 1 + ε_high].
        beta: KL coefficient (DeepSeekMath 0.04; R1-Zero 0.001; DAPO 0).
        max_tokens: Dr. GRPO's constant normaliser (the generation budget); required for "dr_grpo".
        keep: optional (B,) bool; False drops a response from the loss and from every normaliser.
    Returns:
        `LossOutput`.
    Raises:
        ValueError: on an unknown variant, mismatched shapes, beta > 0 without ref_logp, or
            "dr_grpo" without max_tokens.
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {LOSS_VARIANTS}")
    B, T = logp.shape
    for name, t in (("old_logp", old_logp), ("mask", mask)) + ((("ref_logp", ref_logp),) if ref_logp is not None else ()):
        if t.shape != (B, T):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, T)} like logp")
    if advantages.shape != (B,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({B},)")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp")
    if variant == "dr_grpo" and not (max_tokens and max_tokens > 0):
        raise ValueError("variant='dr_grpo' needs max_tokens > 0 (the constant normaliser)")
    valid = mask.bool()
    if keep is not None:
        valid = valid & keep.bool()[:, None]
    # outputs that count in a mean over outputs (and whose advantage is read at all)
    rows = keep.bool() if keep is not None else torch.ones(B, dtype=torch.bool, device=logp.device)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # 1. Garbage at padding must never reach exp or a product: replace it before any arithmetic.
    lp = torch.where(valid, logp, zero)
    old = torch.where(valid, old_logp.detach(), zero)
    adv = torch.where(rows, advantages.detach().to(logp.dtype), zero)[:, None]  # (B, 1)
    # 2. Clipped surrogate: the clipped side is a constant in θ, so it passes no gradient.
    ratio = torch.exp((lp - old).clamp(-RATIO_LOG_MAX, RATIO_LOG_MAX))  # (B, T)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    # 3. KL to the frozen reference.
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        kl = kl_k3(lp, torch.where(valid, ref_logp.detach(), zero))
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(valid, per_token, zero)
    # 4. Aggregate.
    n_tok = valid.sum(dim=1).to(logp.dtype)  # (B,)
    n_rows = rows.sum().clamp(min=1).to(logp.dtype)
    if variant == "grpo":
        loss = (per_token.sum(dim=1) / n_tok.clamp(min=1)).sum() / n_rows
    elif variant == "dr_grpo":
        loss = (per_token.sum(dim=1) / max_tokens).sum() / n_rows
    else:  # dapo
        # per-output sums first (each row's sum ignores its padding, as in the other variants), then the
        # rows: a flat sum over (B, T) would change its summation order with the padded width
        loss = per_token.sum(dim=1).sum() / n_tok.sum().clamp(min=1)
    n_valid = valid.sum()
    denom = n_valid.clamp(min=1).to(logp.dtype)
    with torch.no_grad():
        is_clipped = ((adv > 0) & (ratio > 1 + clip_eps_high)) | ((adv < 0) & (ratio < 1 - clip_eps_low))
        clip_frac = (is_clipped & valid).sum() / denom
        kl_mean = torch.where(valid, kl, zero).sum() / denom
        ratio_mean = torch.where(valid, ratio, zero).sum() / denom
    return LossOutput(loss, kl_mean, clip_frac, ratio_mean, n_valid)


# --- sampling and log-probabilities ------------------------------------------------------------------


@dataclass
class Rollout:
    """Responses sampled for a list of prompts.

    Attributes:
        prompts: N prompt id lists (lengths may differ).
        responses: (N, T) int64 response ids; padding (pad id) after the eos.
        mask: (N, T) bool, True on response tokens (the eos included).
        logp: (N, T) fp32 log-probabilities of the sampled tokens under the sampling distribution
            (softmax(logits / temperature)); 0 at padding.
        texts: N decoded responses (up to, not including, the eos).
    """

    prompts: list[list[int]]
    responses: Tensor
    mask: Tensor
    logp: Tensor
    texts: list[str]

    @property
    def lengths(self) -> Tensor:
        """(N,) response lengths in tokens (eos included)."""
        return self.mask.sum(dim=1)


def _buckets(prompts: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Prompt length -> row indices: the model has no padding mask, so equal lengths share a batch."""
    out: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        out.setdefault(len(p), []).append(i)
    return out


@torch.no_grad()
def sample_responses(model: Transformer, tokenizer: CharTokenizer, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> Rollout:
    """Sample one response per prompt with the KV cache and store each token's log-probability.

    The stored log-prob is log softmax(logits / temperature) at the sampled token: the probability
    of the distribution the token was *drawn from*, so ρ = 1 exactly when the loss recomputes it with
    `response_logprobs` at the same temperature. Temperature 0 is greedy (log-probs at temperature 1).

    Args:
        model: the policy; run in eval mode (the mode is restored afterwards).
        tokenizer: gives eos_id and pad_id, and decodes the texts.
        prompts: N id lists (repeat a prompt G times for a group).
        max_new_tokens: response budget; a response stops at its eos.
        temperature: >= 0.
        generator: seeded source of randomness.
    Returns:
        `Rollout` with T = the longest response (<= max_new_tokens).
    Raises:
        ValueError: on temperature < 0 or a prompt that leaves no room in max_seq_len.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    N = len(prompts)
    responses = torch.full((N, max_new_tokens), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(N, max_new_tokens, dtype=torch.bool)
    logps = torch.zeros(N, max_new_tokens)
    for L, rows in _buckets(prompts).items():
        if L + max_new_tokens > model.cfg.max_seq_len:
            raise ValueError(f"prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len="
                             f"{model.cfg.max_seq_len}")
        idx = torch.tensor(rows)
        tokens = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)  # (n, L)
        n = len(rows)
        cache = model.new_cache(n, max_len=L + max_new_tokens)
        logits = model(tokens, cache).logits[:, -1]  # (n, V)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            lp = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)  # (n, V)
            if temperature > 0:
                nxt = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)  # (n,)
            else:
                nxt = lp.argmax(dim=-1)
            live = ~done
            responses[idx[live.cpu()], t] = nxt[live].cpu()
            mask[idx[live.cpu()], t] = True
            logps[idx[live.cpu()], t] = lp.gather(1, nxt[:, None]).squeeze(1)[live].cpu()
            done = done | (nxt == tokenizer.eos_id)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache).logits[:, -1]
    model.train(was_training)
    T = max(int(mask.sum(dim=1).max()), 1) if N else 1
    texts = [tokenizer.decode(r.tolist()) for r in responses]
    return Rollout([list(p) for p in prompts], responses[:, :T], mask[:, :T], logps[:, :T], texts)


def response_logprobs(model: Transformer, prompts: Sequence[Sequence[int]], responses: Tensor,
                      temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) of each response token given its prompt, in one forward per length.

    Args:
        prompts: N id lists; responses: (N, T) ids (padding after the eos is harmless: causal).
    Returns:
        (N, T) fp32, differentiable w.r.t. the model's parameters (call under no_grad for π_ref).
    """
    device = model.embed.weight.device
    N, T = responses.shape
    out = torch.zeros(N, T, device=device)
    for L, rows in _buckets(prompts).items():
        idx = torch.tensor(rows, device=device)
        prompt = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)  # (n, L)
        resp = responses[idx.cpu()].to(device)  # (n, T)
        tokens = torch.cat([prompt, resp[:, :-1]], dim=1)  # (n, L + T - 1): position L-1+t predicts resp[t]
        logits = model(tokens).logits[:, L - 1:]  # (n, T, V)
        lp = F.log_softmax(logits.float() / temperature, dim=-1).gather(2, resp[..., None]).squeeze(-1)
        out = out.index_copy(0, idx, lp)
    return out


# --- the model, supervised warm-up, evaluation --------------------------------------------------------


def task_model_config(max_seq_len: int = 64) -> ModelConfig:
    """The course's tiny DeepSeek (`get_preset("tiny")`: MLA + DeepSeekMoE with the V3 gate) for the
    task text: the 64-id `CharTokenizer` vocabulary, 64 positions, 3 blocks of width 64 (CPU-fast),
    no MTP module."""
    return get_preset("tiny").replace(vocab_size=CharTokenizer.vocab_size, max_seq_len=max_seq_len, dim=64,
                                      n_layers=3, inter_dim=192, moe_inter_dim=64, n_mtp_depth=0)


def _sft_batch(tokenizer: CharTokenizer, problems: Sequence[Problem]) -> tuple[Tensor, Tensor, Tensor]:
    """(B, S) inputs, (B, S) targets, (B, S) loss mask: next-token prediction on the solution and eos only."""
    seqs, starts = [], []
    for p in problems:
        prompt = tokenizer.encode(p.prompt)
        seqs.append(prompt + tokenizer.encode(p.solution) + [tokenizer.eos_id])
        starts.append(len(prompt))
    S = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), S), tokenizer.pad_id, dtype=torch.long)
    y = torch.full((len(seqs), S), tokenizer.pad_id, dtype=torch.long)
    m = torch.zeros(len(seqs), S, dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, :len(s) - 1] = torch.tensor(s[1:])
        m[i, st - 1:len(s) - 1] = True  # predict every response token from the last prompt token on
    return x, y, m


def supervised_finetune(model: Transformer, tokenizer: CharTokenizer, task, steps: int, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0, progress: bool = True,
                        on_step: Callable[[int, float], None] | None = None,
                        schedule_steps: int | None = None) -> list[float]:
    """Teach the layout and the worked solutions by next-token prediction on the response tokens.

    AdamW (weight decay 0.01), 10% linear warmup then cosine to 10% over `schedule_steps` (default
    `steps`), gradient clipping at 1, the MoE balance loss added and the routing biases updated after
    each step (as in `train.py`). With schedule_steps > steps the run stops part-way through its
    schedule, before the learning rate has annealed: a checkpoint that is partly right and still
    unsure, the starting point GRPO can improve (notebook 10 says why).

    `on_step(step, loss)` is called after each step (1-based), e.g. to evaluate along the way.

    Returns:
        The loss of each step (nats/token).
    """
    from tqdm.auto import tqdm

    device = model.embed.weight.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    total = max(steps, schedule_steps or steps)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    rng = random.Random(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="SFT", disable=not progress, leave=False):
        x, y, m = _sft_batch(tokenizer, task.problems(batch_size, "train", seed=rng.randrange(2**31)))
        x, y, m = x.to(device), y.to(device), m.to(device)
        out = model(x)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1), reduction="none")
        loss = (ce * m.reshape(-1)).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_router_biases()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses), losses[-1])
    return losses


@torch.no_grad()
def evaluate(model: Transformer, tokenizer: CharTokenizer, problems: Sequence[Problem], max_new_tokens: int = 32
             ) -> dict[str, float]:
    """Greedy answers to `problems`: accuracy, format rate and mean response length (tokens)."""
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    ro = sample_responses(model, tokenizer, prompts, max_new_tokens, temperature=0.0)
    _, acc, fmt = score_responses(ro.texts, problems)
    return {"accuracy": float(acc.mean()), "format": float(fmt.mean()), "length": float(ro.lengths.float().mean())}


# --- the GRPO loop ------------------------------------------------------------------------------------


@dataclass
class GRPOResult:
    """What `grpo_train` returns: per-step logs and held-out evaluations (step -> metrics)."""

    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0


def grpo_train(model: Transformer, tokenizer: CharTokenizer, task, cfg: GRPOConfig,
               eval_problems: Sequence[Problem] = (), ref_model: Transformer | None = None,
               progress: bool = True, result: GRPOResult | None = None) -> GRPOResult:
    """Run `cfg.steps` GRPO steps on `model` in place.

    Each step: draw `prompts_per_step` train problems; sample G responses each from the current
    policy (π_old) at `temperature`; score them; compute group advantages (std-scaled except for
    Dr. GRPO); compute π_ref's log-probs (the frozen copy of the model as it was before GRPO); then
    `updates_per_batch` AdamW steps on the clipped loss of `cfg.variant` (DAPO: zero-variance groups
    dropped). The policy runs in eval mode throughout, so the MoE routing biases stay fixed: a bias
    update between sampling and loss would make π_old differ from the sampling policy.

    Logged per step: reward, accuracy, format, response length (tokens), KL (k3, to π_ref), clip
    fraction, the share of zero-variance groups. Held-out greedy accuracy every `eval_every` steps
    and after the last.
    """
    from tqdm.auto import tqdm

    result = result or GRPOResult()
    device = model.embed.weight.device
    ref = ref_model if ref_model is not None else copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    # Linear warmup over the first optimizer steps: Adam's first steps move every weight by about lr
    # whatever the gradient's size, and a policy gradient from 64 samples is mostly noise.
    n_warm = cfg.warmup_steps * cfg.updates_per_batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / n_warm) if n_warm else 1.0)
    rng = random.Random(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    G, P = cfg.group_size, cfg.prompts_per_step
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"GRPO ({cfg.variant})", disable=not progress, leave=False)
    for step in bar:
        problems = task.problems(P, "train", seed=rng.randrange(2**31))
        group_problems = [p for p in problems for _ in range(G)]  # (P*G) layout: prompt-major
        group_ids = torch.arange(P).repeat_interleave(G)  # (P*G,)
        prompts = [tokenizer.encode(p.prompt) for p in group_problems]
        ro = sample_responses(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, gen)
        rewards, acc, fmt = score_responses(ro.texts, group_problems, cfg.format_weight)
        adv = group_advantages(rewards, group_ids, scale=cfg.variant != "dr_grpo")
        equal = equal_reward_groups(rewards, group_ids)
        keep = ~equal if cfg.variant == "dapo" else None
        with torch.no_grad():
            ref_lp = response_logprobs(ref, ro.prompts, ro.responses, cfg.temperature)
        old_lp, mask = ro.logp.to(device), ro.mask.to(device)
        stats = []
        for _ in range(cfg.updates_per_batch):
            if keep is not None and not bool(keep.any()):
                break  # every group had equal rewards: nothing to learn from this batch
            lp = response_logprobs(model, ro.prompts, ro.responses, cfg.temperature)
            out = policy_loss(lp, old_lp, adv.to(device), mask, ref_logp=ref_lp, variant=cfg.variant,
                              clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta,
                              max_tokens=cfg.max_new_tokens, keep=None if keep is None else keep.to(device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            stats.append(out)
        first = stats[0] if stats else None
        row = {
            "step": step + 1, "reward": float(rewards.mean()), "accuracy": float(acc.mean()),
            "format": float(fmt.mean()), "length": float(ro.lengths.float().mean()),
            "kl": float(first.kl) if first else 0.0,
            "clip_frac": float(sum(float(s.clip_frac) for s in stats) / len(stats)) if stats else 0.0,
            "zero_var_groups": float(equal.float().mean()), "loss": float(first.loss.detach()) if first else 0.0,
        }
        result.history.append(row)
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
        last = step + 1 == cfg.steps
        if eval_problems and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            result.evals.append({"step": step + 1, **evaluate(model, tokenizer, eval_problems, cfg.max_new_tokens)})
    result.elapsed += time.perf_counter() - t0
    return result


def run(cfg: GRPOConfig, progress: bool = True, out_path: str | Path | None = None) -> dict[str, Any]:
    """The whole R1-Zero-in-miniature run: a fresh tiny model, SFT, evaluation, GRPO, evaluation.

    Returns (and writes to `out_path` as JSON when given) the configs, the SFT losses, the held-out
    accuracy before and after GRPO, and the GRPO history.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device(cfg.device)
    tokenizer = CharTokenizer()
    task = make_task(cfg.task)
    model = Transformer(task_model_config()).to(device)
    test = task.problems(cfg.n_eval, "test", seed=12345, distinct=True)
    t0 = time.perf_counter()
    sft_losses = supervised_finetune(model, tokenizer, task, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr,
                                     cfg.seed, progress, schedule_steps=cfg.sft_schedule_steps)
    sft_time = time.perf_counter() - t0
    before = evaluate(model, tokenizer, test, cfg.max_new_tokens)
    res = grpo_train(model, tokenizer, task, cfg, test, progress=progress,
                     result=GRPOResult(evals=[{"step": 0, **before}]))
    after = res.evals[-1]
    out = {
        "config": cfg.to_dict(), "model": model.cfg.to_dict(), "n_parameters": model.num_parameters(),
        "sft_losses": sft_losses, "sft_seconds": sft_time, "grpo_seconds": res.elapsed,
        "accuracy_sft": before["accuracy"], "accuracy_grpo": after["accuracy"],
        "evals": res.evals, "history": res.history,
    }
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    out["model_object"] = model
    return out
