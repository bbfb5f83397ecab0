"""Multi-Token Prediction (MTP): DeepSeek-V3 §2.2, the survey's §III-C.

The main model predicts the next token t_{i+1} from position i. V3 adds D sequential **MTP modules**;
module k (k = 1..D) predicts the token k steps further, t_{i+k+1}, keeping the *causal chain*: it
starts from the representation h^{k-1}_i of the depth before it (h^0 = the main model's last hidden
state) and the embedding of the token it may now look at, t_{i+k}:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      eh_proj: (2D -> D)
    h^k    = Block_k(h'^k)                                          one Transformer block
    P^k    = OutHead(RMSNorm(h^k))                                  logits for t_{i+k+1}

The embedding `Emb` and the output head `OutHead` are the main model's own tensors (shared, not
copied): an MTP module owns only `enorm`, `hnorm`, `eh_proj`, `block` and `norm`. So they are *not*
submodules here; `MTPModule.forward` takes them as arguments (a duplicate registration would put the
same storage under two names in the state dict, which safetensors refuses).

**Concatenation order.** The paper's equation writes [h ; Emb]. DeepSeek's released V3 weights
(`model.layers.61.eh_proj.weight`, read by vLLM and SGLang) expect **[enorm(Emb) ; hnorm(h)]**,
embedding first, and so does this module, so that those weights load as they are.

**Which h^0.** We feed the main model's last block output *before* its final norm
(`ModelOutput.hidden`). Inference engines that take the hidden state after the final norm differ only
by that norm's per-channel gain, which `hnorm` re-normalises; the choice is a convention.

**Positions and targets** (pitfalls kind E). For input tokens t_0..t_{S-1} and the usual next-token
targets y (y_i = t_{i+1}, i = 0..S-1), depth k runs on the S - k positions i = 0..S-k-1 (position i
needs t_{i+k}, the last input token is t_{S-1}) and its targets are y[:, k:] = t_{k+1}..t_S. Nothing
wraps around: the last k positions of a window simply have no depth-k prediction (`torch.roll` here
would ask position S-1 to predict t_0). The rotary position of depth k's position i is i.

**Loss.** L_MTP = (λ / D) Σ_k CE_k, λ = `mtp_loss_weight` (V3: 0.3 for the first 10T tokens, then
0.1), added to the main loss; each CE_k is logged on its own (`mtp_loss_terms`).

**At inference** the modules can be dropped: the main model's logits do not depend on them. Or they
can propose draft tokens for speculative decoding (`generate.speculative_generate`, V3 §5.4.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache
from .block import Block
from .config import ModelConfig
from .moe import MoEOutput
from .norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth k: combine h^{k-1}_i with Emb(t_{i+k}), one Transformer block, shared head.

    Submodules (DeepSeek's checkpoint names in brackets where they differ): `enorm`, `hnorm`,
    `eh_proj` (Linear 2D -> D, no bias), `block` (a `Block` with layer_id n_layers + k - 1, so its FFN
    is DeepSeekMoE when the model uses MoE, as V3's layer 61), `norm` [`shared_head.norm`].

    Args:
        cfg: the main model's config.
        depth: k in 1..cfg.n_mtp_depth.
    Raises:
        ValueError: if depth is not in [1, n_mtp_depth].
    """

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        if not 1 <= depth <= cfg.n_mtp_depth:
            raise ValueError(f"MTP depth={depth} must be in [1, n_mtp_depth={cfg.n_mtp_depth}]")
        self.depth = depth
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg.n_layers + depth - 1, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: Tensor, tokens: Tensor, embed: nn.Embedding, head: nn.Linear, freqs_cis: Tensor,
                cache: KVCache | None = None,
                attn_impl: str | None = None) -> tuple[Tensor, Tensor, MoEOutput | None]:
        """Depth k on S' positions.

        Args:
            h_prev: (B, S', D) h^{k-1} at positions i..i+S'-1 (the main model's `hidden` for k = 1).
            tokens: (B, S') integer ids t_{i+k}..t_{i+k+S'-1}: for each position, the token k ahead.
            embed, head: the main model's embedding and output head (shared, never copied).
            freqs_cis: (S', R/2) rotary factors of positions i..i+S'-1.
            cache: this depth's KV cache (decoding), or None.
            attn_impl: MLA only, see `MLA.forward`.
        Returns:
            h (B, S', D) = h^k, logits (B, S', V) fp32 for t_{i+k+1}.., and the block's `MoEOutput`
            (None for a dense FFN).
        Raises:
            ValueError: if h_prev and tokens disagree in (B, S').
        """
        if h_prev.shape[:2] != tokens.shape:
            raise ValueError(f"MTP depth {self.depth}: h_prev {tuple(h_prev.shape)} and tokens {tuple(tokens.shape)} "
                             f"must agree in (B, S)")
        e = embed(tokens.long())  # (B, S', D)
        # Embedding first: the layout of DeepSeek's released eh_proj weights (the paper writes h first).
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h_prev).to(e.dtype)], dim=-1))  # (B, S', 2D) -> (B, S', D)
        h, moe = self.block(x, freqs_cis, cache, attn_impl)  # (B, S', D)
        logits = head(self.norm(h)).float()  # (B, S', V)
        return h, logits, moe


def mtp_targets(targets: Tensor, depth: int) -> Tensor:
    """Targets of depth k: ``targets[:, k:]``, never wrapped around.

    Args:
        targets: (B, S) int64 next-token targets of inputs t_0..t_{S-1} (targets[:, i] = t_{i+1}).
        depth: k >= 1.
    Returns:
        (B, S - k): position i's target is t_{i+k+1}.
    Raises:
        ValueError: if depth < 1 or depth >= S (no position left).
    """
    if targets.dim() != 2:
        raise ValueError(f"targets must be (B, S), got shape {tuple(targets.shape)}")
    if not 1 <= depth < targets.shape[1]:
        raise ValueError(f"MTP depth={depth} needs 1 <= depth < S={targets.shape[1]} (a window of S tokens "
                         f"has S - depth positions at depth {depth})")
    return targets[:, depth:]


def mtp_loss_terms(mtp_logits: list[Tensor], targets: Tensor) -> list[Tensor]:
    """Unweighted cross-entropy of each depth, CE_1..CE_D (fp32, nats/token).

    Args:
        mtp_logits: D tensors, depth k's of shape (B, S - k, V).
        targets: (B, S) next-token targets of the main head.
    Returns:
        D () fp32 tensors.
    Raises:
        ValueError: if a depth's logits do not have (B, S - k) positions.
    """
    terms = []
    for k, logits in enumerate(mtp_logits, start=1):
        y = mtp_targets(targets, k)  # (B, S-k)
        if logits.shape[:-1] != y.shape:
            raise ValueError(f"MTP depth {k}: logits {tuple(logits.shape)} do not match its targets "
                             f"{tuple(y.shape)} in (B, S - {k})")
        V = logits.shape[-1]
        terms.append(F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1)))  # (B*(S-k), V) -> ()
    return terms


def mtp_loss(mtp_logits: list[Tensor], targets: Tensor, weight: float) -> Tensor:
    """L_MTP = (λ / D) Σ_k CE_k (DeepSeek-V3 eq. 25); 0 when there are no depths.

    Args:
        mtp_logits, targets: see `mtp_loss_terms`.
        weight: λ = `mtp_loss_weight`.
    Returns:
        () fp32.
    """
    terms = mtp_loss_terms(mtp_logits, targets)
    if not terms:
        return targets.new_zeros((), dtype=torch.float32)
    return weight / len(terms) * torch.stack(terms).sum()
