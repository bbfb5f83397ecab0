"""Autoregressive decoding with the KV cache: greedy, sampled, and speculative with the MTP modules.

The decode loop and the sampling rules are `sampling.py` (`decode`, `sample_next`), re-exported here.

Prefill the prompt once, then feed one token at a time; the cache makes each step cost one
position instead of the whole prefix. Sampling divides the logits by the temperature, optionally
keeps the top-k / nucleus (top-p) candidates, and draws from a seeded `torch.Generator`, so the same
seed gives the same text. Temperature 0 means greedy (argmax).

**Speculative decoding** (`speculative_generate`, DeepSeek-V3 §5.4.3). One decoding step of a small
model costs about the same for one position as for a few: the weights are read once either way. So
let a cheap *draft* guess the next n tokens, and check all the guesses with **one** forward of the
main model over [last token, d_1, ..., d_n]. The main model's greedy choice g_0 at the first
position is the token plain greedy decoding would emit; where d_1 = g_0 its choice g_1 at the second
position is again plain greedy's, and so on. Accept the longest agreeing prefix d_1..d_j plus the main
model's own next token g_j: 1 to n + 1 tokens per forward, and **exactly** the greedy output.
The draft here is the MTP chain: module k turns h^{k-1} at the last position and the token k ahead
(the last accepted one or a draft) into the draft d_k. Rejected positions are then removed from the
main KV cache (`ModelCache.truncate`) and from each MTP depth's own cache (depth k keeps the positions
whose inputs, tokens up to i + k, were all accepted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import KVCache
from .model import ModelCache, Transformer
from .sampling import (  # noqa: F401 -- re-exported: generate is where notebooks and scripts import them from
    Decoded,
    check_sampling,
    decode,
    sample_logprobs,
    sample_next,
)


def _prompt_tokens(model: Transformer, prompt: Sequence[int] | Tensor, max_new_tokens: int, caller: str) -> Tensor:
    """The prompt as (B, S0) int64 on the model's device. Raises ValueError for non-integer ids, a shape
    other than (S0,) / (B, S0), an empty prompt, or prompt + max_new_tokens beyond max_seq_len."""
    tokens = torch.as_tensor(prompt, device=model.embed.weight.device)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer token ids, got dtype {tokens.dtype}")
    tokens = tokens.long()
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.dim() != 2:
        raise ValueError(f"prompt must be (S0,) or (B, S0), got shape {tuple(tokens.shape)}")
    S0 = tokens.shape[1]
    if S0 == 0:
        raise ValueError(f"{caller} needs a prompt of at least one token")
    total = S0 + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({S0}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    return tokens


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
    check_sampling(temperature, top_k, top_p)  # before any work
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    tokens = _prompt_tokens(model, prompt, max_new_tokens, "generate")
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    new = decode(model, tokens, max_new_tokens, temperature, top_k, top_p, generator, eos_id).tokens
    model.train(was_training)  # a sample taken during training leaves the mode as it found it
    return torch.cat([tokens, new], dim=1)


# --- speculative decoding with the MTP modules -----------------------------------------------------------

DraftFn = Callable[[Tensor, int], Sequence[int]]


@dataclass
class SpeculativeOutput:
    """What `speculative_generate` returns.

    Attributes:
        tokens: (1, S0 + n) int64, the prompt then n new tokens (n <= max_new_tokens).
        new_tokens: n.
        steps: main-model forwards after the prefill (one verification each).
        drafted: per draft depth k = 1..n_draft, how many tokens were proposed at depth k.
        accepted: per depth k, how many of them the main model accepted.
        elapsed_s: wall seconds of the whole call (prefill included; device synchronised).
        cache: the main model's KV cache at the end: S0 + n - 1 positions (every token but the last).
        mtp_caches: each MTP depth's cache at the end (empty with a custom draft): depth k holds at
            most S0 + n - 1 - k positions, all of them computed from accepted tokens only.
    """

    tokens: Tensor
    new_tokens: int
    steps: int
    drafted: list[int]
    accepted: list[int]
    elapsed_s: float
    cache: ModelCache = field(repr=False)
    mtp_caches: list[KVCache] = field(repr=False, default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts over all depths (V3 §5.4.3 reports 85-90% for depth 1)."""
        return sum(self.accepted) / max(sum(self.drafted), 1)

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Depth k's accepted / proposed: the chance that d_k is right given that it was proposed."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_step(self) -> float:
        """New tokens per main-model forward, the prefill's token included (plain greedy: 1)."""
        return self.new_tokens / (self.steps + 1)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per wall second, prefill included."""
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")


class MTPDraft:
    """The MTP chain as a draft for speculative decoding (batch 1), with one KV cache per depth.

    Keeps, per level l = 0..D-1, the hidden states h^l of every position computed so far (h^0 is the
    main model's, stored by `speculative_generate` after each verification), so that a depth whose
    cache was rolled back can recompute its positions.

    Args:
        model: a `Transformer` with MTP modules.
        max_len: positions the caches must hold (prompt + new tokens).
    Raises:
        ValueError: if the model has no MTP modules.
    """

    def __init__(self, model: Transformer, max_len: int) -> None:
        if model.mtp is None:
            raise ValueError("MTPDraft needs a model with MTP modules (n_mtp_depth > 0)")
        self.model = model
        self.caches = model.new_mtp_caches(1, max_len)
        w = model.embed.weight
        self.hidden = [torch.zeros(1, max_len, model.cfg.dim, dtype=w.dtype, device=w.device)
                       for _ in range(len(model.mtp))]  # level l: (1, T_max, D), h^l by position

    def store_main_hidden(self, start: int, hidden: Tensor) -> None:
        """Record the main model's h^0 (1, S', D) for positions start..start+S'-1."""
        self.hidden[0][:, start:start + hidden.shape[1]] = hidden

    def propose(self, seq: Tensor, n: int) -> list[int]:
        """Draft t_{N+1}..t_{N+n} from the accepted tokens t_0..t_N.

        Args:
            seq: (1, N + 1) int64, every accepted token; positions 0..N-1 are in the main cache and
                their h^0 has been stored; t_N is the newest (not yet fed to the main model).
            n: drafts wanted, 1 <= n <= D.
        Returns:
            n token ids: d_k from depth k at position N - 1 (it reads t_N for k = 1, else d_{k-1}).
        """
        N = seq.shape[1] - 1
        drafts: list[int] = []
        draft_ids = seq.new_empty(0)
        for k in range(1, n + 1):
            module, cache = self.model.mtp[k - 1], self.caches[k - 1]
            start = cache.length  # depth k has positions 0..start-1; compute start..N-1
            # Position i reads t_{i+k}: accepted tokens up to t_N, then the drafts of shallower depths.
            # ext = t_0..t_N, d_1..d_{k-1} (= t_{N+1}..t_{N+k-1}); positions start..N-1 read ext[start+k:]
            ids = torch.cat([seq[0], draft_ids])[start + k:][None]  # (1, N - start)
            h, logits, _ = module(self.hidden[k - 1][:, start:N], ids, self.model.embed, self.model.head,
                                  self.model.freqs_cis[start:N], cache)  # (1, N-start, D), (1, N-start, V)
            if k < len(self.hidden):
                self.hidden[k][:, start:N] = h
            d = logits[0, -1].argmax()  # depth k's guess for t_{N+k}
            draft_ids = torch.cat([draft_ids, d[None]])
            drafts.append(int(d))
        return drafts

    def rollback(self, newest: int) -> None:
        """Keep what stays valid once t_0..t_newest are final: depth k keeps positions < newest - k.

        Position i of depth k read the tokens up to t_{i+k}. Those up to t_{newest-1} were fed as they
        are now (accepted tokens or accepted drafts); t_newest, the main model's own token, was never
        fed to any depth (a rejected draft stood in its place, or nothing). So i + k <= newest - 1.
        """
        for k, cache in enumerate(self.caches, start=1):
            cache.truncate(min(cache.length, max(newest - k, 0)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: Sequence[int] | Tensor, max_new_tokens: int,
                         n_draft: int | None = None, draft: DraftFn | None = None,
                         eos_id: int | None = None) -> SpeculativeOutput:
    """Greedy decoding with draft-and-verify; the tokens equal `generate(..., temperature=0)`'s.

    Each step: draft n tokens (the MTP chain, or `draft`), run the main model once over [t_N, d_1..d_n]
    against its cache, accept d_1..d_j where they equal the main model's argmax, append the main
    model's argmax g_j, and truncate the caches to what the accepted tokens produced. DeepSeek-V3
    §5.4.3 (85-90% acceptance of the second token, 1.8x tokens/s on V3).

    Batch size 1 only: rows of a batch would accept different numbers of tokens, and the caches keep one
    length for all rows. Greedy only (sampled speculative decoding needs the rejection-sampling
    correction of Leviathan et al. 2023; not implemented). "Equal to greedy" is exact up to floating
    point: the verification forward processes n + 1 positions at once where plain decoding processes
    one, so logits can differ in the last bits and an argmax between two near-equal logits may flip
    (not seen in fp32 on CPU; possible in bf16).

    Args:
        model: a `Transformer`; with `draft=None` it must have MTP modules.
        prompt: (S0,) or (1, S0) token ids.
        max_new_tokens: tokens to add (exactly this many unless eos comes first).
        n_draft: drafts per step, 1..n_mtp_depth (default n_mtp_depth) for the MTP chain; any >= 1 with
            `draft`. Fewer are drafted near the end so that no step overshoots max_new_tokens.
        draft: optional replacement for the MTP chain: draft(tokens (N + 1,) int64, n) -> n token ids
            guessing t_{N+1}..t_{N+n} (tests use always-right and always-wrong drafts).
        eos_id: optional id that ends the generation (kept as the last token).
    Returns:
        `SpeculativeOutput` (tokens (1, S0 + n), steps, drafted / accepted per depth, elapsed_s, caches).
    Raises:
        ValueError: a batch of more than one prompt, an empty prompt, max_new_tokens < 0, prompt +
            max_new_tokens > max_seq_len, no MTP modules without `draft`, n_draft out of range, or a
            draft that returns the wrong number of ids or ids out of range.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if draft is None and model.mtp is None:
        raise ValueError("speculative_generate drafts with the MTP modules, and this model has none "
                         "(n_mtp_depth=0); pass draft=... or use generate()")
    limit = model.cfg.n_mtp_depth if draft is None else None
    n_draft = (limit or 1) if n_draft is None else n_draft
    if not isinstance(n_draft, int) or n_draft < 1 or (limit is not None and n_draft > limit):
        raise ValueError(f"n_draft={n_draft!r} must be an integer in [1, {limit if limit is not None else 'inf'}]"
                         + (" (one draft per MTP depth)" if limit is not None else ""))
    device = model.embed.weight.device
    tokens = _prompt_tokens(model, prompt, max_new_tokens, "speculative_generate")
    if tokens.shape[0] != 1:
        raise ValueError(f"speculative_generate supports batch size 1 only: prompt must be (S0,) or (1, S0), "
                         f"got shape {tuple(tokens.shape)}")
    S0 = tokens.shape[1]
    total = S0 + max_new_tokens
    V = model.cfg.vocab_size
    was_training = model.training
    model.eval()
    drafted, accepted = [0] * n_draft, [0] * n_draft
    try:
        _sync(device)
        t0 = time.perf_counter()
        cache = model.new_cache(1, max_len=total)
        mtp = MTPDraft(model, total) if draft is None else None
        seq = torch.zeros(1, total, dtype=torch.long, device=device)  # accepted tokens so far
        seq[:, :S0] = tokens
        if max_new_tokens == 0:
            _sync(device)
            return SpeculativeOutput(tokens, 0, 0, drafted, accepted, time.perf_counter() - t0, cache,
                                     mtp.caches if mtp is not None else [])
        out = model(tokens, cache)  # prefill: positions 0..S0-1 (no MTP: a cache is given)
        if mtp is not None:
            mtp.store_main_hidden(0, out.hidden)
        seq[0, S0] = out.logits[0, -1].argmax()
        L, steps = S0 + 1, 0  # L accepted tokens t_0..t_{L-1}; the main cache holds L - 1 positions
        stopped = eos_id is not None and int(seq[0, L - 1]) == eos_id
        while L - S0 < max_new_tokens and not stopped:
            N = L - 1  # index of the newest token, not yet fed to the main model
            n = min(n_draft, max_new_tokens - (L - S0) - 1)  # never draft past max_new_tokens
            if n == 0:
                drafts = []
            elif mtp is not None:
                drafts = mtp.propose(seq[:, :L], n)
            else:
                drafts = [int(t) for t in draft(seq[0, :L].clone(), n)]
                if len(drafts) != n or any(not 0 <= t < V for t in drafts):
                    raise ValueError(f"draft returned {drafts!r}; expected {n} token ids in [0, {V})")
            x = torch.tensor([drafts], dtype=torch.long, device=device)  # (1, n)
            x = torch.cat([seq[:, N:L], x], dim=1)  # (1, 1 + n): t_N, d_1..d_n at positions N..N+n
            out = model(x, cache)  # verification: one main forward
            greedy = out.logits[0].argmax(dim=-1).tolist()  # g_0..g_n: main model's choice after each
            j = 0
            while j < n and drafts[j] == greedy[j]:
                j += 1
            for k in range(n):
                drafted[k] += 1
                accepted[k] += k < j
            new = drafts[:j] + [greedy[j]]  # accepted drafts, then the main model's own next token
            if eos_id is not None and eos_id in new:
                new, stopped = new[:new.index(eos_id) + 1], True
            seq[0, L:L + len(new)] = torch.tensor(new, device=device)
            cache.truncate(N + len(new))  # keep positions N..N+j: their inputs t_N, d_1..d_j were accepted
            if mtp is not None:
                mtp.store_main_hidden(N, out.hidden[:, :len(new)])
                mtp.rollback(N + len(new))  # t_{N+len(new)} is the newest token
            L += len(new)
            steps += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return SpeculativeOutput(seq[:, :L].clone(), L - S0, steps, drafted, accepted, elapsed, cache,
                             mtp.caches if mtp is not None else [])
