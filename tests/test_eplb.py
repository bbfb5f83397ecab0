"""EPLB placement invariants on hand-made and random loads: every expert placed at least once, the
replica counts sum to the slots, every GPU holds exactly its slots, the hierarchical policy keeps every
replica on its group's node; replication follows the heaviest load per replica; the imbalance never
gets worse than one replica per expert packed the same way; bad layouts give named errors."""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.parallel.eplb import (
    balanced_packing,
    expert_loads,
    global_placement,
    gpu_loads,
    hierarchical_placement,
    imbalance,
    replicate,
)


def test_replicate_gives_extra_slots_to_the_heaviest_per_replica():
    assert replicate(torch.tensor([10.0, 2, 2, 2]), 6).tolist() == [3, 1, 1, 1]
    assert replicate(torch.tensor([10.0, 6, 1, 1]), 6).tolist() == [2, 2, 1, 1]  # 10/2 = 5 < 6
    with pytest.raises(ValueError, match="slots"):
        replicate(torch.ones(4), 3)


def test_balanced_packing_hand_case():
    pack = balanced_packing(torch.tensor([5.0, 4, 3, 3, 2, 1]), 2)
    loads = [sum(w for w, p in zip([5, 4, 3, 3, 2, 1], pack.tolist()) if p == q) for q in range(2)]
    assert sorted(loads) == [9, 9] and pack.bincount().tolist() == [3, 3]
    with pytest.raises(ValueError, match="evenly"):
        balanced_packing(torch.ones(5), 2)


def _invariants(placement, load, slots, n_gpus):
    E = load.numel()
    assert placement.shape == (n_gpus, slots)
    counts = torch.bincount(placement.flatten(), minlength=E)
    assert counts.numel() == E and (counts >= 1).all() and counts.sum() == n_gpus * slots
    assert torch.isclose(gpu_loads(placement, load).sum(), load.double().sum())


@pytest.mark.parametrize("seed", range(5))
def test_policies_keep_the_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    load = torch.rand(32, generator=g) ** 3 * 100 + 1  # skewed
    glob = global_placement(load, 8, 8)
    _invariants(glob, load, 5, 8)
    hier = hierarchical_placement(load, 8, n_groups=8, n_nodes=2, gpus_per_node=4)
    _invariants(hier, load, 5, 8)
    for node in range(2):  # group locality: a group's experts all on one node
        node_experts = set(hier[node * 4:(node + 1) * 4].flatten().tolist())
        for grp in range(8):
            members = set(range(grp * 4, grp * 4 + 4))
            assert members <= node_experts or not (members & node_experts)
    base = torch.arange(32).view(8, 4)  # no redundancy, contiguous blocks
    assert imbalance(gpu_loads(glob, load)) <= imbalance(gpu_loads(base, load)) + 1e-12


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="divide"):
        global_placement(torch.ones(32), 7, 8)
    with pytest.raises(ValueError, match="nodes"):
        hierarchical_placement(torch.ones(32), 8, n_groups=3, n_nodes=2, gpus_per_node=4)


def test_expert_loads_of_a_model():
    from deepseek_edu.config import get_preset
    from deepseek_edu.model import Transformer

    torch.manual_seed(0)
    cfg = get_preset("moe-tiny").replace(vocab_size=64, dim=32, n_heads=2, inter_dim=64, moe_inter_dim=16)
    model = Transformer(cfg)
    loads = expert_loads(model, torch.randint(0, 64, (2, 16)))
    assert len(loads) == len(list(model.moe_layers()))
    assert all(l.shape == (cfg.n_routed_experts,) and l.sum() == 2 * 16 * cfg.n_activated_experts for l in loads)
