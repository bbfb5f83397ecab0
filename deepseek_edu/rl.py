"""Rollouts, log-probabilities, the supervised warm-up and greedy evaluation for the RL chapter.

`sample_responses` draws the G responses of each prompt through `sampling.decode`, the package's one
decode loop (KV cache, per-row stop at the eos, the log-probability of every sampled token under the
distribution it was drawn from); `response_logprobs` recomputes those log-probabilities with
gradients. `supervised_finetune` teaches the layout with the package's training loss and optimizer
step (`loss.training_loss`, `optim.optimizer_step`), and `evaluate` scores greedy answers.
The GRPO loop that uses them is `grpo.grpo_train`; everything here is re-exported by `grpo.py`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig, get_preset
from .loss import training_loss
from .model import Transformer
from .optim import SkipCounter, optimizer_step
from .rewards import score_responses
from .sampling import decode
from .tasks import CharTokenizer, Problem

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
        # sampling.decode: the one decode loop (KV cache, per-row stop at the eos, each token's log-prob)
        out = decode(model, tokens, max_new_tokens, temperature, generator=generator, eos_id=tokenizer.eos_id)
        n_new = out.tokens.shape[1]
        live = out.mask.cpu()  # (n, n_new)
        responses[idx, :n_new] = torch.where(live, out.tokens.cpu(), tokenizer.pad_id)
        mask[idx, :n_new] = live
        logps[idx, :n_new] = out.logprobs.cpu()
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


def sft_batch(tokenizer: CharTokenizer, problems: Sequence[Problem]) -> tuple[Tensor, Tensor, Tensor]:
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


class SFTLosses(list):
    """The loss of each SFT step (nats/token over the response tokens), a list of floats, plus the
    number of steps skipped for a non-finite gradient (`optim.py`'s policy) as `skipped_steps`."""

    skipped_steps: int = 0


def supervised_finetune(model: Transformer, tokenizer: CharTokenizer, task, steps: int, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0, progress: bool = True,
                        on_step: Callable[[int, float], None] | None = None,
                        schedule_steps: int | None = None, max_skipped_steps: int = 10) -> SFTLosses:
    """Teach the layout and the worked solutions by next-token prediction on the response tokens.

    AdamW (weight decay 0.01), 10% linear warmup then cosine to 10% over `schedule_steps` (default
    `steps`), gradient clipping at 1, the MoE balance loss added and the routing biases updated after
    each step: the package's `loss.training_loss` (masked to the response tokens) and
    `optim.optimizer_step`, as in `train.py`. A step with a non-finite gradient is skipped; after
    `max_skipped_steps` skips in a row `optim.NonFiniteError` is raised. With schedule_steps > steps
    the run stops part-way through its schedule, before the learning rate has annealed: a checkpoint
    that is partly right and still unsure, the starting point GRPO can improve (notebook 10 says why).

    `on_step(step, loss)` is called after each step (1-based), e.g. to evaluate along the way.

    Returns:
        `SFTLosses`: the loss of each step (nats/token), and `.skipped_steps`.
    Raises:
        optim.NonFiniteError: too many non-finite gradients in a row.
    """
    from tqdm.auto import tqdm  # imported on use: tqdm.auto probes for a notebook

    device = model.embed.weight.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    total = max(steps, schedule_steps or steps)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    rng = random.Random(seed)
    losses = SFTLosses()
    skips = SkipCounter(max_skipped_steps)
    model.train()
    for _ in tqdm(range(steps), desc="SFT", disable=not progress, leave=False):
        x, y, m = sft_batch(tokenizer, task.problems(batch_size, "train", seed=rng.randrange(2**31)))
        x, y, m = x.to(device), y.to(device), m.to(device)
        terms = training_loss(model(x, mtp=False), y, mask=m)  # response tokens only; + the balance loss
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        skips.update(optimizer_step(model, opt, sched, grad_clip=1.0), where=f"SFT step {len(losses) + 1}")
        losses.skipped_steps = skips.skipped
        losses.append(float(terms.ce.detach()))
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
