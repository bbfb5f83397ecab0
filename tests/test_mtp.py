"""Tests of deepseek_edu.mtp, the MTP wiring of model.Transformer, and MTP speculative decoding.

Checks (pitfalls kind E wholesale: positions, shifts, off-by-one, caches):

* targets: exact arrays for depth 1 and 2 on a hand-made sequence (depth k at position i predicts
  t_{i+k+1}; the last k positions have none, nothing wraps around); depth >= S raises;
* logits: depth k has S - k positions; each equals a plain re-derivation from the paper's equations
  that may read only t_0..t_{i+k} (so no look-ahead, no shift twice, the embedding-first concatenation
  of DeepSeek's checkpoint, the chain h^{k-1} -> h^k for D = 2); changing a token moves depth-k logits
  only at positions that may read it; S <= k gives empty logits;
* the loss: one-hot logits aligned with the documented targets give zero CE, shifted by one they do
  not; (λ/D)·Σ CE_k is added to the total while "ce" stays the main head's; gradients reach the shared
  embedding and head from the MTP loss alone;
* sharing: the MTP modules register no embedding or head (no duplicate storage in the state dict), use
  the main model's tensors (changing the head changes MTP logits), and the key names are DeepSeek's;
* dropping MTP changes no main logit (bitwise): mtp=False, a model without MTP modules loading the same
  main weights, and equal main weights from the same seed;
* MoE in the MTP block: its aux loss is in the total, `moe_layers` includes it and
  `update_router_biases` moves its selection bias;
* speculative decoding on a trained tiny model (the `tiny` preset with D = 2, trained briefly on a
  branching Markov chain so that drafts are often but not always right): equal to plain greedy for
  always-accepting, always-rejecting and real MTP drafts, for n_draft 1 and 2, with eos and for
  max_new_tokens 0..3; acceptance counts agree with the tokens; after generation the main cache holds
  S0 + n - 1 positions, equal to a fresh prefill, and every MTP depth's cache holds only positions it
  would compute from the final tokens, equal to a fresh computation;
* errors: batch > 1, no MTP modules, bad n_draft, bad drafts, mtp=True with a cache.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_edu.config import ModelConfig, get_preset
from deepseek_edu.generate import generate, speculative_generate
from deepseek_edu.model import ModelOutput, Transformer
from deepseek_edu.moe import MoE
from deepseek_edu.mtp import MTPModule, mtp_loss, mtp_loss_terms, mtp_targets
from deepseek_edu.train import extra_loss_terms, lm_loss

V = 53


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, dim=32, n_layers=2, n_heads=2, inter_dim=48, max_seq_len=48, attention="mla",
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_dense_layers=1,
                n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16,
                score_func="sigmoid", bias_update_speed=0.01, seq_aux_loss_alpha=0.01, init_std=0.2,
                n_mtp_depth=2, mtp_loss_weight=0.3)
    return ModelConfig(**(base | kw))


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_cfg(**kw)).eval()


def _tokens(B, S, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# --- targets ----------------------------------------------------------------------------------------------

def test_targets_exact_arrays_depth_1_and_2():
    t = torch.tensor([[10, 11, 12, 13, 14, 15]])  # t_0..t_5
    x, y = t[:, :-1], t[:, 1:]  # inputs t_0..t_4, next-token targets t_1..t_5
    assert y.tolist() == [[11, 12, 13, 14, 15]]
    assert mtp_targets(y, 1).tolist() == [[12, 13, 14, 15]]  # position i -> t_{i+2}
    assert mtp_targets(y, 2).tolist() == [[13, 14, 15]]  # position i -> t_{i+3}
    assert mtp_targets(y, 4).tolist() == [[15]]
    # what depth k position i reads (t_{i+k}): the inputs shifted by k, never wrapped
    assert x[:, 1:].tolist() == [[11, 12, 13, 14]] and x[:, 2:].tolist() == [[12, 13, 14]]
    for bad in (0, -1, 5, 6):
        with pytest.raises(ValueError, match="depth"):
            mtp_targets(y, bad)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        mtp_targets(y[0], 1)


def test_loss_is_zero_only_for_logits_aligned_with_the_documented_targets():
    t = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    y = t[:, 1:]  # (1, 7)
    big = 60.0
    aligned = [big * F.one_hot(mtp_targets(y, k), 10).float() for k in (1, 2)]  # (1, 7-k, 10)
    terms = mtp_loss_terms(aligned, y)
    assert all(ce.item() < 1e-6 for ce in terms)
    # shifted twice (one position too far) or wrapped with roll: large loss
    shifted = [big * F.one_hot(y[:, k + 1:], 10).float() for k in (1, 2)]
    shifted = [torch.cat([s, s[:, -1:]], 1) for s in shifted]  # pad back to (1, 7-k)
    assert all(ce.item() > 10 for ce in mtp_loss_terms(shifted, y))
    rolled = [big * F.one_hot(torch.roll(y, -k, 1), 10).float() for k in (1, 2)]
    with pytest.raises(ValueError, match="do not match"):
        mtp_loss_terms(rolled, y)  # S positions instead of S - k: refused, not silently wrapped
    # (λ/D) Σ CE_k by hand: uniform logits give ln 10 at each depth
    uniform = [torch.zeros(1, 7 - k, 10) for k in (1, 2)]
    assert mtp_loss(uniform, y, 0.3).item() == pytest.approx(0.3 / 2 * 2 * math.log(10), rel=1e-6)
    assert mtp_loss([], y, 0.3).item() == 0.0


# --- the module and its wiring ----------------------------------------------------------------------------

def _reference_mtp_logits(model: Transformer, tokens, k):
    """Depth k by the paper's equations, position by position, reading only t_0..t_{i+k}."""
    S = tokens.shape[1]
    rows = []
    for i in range(S - k):
        prefix = tokens[:, :i + k + 1]  # all depth k at position i may read
        h = model(prefix[:, :i + 1], mtp=False).hidden  # h^0_0..h^0_i from t_0..t_i
        for d in range(1, k + 1):
            m = model.mtp[d - 1]
            e = model.embed(prefix[:, d:d + i + 1])  # Emb(t_{j+d}) for j = 0..i
            x = m.eh_proj(torch.cat([m.enorm(e), m.hnorm(h)], dim=-1))  # embedding first
            h, _ = m.block(x, model.freqs_cis[:i + 1])  # positions 0..i
        rows.append(model.head(model.mtp[k - 1].norm(h[:, -1])))  # shared head
    return torch.stack(rows, dim=1)


