"""Choosing the next token, and the package's one decode loop.

`sample_next` divides the logits by the temperature, optionally keeps the top-k / nucleus (top-p)
candidates, and draws from a seeded `torch.Generator`; every edge value equals its limit exactly
(temperature 0 and top_k 1 are argmax, ties included; a tiny temperature is greedy and never NaN; a
huge one is uniform). `decode` prefills a KV cache and feeds one token at a time, stopping each row at
its eos and keeping each token's log-probability: `generate.generate` and GRPO's
`rl.sample_responses` both run it. Re-exported by `generate.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Transformer


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ValueError unless 0 <= temperature < inf, top_k >= 0 and 0 < top_p <= 1 (NaN rejected)."""
    if not (temperature >= 0 and math.isfinite(temperature)) or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need 0 <= temperature < inf, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, "
                         f"{top_p}")


def sample_logprobs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Log-probabilities (B, V) fp32 of the distribution `sample_next` draws from (-inf where excluded).

    softmax((logits - max) / temperature) restricted to the top_k largest logits (ties kept in index
    order, so exactly k survive) and then to the smallest prefix of them, by decreasing probability,
    whose mass reaches top_p. Subtracting the row's max first keeps every value finite at any
    temperature > 0: a tiny temperature gives -inf to everything below the max (greedy, its limit),
    a huge one ~0 to everything (uniform, its limit), never NaN. Temperature 0 is the limit itself:
    0 at the first maximum (argmax's choice), -inf elsewhere.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    V = logits.shape[-1]
    if temperature == 0 or top_k == 1:  # a one-point distribution at argmax (its first maximum on ties)
        first = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        return torch.full_like(logits, float("-inf")).scatter(-1, first, 0.0)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V), max 0, finite or -inf
    if top_k and top_k < V:
        keep = scaled.argsort(dim=-1, descending=True, stable=True)[:, :top_k]  # exactly k, ties by index
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, keep, scaled.gather(-1, keep))
    if top_p < 1:
        sorted_scaled, order = scaled.sort(dim=-1, descending=True, stable=True)
        probs = sorted_scaled.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_scaled = sorted_scaled.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_scaled)
    return scaled.log_softmax(-1)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Choose the next token from (B, V) logits.

    Args:
        logits: (B, V) float.
        temperature: 0 for greedy; otherwise logits are divided by it before the softmax.
        top_k: keep only the k largest logits (0 = all; ties kept in index order, so top_k=1 is greedy).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all).
        generator: source of randomness for reproducible sampling.
    Returns:
        (B,) int64 token ids. Every edge value equals its limit exactly: temperature 0 and top_k 1
        are argmax (the first maximum on ties); see `sample_logprobs`.
    Raises:
        ValueError: if temperature < 0 or not finite, top_k < 0 or top_p not in (0, 1].
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logp = sample_logprobs(logits, temperature, top_k, top_p)
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)


@dataclass
class Decoded:
    """What `decode` returns for B prompts of equal length.

    Attributes:
        tokens: (B, n) int64 new tokens, n <= max_new_tokens; after a row's eos, eos again.
        mask: (B, n) bool, True up to and including each row's first eos (its response).
        logprobs: (B, n) fp32 log-probability of each chosen token under the distribution it was
            drawn from (`sample_logprobs`; at temperature 0, under the temperature-1 softmax); 0
            where mask is False.
    """

    tokens: Tensor
    mask: Tensor
    logprobs: Tensor


@torch.no_grad()
def decode(model: Transformer, tokens: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None, eos_id: int | None = None) -> Decoded:
    """The package's one decode loop: prefill (B, S0) `tokens` into a fresh KV cache, then one
    position per step; a row stops at its `eos_id` (fed eos afterwards, which no other row sees),
    and the loop ends when every row has stopped or after `max_new_tokens`. `generate` and GRPO's
    `rl.sample_responses` both run it. The model is used as it is (the caller sets eval mode).

    Raises:
        ValueError: bad sampling arguments (see `sample_next`).
    """
    check_sampling(temperature, top_k, top_p)
    B, S0 = tokens.shape
    device = tokens.device
    cache = model.new_cache(B, max_len=S0 + max_new_tokens)
    logits = model(tokens, cache).logits[:, -1] if max_new_tokens else None  # prefill: (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out, live, logps = [], [], []
    for step in range(max_new_tokens):
        if temperature == 0 or top_k == 1:
            nxt = logits.argmax(dim=-1)  # (B,)
            logp = logits.float().log_softmax(-1) if temperature == 0 else sample_logprobs(logits, temperature, top_k, top_p)
        else:
            logp = sample_logprobs(logits, temperature, top_k, top_p)  # (B, V)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # (B,)
        live.append(~done)
        logps.append(torch.where(~done, logp.gather(1, nxt[:, None]).squeeze(1), 0.0))
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt == eos_id)
        out.append(nxt)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = model(nxt[:, None], cache).logits[:, -1]  # (B, V), one new position
    if not out:
        empty = tokens.new_zeros(B, 0)
        return Decoded(tokens=empty, mask=empty.bool(), logprobs=empty.float())
    return Decoded(tokens=torch.stack(out, 1), mask=torch.stack(live, 1), logprobs=torch.stack(logps, 1))
