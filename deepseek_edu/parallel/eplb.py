"""Expert-parallel load balancing (EPLB): redundant experts and their placement on GPUs.

DeepSeek-V3 §3.4 (redundant experts in prefill and decode) and DeepSeek's EPLB description. Under
expert parallelism a GPU is as slow as its busiest expert. With measured loads (tokens per expert,
e.g. `expert_loads` of a trained model), EPLB

1. **replicates** the heaviest experts: `num_redundant` extra slots, each given in turn to the expert
   with the largest load per replica (a replica takes an equal share of its expert's tokens);
2. **packs** the replicas onto GPUs, each GPU holding the same number of slots, greedily: heaviest
   replica first, into the least loaded GPU that still has a free slot (`balanced_packing`).

Two policies:

- **hierarchical** (prefill, fewer larger EP groups): expert *groups* are packed onto nodes first (so
  group-limited routing keeps a token's traffic within few nodes), then experts are replicated
  within each node and packed onto that node's GPUs; every replica stays on its group's node;
- **global** (decode, large EP): replicate over all experts and pack onto all GPUs, ignoring groups.

A placement is (G, slots) logical expert ids, one row per GPU. Its GPU loads: each replica carries
load[e] / replicas[e].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def replicate(load: Tensor, n_slots: int) -> Tensor:
    """Replica count per expert: load (E,) -> (E,) int64 summing to n_slots, each >= 1.

    Each extra slot goes to the expert with the largest load per replica (ties: lower id).
    Raises: ValueError if n_slots < E.
    """
    E = load.numel()
    if n_slots < E:
        raise ValueError(f"{n_slots} slots cannot hold {E} experts once each")
    counts = torch.ones(E, dtype=torch.int64)
    load = load.double()
    for _ in range(n_slots - E):
        counts[int(torch.argmax(load / counts))] += 1  # argmax returns the first maximum
    return counts


def balanced_packing(weights: Tensor, n_packs: int) -> Tensor:
    """Greedy packing of N items into n_packs packs of N / n_packs items each.

    Heaviest item first (ties: lower index), into the lightest pack that is not full (ties: lower pack).
    Args: weights (N,). Returns: pack (N,) int64, the pack of each item.
    Raises: ValueError if n_packs does not divide N.
    """
    N = weights.numel()
    if n_packs < 1 or N % n_packs:
        raise ValueError(f"{N} items cannot be split evenly into {n_packs} packs")
    per = N // n_packs
    pack = torch.empty(N, dtype=torch.int64)
    loads, sizes = [0.0] * n_packs, [0] * n_packs
    for i in sorted(range(N), key=lambda j: (-float(weights[j]), j)):
        p = min((q for q in range(n_packs) if sizes[q] < per), key=lambda q: (loads[q], q))
        pack[i] = p
        loads[p] += float(weights[i])
        sizes[p] += 1
    return pack


def _place(experts: list[int], load: Tensor, n_slots: int, n_gpus: int) -> list[list[int]]:
    """Replicate `experts` (logical ids) into n_slots and pack them onto n_gpus: rows of expert ids."""
    counts = replicate(load[experts], n_slots)
    replicas = [e for e, c in zip(experts, counts.tolist()) for _ in range(c)]
    share = torch.tensor([float(load[e]) / int(counts[experts.index(e)]) for e in replicas])
    pack = balanced_packing(share, n_gpus)
    return [[replicas[i] for i in range(len(replicas)) if pack[i] == g] for g in range(n_gpus)]


def _check(load: Tensor, num_redundant: int, n_gpus: int) -> int:
    E = load.numel()
    if num_redundant < 0 or n_gpus < 1 or (E + num_redundant) % n_gpus:
        raise ValueError(f"{E} experts + {num_redundant} redundant must divide evenly over {n_gpus} GPUs")
    return (E + num_redundant) // n_gpus


def global_placement(load: Tensor, num_redundant: int, n_gpus: int) -> Tensor:
    """Decode policy: (E,) loads -> (n_gpus, slots) expert ids; slots = (E + num_redundant) / n_gpus.

    Raises: ValueError if the slots do not divide evenly.
    """
    _check(load, num_redundant, n_gpus)
    return torch.tensor(_place(list(range(load.numel())), load, load.numel() + num_redundant, n_gpus))


def hierarchical_placement(load: Tensor, num_redundant: int, n_groups: int, n_nodes: int,
                           gpus_per_node: int) -> Tensor:
    """Prefill policy: groups -> nodes -> GPUs. Returns (n_nodes * gpus_per_node, slots) expert ids.

    Expert groups are the contiguous blocks of E / n_groups experts (as in the gate). Each node gets
    n_groups / n_nodes groups (balanced by group load) and num_redundant / n_nodes extra slots.
    Raises: ValueError if groups, nodes, redundant slots or GPUs do not divide evenly.
    """
    E = load.numel()
    n_gpus = n_nodes * gpus_per_node
    _check(load, num_redundant, n_gpus)
    if E % n_groups or n_groups % n_nodes or num_redundant % n_nodes:
        raise ValueError(f"E={E}, n_groups={n_groups}, num_redundant={num_redundant} must divide evenly over "
                         f"{n_nodes} nodes")
    per_group = E // n_groups
    group_node = balanced_packing(load.view(n_groups, per_group).sum(1), n_nodes)  # (n_groups,)
    rows = []
    for node in range(n_nodes):
        experts = [g * per_group + j for g in range(n_groups) if group_node[g] == node for j in range(per_group)]
        rows += _place(experts, load, len(experts) + num_redundant // n_nodes, gpus_per_node)
    return torch.tensor(rows)


def gpu_loads(placement: Tensor, load: Tensor) -> Tensor:
    """(G, slots) expert ids and (E,) loads -> (G,) tokens per GPU, each replica taking an equal share."""
    replicas = torch.bincount(placement.flatten(), minlength=load.numel()).double()
    return (load.double() / replicas)[placement].sum(1)


def imbalance(gpu_load: Tensor) -> float:
    """max / mean of the GPU loads: 1.0 is perfect balance."""
    return float(gpu_load.max() / gpu_load.mean())


@torch.no_grad()
def expert_loads(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """Tokens routed to each expert by every MoE layer of `model` on tokens (B, S): list of (E,) float.

    Reads `MoEOutput.load` through forward hooks (the model in eval mode does not count).
    """
    from ..moe import MoE

    loads: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: loads.append(out.load.clone()))
             for m in model.modules() if isinstance(m, MoE)]
    try:
        model.eval()
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return loads