@torch.no_grad()
def test_mtp_logits_equal_the_papers_equations_position_by_position():
    model = _model()
    tokens = _tokens(2, 9)
    out = model(tokens)
    assert [tuple(t.shape) for t in out.mtp_logits] == [(2, 8, V), (2, 7, V)]
    assert all(t.dtype == torch.float32 for t in out.mtp_logits)
    for k in (1, 2):
        ref = _reference_mtp_logits(model, tokens, k)
        torch.testing.assert_close(out.mtp_logits[k - 1], ref, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"depth {k}: {m}")


@torch.no_grad()
def test_a_token_moves_depth_k_logits_only_where_it_may_be_read():
    model = _model()
    tokens = _tokens(1, 10)
    base = model(tokens)
    S = tokens.shape[1]
    for j in (0, 4, S - 1):
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 1) % V
        out = model(changed)
        for k in (1, 2):
            diff = (out.mtp_logits[k - 1] - base.mtp_logits[k - 1]).abs().amax(-1)[0]  # (S-k,)
            # > 1e-4, not > 0: a token routed elsewhere changes the experts' GEMM shapes, which moves other
            # rows in the last bits (1e-7); a position that reads the token moves by O(1)
            moved = (diff > 1e-4).nonzero().flatten().tolist()
            first = max(j - k, 0)  # position i reads t_0..t_{i+k}
            assert moved == list(range(first, S - k)), (j, k, moved)


