"""Autoregressive decoding with the KV cache: greedy and sampled.

Prefill the prompt once, then feed one token at a time; the cache makes each step cost one
position instead of the whole prefix. Sampling divides the logits by the temperature, optionally
keeps the top-k / nucleus (top-p) candidates, and draws from a seeded `torch.Generator`, so the same
seed gives the same text. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .model import Transformer


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Choose the next token from (B, V) logits.

    Args:
        logits: (B, V) float.
        temperature: 0 for greedy; otherwise logits are divided by it before the softmax.
        top_k: keep only the k largest logits (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all).
        generator: source of randomness for reproducible sampling.
    Returns:
        (B,) int64 token ids.
    Raises:
        ValueError: if temperature < 0, top_k < 0 or top_p not in (0, 1].
    """
    if not temperature >= 0 or top_k < 0 or not 0 < top_p <= 1:  # `not >=` also rejects NaN
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int] | Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None) -> Tensor:
    """Continue a prompt with the KV cache.

    Args:
        model: the language model (put in eval mode by the caller or here).
        prompt: (S0,) ids, or (B, S0) for a batch of equal-length prompts.
        max_new_tokens: tokens to add; stops early when every row has produced `eos_id`.
        temperature, top_k, top_p: see `sample_next` (temperature 0 = greedy).
        seed: seeds the sampling generator (ignored for greedy); None draws from torch's global RNG.
        eos_id: optional id that ends a row (the row is padded with eos afterwards).
    Returns:
        (B, S0 + n) int64 with n <= max_new_tokens (B = 1 for a 1-D prompt).
    Raises:
        ValueError: if the prompt is empty or not 1-D / 2-D, max_new_tokens < 0, prompt +
            max_new_tokens exceeds max_seq_len, or the sampling arguments are invalid (see `sample_next`).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not temperature >= 0 or top_k < 0 or not 0 < top_p <= 1:  # before any work; `not >=` rejects NaN
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    tokens = torch.as_tensor(prompt, device=device)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer token ids, got dtype {tokens.dtype}")
    tokens = tokens.long()
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.dim() != 2:
        raise ValueError(f"prompt must be (S0,) or (B, S0), got shape {tuple(tokens.shape)}")
    B, S0 = tokens.shape
    if S0 == 0:
        raise ValueError("generate needs a prompt of at least one token")
    total = S0 + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({S0}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache = model.new_cache(B, max_len=total)
    logits = model(tokens, cache).logits[:, -1]  # prefill: (B, V) for the last prompt position
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [tokens]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out.append(nxt[:, None])
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = model(nxt[:, None], cache).logits[:, -1]  # (B, V), one new position
    model.train(was_training)  # a sample taken during training leaves the mode as it found it
    return torch.cat(out, dim=1)
