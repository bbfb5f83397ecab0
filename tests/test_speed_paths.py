"""The choices made for training speed (benchmarks/README.md, `small` against its dense counterpart)
keep every result, and stay free of what made the step slow.

Checks:
- `moe.expert_counts` (a scatter-add, fixed shape) equals `torch.bincount(minlength=E)`, idle experts
  included;
- `moe.stable_topk` (a stable sort) returns `torch.topk`'s values, its indices where nothing ties, and the
  lower index on a tie (hand case);
- `MoE.update_bias` with nothing routed leaves the bias bitwise unchanged (no host check needed);
- `moe.wgrad_splits`: 4 sub-blocks only for few GEMM tiles on CUDA (`small`'s 16 x 512 x 512), 1 for
  the larger layouts and on CPU; `dispatch.grouped_linear` with splits equals the per-expert matmuls (CPU here;
  the CUDA kernel with empty sub-blocks in the CUDA test below);
- the whole model (MLA with query compression, DeepSeekMoE with group-limited routing and both balance
  losses, MTP) compiles to **one graph**: `torch._dynamo.explain` finds no graph break (a host read
  such as `bincount`'s or `.item()` would be one), on CPU in a bf16 autocast region; eager forwards
  still reject out-of-range ids by name;
- `train.make_optimizer` leaves the CPU default alone (fused only where every parameter is on CUDA);
- on CUDA only (skipped elsewhere): the grouped GEMM with its weight gradient split 4 ways equals per-expert
  fp32 matmuls, experts with 0..3 rows included; the compiled model has no graph break there either
  (the capability check is a compile-time constant); AdamW is fused; and with torch's sync debug
  mode set to "error", an MoE forward, the backward, clipping, AdamW and the bias update never wait
  for the GPU.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.config import ModelConfig, TrainConfig
from deepseek_edu.dispatch import expert_counts, grouped_linear, wgrad_splits
from deepseek_edu.model import Transformer
from deepseek_edu.moe import MoE, stable_topk
from deepseek_edu.train import make_optimizer

CUDA = torch.cuda.is_available()


def _cfg(**kw) -> ModelConfig:
    """2 layers (one dense, one MoE of 8 experts in 4 groups, 2 kept, top-2 + 1 shared), MLA, MTP D=1."""
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32, inter_dim=64, n_dense_layers=1,
                attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16,
                n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", group_score="top2_sum",
                route_scale=2.5, norm_topk_prob=True, bias_update_speed=1e-3, seq_aux_loss_alpha=1e-4,
                expert_aux_loss_alpha=1e-3, n_mtp_depth=1, mtp_loss_weight=0.3)
    return ModelConfig(**(base | kw))


def test_expert_counts_equals_bincount():
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 7, (50, 3), generator=g)  # expert 7 of 8 is never chosen
    counts = expert_counts(indices, 8)
    assert counts.dtype == torch.int64 and counts.shape == (8,)
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=8))
    assert counts[7] == 0 and counts.sum() == 150


def test_topk_helper_matches_torch_topk_and_breaks_ties_to_the_lower_index():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    for k in (1, 2, 5):
        values, indices = stable_topk(x, k)
        ref = x.topk(k, dim=-1)
        assert torch.equal(values, ref.values)
        assert torch.equal(indices, ref.indices)  # continuous random values: no ties
    masked = torch.tensor([[0.1, float("-inf"), 0.7, 0.7, float("-inf"), 0.2]])
    values, indices = stable_topk(masked, 3)
    assert indices.tolist() == [[2, 3, 5]] and torch.equal(values, masked[:, [2, 3, 5]])


def test_update_bias_with_nothing_routed_keeps_the_bias():
    moe = MoE(_cfg())
    with torch.no_grad():
        moe.gate.bias.copy_(torch.linspace(-1, 1, 8))
    before = moe.gate.bias.clone()
    load = moe.update_bias()  # nothing was routed since construction
    assert torch.equal(load, torch.zeros(8)) and torch.equal(moe.gate.bias, before)


def test_wgrad_splits_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wgrad_splits(cuda, 16, 512, 512) == 4  # small: 256 tiles of 128 x 128
    assert wgrad_splits(cuda, 8, 512, 512) == 4  # 128 tiles: still at most 4
    assert wgrad_splits(cuda, 16, 512, 1024) == 2  # 512 tiles
    assert wgrad_splits(cuda, 8, 1024, 2048) == 1  # moe_layer.py's 8-expert layout: 1,024 tiles
    assert wgrad_splits(cuda, 64, 256, 2048) == 1  # fine-grained: 2,048 tiles
    assert wgrad_splits(cuda, 256, 2048, 7168) == 1  # DeepSeek-V3
    assert wgrad_splits(cpu, 16, 512, 512) == 1


def _grouped_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int], g: torch.Tensor):
    """Per-expert fp32 matmuls: y, grad_x, grad_w of sum(y * g)."""
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y = torch.cat([xb @ w[e].T for e, xb in enumerate(x.split(counts))])
    (y * g.double()).sum().backward()
    return y, x.grad, w.grad


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_grouped_linear_with_split_weight_gradient_equals_per_expert_matmuls(splits):
    counts = [0, 9, 1, 2, 3, 0, 14]  # idle experts and experts with fewer rows than splits
    g_ = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), 16, generator=g_, requires_grad=True)
    w = torch.randn(len(counts), 24, 16, generator=g_, requires_grad=True)
    g = torch.randn(sum(counts), 24, generator=g_)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = grouped_linear(x, w, offs, splits)
    (y * g).sum().backward()
    ref_y, ref_gx, ref_gw = _grouped_reference(x, w, counts, g)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, atol=1e-5, rtol=1e-5)
    assert w.grad[0].abs().max() == 0 and w.grad[5].abs().max() == 0  # idle experts: zeros


def _graph_breaks(model: Transformer, tokens: torch.Tensor, device_type: str) -> int:
    torch._dynamo.reset()
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            explained = torch._dynamo.explain(model)(tokens)
    finally:
        torch._dynamo.reset()
    return explained.graph_break_count


def test_whole_model_compiles_to_one_graph_and_eager_still_checks_ids():
    torch.manual_seed(0)
    model = Transformer(_cfg()).train()
    tokens = torch.randint(0, 64, (2, 16))
    assert _graph_breaks(model, tokens, "cpu") == 0
    with pytest.raises(ValueError, match="token id 64 is out of range"):
        model(torch.tensor([[1, 64, 2]]))
    with pytest.raises(ValueError, match="token id -3 is out of range"):
        model(torch.tensor([[1, -3, 70]]))


def test_make_optimizer_is_not_fused_on_cpu():
    opt = make_optimizer(Transformer(_cfg()), TrainConfig())
    assert not opt.defaults.get("fused")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_grouped_linear_split_gradient_and_compiled_model():
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("torch._grouped_mm needs compute capability 9.0")
    counts = [0, 40, 1, 2, 3, 0, 200, 8]  # row counts with 16-byte aligned blocks are not required
    g_ = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), 64, generator=g_).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(len(counts), 128, 64, generator=g_).to(device, torch.bfloat16).requires_grad_()
    g = torch.randn(sum(counts), 128, generator=g_).to(device, torch.bfloat16)
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    ref_y, ref_gx, ref_gw = _grouped_reference(x, w, counts, g)
    for splits in (1, 4):
        x.grad = w.grad = None
        y = grouped_linear(x, w, offs, splits)
        (y * g).sum().backward()
        for got, ref, what in ((y, ref_y, "y"), (x.grad, ref_gx, "grad_x"), (w.grad, ref_gw, "grad_w")):
            scale = ref.abs().max()
            err = float((got.detach().double() - ref).abs().max() / scale)
            assert err < 2e-2, f"splits={splits}: {what} off by {err:.3g} of its largest value"
        assert w.grad[0].abs().max() == 0 and w.grad[5].abs().max() == 0, "idle experts: zero gradient"
    model = Transformer(_cfg(dim=64, moe_inter_dim=64, inter_dim=128)).to(device).train()
    tokens = torch.randint(0, 64, (2, 16), device=device)
    assert _graph_breaks(model, tokens, "cuda") == 0
    opt = make_optimizer(model, TrainConfig())
    assert opt.defaults["fused"] is True
    # No host synchronisation in an MoE layer's forward, the backward, AdamW or the bias update
    # (the eager id check before the forward is the one read the step makes).
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens)
        moe = model.moe_layers()[0]
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(torch.randn(2, 16, 64, device=device))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("error")
    try:
        (out.logits.float().square().mean() + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_biases()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gate_breaks_exact_ties_to_the_lower_index():
    # One token whose logits tie exactly (equal logits, equal sigmoid scores): experts 0 and 1 tie for
    # the top, groups 1 and 2 tie for the second kept group (each scores s(1) + s(0)). The lower index
    # wins every tie: groups {0, 1} kept, experts 0, 1, then 2 from group 1 (not 4 from group 2).
    from deepseek_edu.moe import Gate

    cfg = _cfg(n_activated_experts=3)
    gate = Gate(cfg)
    logits = torch.tensor([3.0, 3.0, 1.0, 0.0, 1.0, 0.0, -1.0, -1.0])  # (E,)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits
    x = torch.zeros(1, cfg.dim)
    x[0, 0] = 1.0
    routing = gate(x)
    assert routing.indices.tolist() == [[0, 1, 2]]
    s = logits.sigmoid()
    expected = s[[0, 1, 2]] / s[[0, 1, 2]].sum() * cfg.route_scale
    torch.testing.assert_close(routing.weights[0], expected)


def test_expert_counts_takes_int32_ids():
    ids = torch.tensor([[0, 3], [3, 1]], dtype=torch.int32)
    assert expert_counts(ids, 5).tolist() == [1, 1, 0, 2, 0]


def test_resume_keeps_the_optimizer_implementation(tmp_path):
    # A checkpoint's param_groups hold `fused`; the optimizer it is loaded into keeps its own
    # (make_optimizer's choice for its device), so a CPU run resumed on CUDA steps fused.
    from deepseek_edu.checkpoint import load_checkpoint, save_checkpoint

    cfg = _cfg()
    model = Transformer(cfg).train()
    opt = make_optimizer(model, TrainConfig())
    out = model(torch.randint(0, 64, (2, 16)))
    (out.logits.square().mean() + out.aux_loss).backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, opt)
    model2 = Transformer(cfg)
    opt2 = make_optimizer(model2, TrainConfig())
    for group in opt2.param_groups:  # what make_optimizer picks on CUDA (torch has a CPU fused AdamW too)
        group["fused"], group["foreach"] = True, None
    load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    assert all(group["fused"] is True for group in opt2.param_groups)
    out = model2(torch.randint(0, 64, (2, 16)))
    (out.logits.square().mean() + out.aux_loss).backward()
    opt2.step()