@torch.no_grad()
def test_short_windows_and_switching_mtp_off():
    model = _model()
    out = model(_tokens(3, 2))
    assert [tuple(t.shape) for t in out.mtp_logits] == [(3, 1, V), (3, 0, V)]
    out = model(_tokens(3, 1))
    assert [tuple(t.shape) for t in out.mtp_logits] == [(3, 0, V), (3, 0, V)]
    assert model(_tokens(3, 5), mtp=False).mtp_logits == []
    cache = model.new_cache(1, 8)
    assert model(_tokens(1, 3), cache).mtp_logits == [], "decoding with a cache skips the MTP modules"
    with pytest.raises(ValueError, match="mtp=True"):
        model(_tokens(1, 1), cache, mtp=True)
    with pytest.raises(ValueError, match="mtp=True"):
        _model(n_mtp_depth=0)(_tokens(1, 3), mtp=True)
    for depth in (0, 3):
        with pytest.raises(ValueError, match="depth"):
            MTPModule(_cfg(), depth)


def test_embedding_and_head_are_shared_not_copied():
    model = _model()
    names = list(model.state_dict())
    assert not any(n.startswith("mtp.") and ("embed" in n or "head" in n) for n in names), names
    for m in model.mtp:
        assert not any(isinstance(c, (torch.nn.Embedding,)) for c in m.modules())
        assert m.eh_proj.weight.shape == (32, 64) and m.eh_proj.bias is None
    mtp_params = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed.weight) not in mtp_params and id(model.head.weight) not in mtp_params
    # the keys the `transformers` converter reads
    for key in ("mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight", "mtp.0.block.attn_norm.weight",
                "mtp.0.block.attn.wkv_a.weight", "mtp.0.block.ffn_norm.weight", "mtp.0.block.ffn.gate.weight",
                "mtp.0.block.ffn.experts.0.w1.weight", "mtp.1.norm.weight"):
        assert key in names, key
    assert isinstance(model.mtp[0].block.ffn, MoE), "the MTP block's FFN is MoE like V3's layer 61"
    # the same tensors: editing the main head moves the MTP logits, and the MTP loss trains embed and head
    tokens = _tokens(2, 6)
    before = model(tokens).mtp_logits[0].clone()
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    assert not torch.allclose(model(tokens).mtp_logits[0], before)
    model.train()
    model.zero_grad()
    out = model(tokens)
    mtp_loss(out.mtp_logits, tokens.roll(-1, 1), 0.3).backward()  # targets' content is irrelevant here
    assert model.embed.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    # tied embeddings stay one tensor with MTP
    tied = _model(tie_embeddings=True)
    assert tied.head.weight is tied.embed.weight
    assert sum(1 for n in tied.state_dict() if n.endswith(("embed.weight", "head.weight"))) == 2


@torch.no_grad()
def test_dropping_mtp_changes_no_main_logit():
    with_mtp = _model(seed=3)
    without = _model(seed=3, n_mtp_depth=0)
    main_sd = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    for k, v in without.state_dict().items():
        assert torch.equal(v, main_sd[k]), f"{k}: the same seed gives other main weights with MTP"
    without.load_state_dict(main_sd)  # strict: exactly the main keys
    tokens = _tokens(2, 11)
    full = with_mtp(tokens)
    assert torch.equal(full.logits, with_mtp(tokens, mtp=False).logits)
    assert torch.equal(full.logits, without(tokens).logits)
    assert torch.equal(full.hidden, without(tokens).hidden)


