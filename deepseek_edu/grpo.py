"""GRPO: group advantages, the k3 KL, clipped policy losses (GRPO, Dr. GRPO, DAPO) and the RL loop.

The chapter's other parts live beside it and are re-exported here: the rule rewards in `rewards.py`;
sampling, log-probabilities, the supervised warm-up and evaluation in `rl.py`.

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

Traps this module is written against (docs/pitfalls.md kinds G, H, I; tests/test_grpo.py):

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GRPOConfig
from .io import atomic_write
from .model import Transformer
from .optim import SkipCounter, optimizer_step
from .rewards import (  # noqa: F401 -- re-exported: the chapter's names stay importable from grpo
    ANSWER_CLOSE,
    ANSWER_OPEN,
    MAX_RESPONSE_CHARS,
    TAGS,
    THINK_CLOSE,
    THINK_OPEN,
    accuracy_reward,
    check_answer,
    format_reward,
    parse_r1_layout,
    score_responses,
)
from .rl import (  # noqa: F401 -- re-exported, as above
    Rollout,
    SFTLosses,
    evaluate,
    response_logprobs,
    sample_responses,
    sft_batch,
    supervised_finetune,
    task_model_config,
)
from .tasks import CharTokenizer, Problem, make_task

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


# --- the GRPO loop ------------------------------------------------------------------------------------


@dataclass
class GRPOResult:
    """What `grpo_train` returns: per-step logs and held-out evaluations (step -> metrics)."""

    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0
    skipped_steps: int = 0  # optimizer updates skipped for a non-finite gradient (optim.py's policy)


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

    Each update goes through `optim.optimizer_step`: an update whose gradient is not finite is skipped
    (counted in "skipped_steps" and `GRPOResult.skipped_steps`); after `cfg.max_skipped_steps` skips in a
    row `optim.NonFiniteError` is raised.

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
    skips = SkipCounter(cfg.max_skipped_steps, result.skipped_steps)
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
            done = optimizer_step(model, opt, sched, cfg.grad_clip)  # skipped when the gradient is not finite
            skips.update(done, where=f"GRPO step {step + 1}")
            stats.append(out)
        first = stats[0] if stats else None
        row = {
            "step": step + 1, "reward": float(rewards.mean()), "accuracy": float(acc.mean()),
            "format": float(fmt.mean()), "length": float(ro.lengths.float().mean()),
            "kl": float(first.kl) if first else 0.0,
            "clip_frac": float(sum(float(s.clip_frac) for s in stats) / len(stats)) if stats else 0.0,
            "zero_var_groups": float(equal.float().mean()), "loss": float(first.loss.detach()) if first else 0.0,
            "skipped_steps": skips.skipped,
        }
        result.history.append(row)
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
        last = step + 1 == cfg.steps
        if eval_problems and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            result.evals.append({"step": step + 1, **evaluate(model, tokenizer, eval_problems, cfg.max_new_tokens)})
        result.skipped_steps = skips.skipped
    result.elapsed += time.perf_counter() - t0
    return result


@dataclass
class GRPORunResult:
    """What `run` returns: the whole R1-Zero-in-miniature run.

    Attributes:
        config, model_config: the GRPOConfig's and the model's `to_dict()`.
        n_parameters: the model's parameters.
        sft_losses: loss of each SFT step (nats/token); sft_seconds, grpo_seconds: wall time.
        accuracy_sft, accuracy_grpo: held-out greedy accuracy before and after GRPO.
        evals, history: `GRPOResult`'s held-out evaluations and per-step records.
        skipped_steps: SFT + GRPO optimizer steps skipped for a non-finite gradient.
        model: the trained model (not written to JSON).
    """

    config: dict[str, Any]
    model_config: dict[str, Any]
    n_parameters: int
    sft_losses: list[float]
    sft_seconds: float
    grpo_seconds: float
    accuracy_sft: float
    accuracy_grpo: float
    evals: list[dict[str, float]]
    history: list[dict[str, float]]
    skipped_steps: int = 0
    model: Transformer | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON record written to metrics.json (keys as before: "model" is the model's config)."""
        return {"config": self.config, "model": self.model_config, "n_parameters": self.n_parameters,
                "sft_losses": list(self.sft_losses), "sft_seconds": self.sft_seconds,
                "grpo_seconds": self.grpo_seconds, "accuracy_sft": self.accuracy_sft,
                "accuracy_grpo": self.accuracy_grpo, "evals": self.evals, "history": self.history,
                "skipped_steps": self.skipped_steps}


def run(cfg: GRPOConfig, progress: bool = True, out_path: str | Path | None = None) -> GRPORunResult:
    """The whole R1-Zero-in-miniature run: a fresh tiny model, SFT, evaluation, GRPO, evaluation.

    Returns a `GRPORunResult` (and writes its `to_json()` to `out_path`, atomically, when given): the
    configs, the SFT losses, the held-out accuracy before and after GRPO, and the GRPO history.
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
                                     cfg.seed, progress, schedule_steps=cfg.sft_schedule_steps,
                                     max_skipped_steps=cfg.max_skipped_steps)
    sft_time = time.perf_counter() - t0
    before = evaluate(model, tokenizer, test, cfg.max_new_tokens)
    res = grpo_train(model, tokenizer, task, cfg, test, progress=progress,
                     result=GRPOResult(evals=[{"step": 0, **before}]))
    out = GRPORunResult(
        config=cfg.to_dict(), model_config=model.cfg.to_dict(), n_parameters=model.num_parameters(),
        sft_losses=list(sft_losses), sft_seconds=sft_time, grpo_seconds=res.elapsed,
        accuracy_sft=before["accuracy"], accuracy_grpo=res.evals[-1]["accuracy"], evals=res.evals,
        history=res.history, skipped_steps=sft_losses.skipped_steps + res.skipped_steps, model=model)
    if out_path is not None:
        atomic_write(out_path, (json.dumps(out.to_json(), indent=1) + "\n").encode())
    return out