def test_lm_loss_adds_the_weighted_mtp_terms_and_logs_each_depth():
    model = _model(seq_aux_loss_alpha=0.0)
    model.train()
    tokens = _tokens(2, 10)
    x, y = tokens[:, :-1], tokens[:, 1:]
    out = model(x)
    loss, metrics = lm_loss(out, y, 0.3)
    ce = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    ce_k = [F.cross_entropy(out.mtp_logits[k - 1].reshape(-1, V), y[:, k:].reshape(-1)) for k in (1, 2)]
    assert metrics["ce"] == pytest.approx(ce.item(), rel=1e-6), "the logged main loss is the main head's CE"
    for k in (1, 2):
        assert metrics[f"mtp_ce_{k}"] == pytest.approx(ce_k[k - 1].item(), rel=1e-6)
        assert metrics[f"mtp_loss_{k}"] == pytest.approx(0.3 / 2 * ce_k[k - 1].item(), rel=1e-6)
    expected = ce + out.aux_loss + 0.3 / 2 * (ce_k[0] + ce_k[1])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)
    terms = extra_loss_terms(out, y, 0.3)
    assert set(terms) == {"mtp_loss_1", "mtp_loss_2"}
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        lm_loss(out, y)
    # λ = 0: the MTP terms are 0 and so is their gradient
    assert lm_loss(out, y, 0.0)[1]["mtp_loss_1"] == 0.0
    no_mtp = ModelOutput(out.logits, out.hidden, out.aux_loss)
    assert extra_loss_terms(no_mtp, y) == {}


def test_mtp_block_moe_aux_loss_and_router_bias():
    model = _model(seq_aux_loss_alpha=0.01)
    model.train()
    tokens = _tokens(4, 12)
    assert len(model.moe_layers()) == 1 + 2, "one main MoE layer + the two MTP blocks'"
    assert model.moe_layers()[1] is model.mtp[0].block.ffn
    with_mtp = model(tokens)
    without = model(tokens, mtp=False)
    assert len(with_mtp.expert_load) == 3 and len(without.expert_load) == 1
    assert with_mtp.aux_loss.item() > without.aux_loss.item() > 0, "the MTP blocks' aux losses are added"
    model.update_router_biases()  # consume the loads of the two forwards
    model(tokens)
    before = model.mtp[1].block.ffn.gate.bias.clone()
    loads = model.update_router_biases()
    assert len(loads) == 3 and loads[2].sum() == 4 * 10 * 2  # depth 2 routes B * (S - 2) tokens, K each
    assert not torch.equal(model.mtp[1].block.ffn.gate.bias, before), "the MTP block's bias never moved"


# --- speculative decoding on a trained model ----------------------------------------------------------------

def _markov_stream(n_tokens=4000, n_symbols=64, seed=0):
    """A branching Markov chain: each symbol has 3 successors (p = 0.5, 0.3, 0.2); ids spread over V."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, n_symbols, (n_symbols, 3), generator=g)
    choice = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n_tokens, replacement=True, generator=g).tolist()
    s = [0]
    for c in choice[:-1]:
        s.append(int(succ[s[-1], c]))
    return torch.tensor(s) * 7 + 100


@pytest.fixture(scope="module")
def trained():
    """The `tiny` preset with D = 2 MTP modules, 20 AdamW steps on the Markov stream (about 4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = get_preset("tiny").replace(n_mtp_depth=2, max_seq_len=96)
    torch.manual_seed(0)
    model = Transformer(cfg)
    stream = _markov_stream()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        starts = torch.randint(0, len(stream) - 33, (4,), generator=g).tolist()
        batch = torch.stack([stream[s:s + 33] for s in starts])
        loss, _ = lm_loss(model(batch[:, :-1]), batch[:, 1:], cfg.mtp_loss_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_biases()
    torch.set_num_threads(before)
    return model.eval(), stream


PROMPTS = [(0, 5), (100, 106), (500, 503), (2000, 2001)]


def _prompt(stream, i):
    a, b = PROMPTS[i]
    return stream[a:b]


def _first_difference_is_a_tie(model, out, ref, margin=1e-4):
    """Where speculative and plain greedy decoding part, plain greedy stood at a floating-point tie.

    The verification forward scores several positions in one call, plain decoding one at a time; the
    two sums round differently in the last bits (and differently again on AVX2 and AVX-512 kernels).
    Where the best two logits are closer than that, both choices are greedy. Returns True when the
    first differing position is such a tie (its two tokens are the best two, within `margin`).
    """
    a, b = out[0].tolist(), ref[0].tolist()
    i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    with torch.no_grad():
        logits = model(ref[:, :i]).logits[0, -1].double()
    top2 = logits.topk(2)
    return (set(top2.indices.tolist()) == {a[i], b[i]}
            and float(top2.values[0] - top2.values[1]) < margin)


@pytest.mark.parametrize("n_draft", [1, 2])
@pytest.mark.parametrize("p", range(len(PROMPTS)))
def test_speculative_with_mtp_drafts_equals_greedy(trained, n_draft, p):
    """Speculative decoding with the MTP drafts gives plain greedy's tokens, on every CPU.

    Equality is exact except at a floating-point tie of greedy itself (see `_first_difference_is_a_tie`);
    that acceptance and rollback both happen is tested with drafts of known quality below, since a
    short training run's drafts differ between machines.
    """
    model, stream = trained
    prompt = _prompt(stream, p)
    ref = generate(model, prompt, 40)
    out = speculative_generate(model, prompt, 40, n_draft=n_draft)
    assert out.new_tokens == 40
    if out.tokens.tolist() != ref.tolist():
        assert _first_difference_is_a_tie(model, out.tokens, ref), (out.tokens.tolist(), ref.tolist())
        return
    # every step yields accepted + 1 tokens; the prefill yields one
    assert 1 + out.steps + sum(out.accepted) == 40
    assert out.drafted[0] == out.steps or out.drafted[0] == out.steps - 1  # the last step may draft nothing
    assert all(0 <= a <= d for a, d in zip(out.accepted, out.drafted))


@pytest.mark.parametrize("n_draft", [2, 3])
def test_drafts_right_and_wrong_exercise_acceptance_and_rollback(trained, n_draft):
    """A draft that is right at some depths and wrong at others: partial acceptance, then rollback.

    The draft proposes greedy's true continuation but spoils its last token on every other call, so
    verification alternately accepts everything and a strict prefix, rolls the caches back, and must
    still give plain greedy's tokens (a deterministic construction, the same on every CPU).
    """
    model, stream = trained
    prompt = _prompt(stream, 1)
    ref = generate(model, prompt, 40)
    greedy = ref[0].tolist()
    calls = [0]

    def partly_right(tokens, n):
        assert tokens.tolist() == greedy[:len(tokens)], "the draft must see exactly the accepted tokens"
        draft = greedy[len(tokens):len(tokens) + n]
        calls[0] += 1
        if calls[0] % 2 == 0 and len(draft) == n:
            draft[-1] = (draft[-1] + 1) % model.cfg.vocab_size
        return draft

    out = speculative_generate(model, prompt, 40, n_draft=n_draft, draft=partly_right)
    assert out.tokens.tolist() == ref.tolist()
    # depths 1 .. n-1 are always right; the last depth is right on odd calls, wrong on even ones
    assert all(0 < a == d for a, d in zip(out.accepted[:-1], out.drafted[:-1])), (out.accepted, out.drafted)
    assert 0 < out.accepted[-1] < out.drafted[-1], (out.accepted, out.drafted)


@pytest.mark.parametrize("n_draft", [1, 2, 5])
def test_always_accepting_and_always_rejecting_drafts(trained, n_draft):
    model, stream = trained
    prompt = _prompt(stream, 1)
    ref = generate(model, prompt, 41)
    greedy = ref[0].tolist()

    def oracle(tokens, n):  # the true greedy continuation
        assert tokens.tolist() == greedy[:len(tokens)], "the draft must see exactly the accepted tokens"
        return greedy[len(tokens):len(tokens) + n]

    def contrarian(tokens, n):  # always wrong
        return [(t + 1) % model.cfg.vocab_size for t in greedy[len(tokens):len(tokens) + n]]

    right = speculative_generate(model, prompt, 41, n_draft=n_draft, draft=oracle)
    wrong = speculative_generate(model, prompt, 41, n_draft=n_draft, draft=contrarian)
    assert right.tokens.tolist() == ref.tolist() and wrong.tokens.tolist() == ref.tolist()
    assert right.acceptance_rate == 1.0 and wrong.acceptance_rate == 0.0
    assert wrong.steps == 40, "all rejected: one token per verification, as plain decoding"
    assert right.steps == math.ceil(40 / (n_draft + 1)), "all accepted: n_draft + 1 tokens per verification"
    for out in (right, wrong):
        assert out.cache.length == prompt.numel() + 41 - 1
        assert out.mtp_caches == []


@pytest.mark.parametrize("max_new", [0, 1, 2, 3])
def test_short_generations(trained, max_new):
    model, stream = trained
    prompt = _prompt(stream, 0)
    out = speculative_generate(model, prompt, max_new, n_draft=2)
    assert out.tokens.tolist() == generate(model, prompt, max_new).tolist()
    assert out.tokens.shape == (1, prompt.numel() + max_new)
    assert out.cache.length == (prompt.numel() + max_new - 1 if max_new else 0)


def test_eos_stops_like_plain_greedy(trained):
    model, stream = trained
    prompt = _prompt(stream, 1)
    ref = generate(model, prompt, 40)[0].tolist()
    eos = ref[prompt.numel() + 13]  # a token that occurs in the continuation
    first = ref.index(eos, prompt.numel())
    out = speculative_generate(model, prompt, 40, n_draft=2, eos_id=eos)
    assert out.tokens[0].tolist() == ref[:first + 1]
    assert out.tokens[0].tolist() == generate(model, prompt, 40, eos_id=eos)[0, :first + 1].tolist()


@torch.no_grad()
@pytest.mark.parametrize("n_draft", [1, 2])
def test_caches_after_generation_hold_only_accepted_positions(trained, n_draft):
    """Rollback (pitfalls kind E): each cache equals a fresh computation from the final tokens."""
    model, stream = trained
    prompt = _prompt(stream, 2)
    out = speculative_generate(model, prompt, 30, n_draft=n_draft)
    final = out.tokens  # (1, S0 + 30)
    L = final.shape[1] - 1  # every token but the last was fed to the main model
    assert out.cache.length == L
    fresh = model.new_cache(1, final.shape[1])
    ref = model(final[:, :L], fresh)
    for mine, theirs in zip(out.cache.layers, fresh.layers):
        for name in mine.buffers:
            torch.testing.assert_close(mine.buffers[name][:, :L], theirs.buffers[name][:, :L], atol=1e-5, rtol=1e-5)
    h = ref.hidden  # h^0 for positions 0..L-1
    assert len(out.mtp_caches) == 2
    for k, cache in enumerate(out.mtp_caches, start=1):
        n = cache.length
        if k > n_draft:
            assert n == 0, "a depth that never drafted never ran"
            continue
        assert 0 < n <= L - k, (k, n, L)
        fresh_k = model.new_mtp_caches(1, final.shape[1])[k - 1]
        h, _, _ = model.mtp[k - 1](h[:, :L - k], final[:, k:L], model.embed, model.head, model.freqs_cis[:L - k],
                                   fresh_k)
        for name in cache.buffers:
            torch.testing.assert_close(cache.buffers[name][:, :n], fresh_k.buffers[name][:, :n], atol=1e-5,
                                       rtol=1e-5, msg=lambda m: f"depth {k} cache {name}: {m}")


def test_speculative_errors(trained):
    model, stream = trained
    prompt = _prompt(stream, 0)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(model, prompt.expand(2, -1), 5)
    for bad in (0, 3, 1.5):
        with pytest.raises(ValueError, match="n_draft"):
            speculative_generate(model, prompt, 5, n_draft=bad)
    with pytest.raises(ValueError, match="expected 2 token ids"):
        speculative_generate(model, prompt, 5, n_draft=2, draft=lambda t, n: [1])
    with pytest.raises(ValueError, match="expected 1 token ids"):
        speculative_generate(model, prompt, 5, n_draft=1, draft=lambda t, n: [model.cfg.vocab_size])
    with pytest.raises(ValueError, match="MTP"):
        speculative_generate(Transformer(get_preset("tiny").replace(n_mtp_depth=0)), prompt, 5)
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(model, prompt, model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, prompt, -1)
    with pytest.raises(ValueError, match="at least one"):
        speculative_generate(model, prompt[:0], 3)
    assert model.training is False
