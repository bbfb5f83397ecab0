"""Pipeline-parallel schedules: 1F1B, ZB1P, DualPipe and DualPipeV, simulated; 1F1B executed.

DeepSeek-V3 §3.2.1 and Table 2; the zero-bubble paper (Qi et al., 2023) for ZB1P; DeepSeek's
DualPipe repository for DualPipe and its "cut-in-half" V-shaped variant DualPipeV.

Durations (V3 Table 2's notation): F one forward chunk, B one *full* backward chunk, W the part of
B that computes the weight gradient (so "backward for input" takes B - W), F&B a forward and a
backward chunk of two micro-batches overlapped on one rank (DualPipe overlaps one's compute with the
other's all-to-all communication).

How the simulator works: a schedule gives each rank an ordered list of operations
(`Op`: F, B (full), Bi (input part), W, or FB (an overlapped F and B)); `simulate` runs every
rank's list in order, starting each operation as soon as the rank is free and its data has
arrived (the previous stage's F of that micro-batch, the next stage's B), communication taking no
time. From the resulting timeline it *measures*:

- bubble: the idle time of a rank, makespan - busy time, maximised over ranks;
- parameters per rank, in units of one 1F1B stage (PP stages -> 1 each; DualPipe holds 2 stages);
- activations: the peak number of micro-batch chunks whose activations a rank holds (from the
  start of F until the last backward part that needs them), in units of a 1F1B stage's.

Table 2 (with PP ranks): 1F1B (PP-1)(F+B), 1x, PP; ZB1P (PP-1)(F+B-2W), 1x, PP;
DualPipe (PP/2-1)(F&B+B-3W), 2x, PP+1; DualPipeV the same bubble and activations with 1x.
(DualPipeV folds PP stages in a V onto PP/2 devices, two stages each: 2x a stage's parameters per
device, which is 1x of what each of its PP/2 devices holds under 1F1B over the same devices.)
`tests/test_pipeline.py` checks the measured numbers equal these, exactly (fractions), for
PP in {4, 8, 16} and several F/B/W ratios, inside the region where the formulas are exact (the
timeline says so, and outside it the simulator gives the true bubble the formula misses):
ZB1P needs W <= F and W <= B - W (the zero-bubble paper's ZB-H1 conditions); DualPipe and
DualPipeV need B - W = F (a backward-for-input as long as a forward, as in the paper's figure),
W <= F and F&B >= max(F, B).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    """One operation of a rank. kind: "F" | "B" | "Bi" | "W" | "FB"; f and b: (path, position, micro-batch)
    of the forward and backward part ("FB" has both; F only f; B, Bi and W only b)."""

    kind: str
    f: tuple[int, int, int] | None = None
    b: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Event:
    """One bar of the timeline: rank, start, end, kind, micro-batch (for "FB": the forward's)."""

    rank: int
    start: Fraction
    end: Fraction
    kind: str
    microbatch: int


# --- schedules: the order of operations on every rank --------------------------------------------


def order_1f1b(pp: int, m: int, split_w: bool = False, w_lag: bool = False) -> list[list[Op]]:
    """1F1B (PipeDream-flush): rank r does PP-1-r warm-up forwards, then alternates F and B.

    With `split_w` the backward is Bi then W. With `w_lag` (ZB1P, the zero-bubble paper's ZB-H1)
    rank r runs each W r micro-batches late and the last r of them at the end, filling the
    cool-down bubble while holding no more activations than 1F1B.
    """
    ranks = []
    for r in range(pp):
        ops, lag, pending = [], (r if w_lag else 0), []
        warm = min(pp - 1 - r, m)
        fwd = [Op("F", f=(0, r, j)) for j in range(m)]
        ops += fwd[:warm]
        for j in range(m):
            if warm + j < m:
                ops.append(fwd[warm + j])
            if not split_w:
                ops.append(Op("B", b=(0, r, j)))
                continue
            ops.append(Op("Bi", b=(0, r, j)))
            pending.append(Op("W", b=(0, r, j)))
            if len(pending) > lag:
                ops.append(pending.pop(0))
        ranks.append(ops + pending)
    return ranks


def order_dualpipe(pp: int, m: int, v_shape: bool = False) -> list[list[Op]]:
    """DualPipe (two directions, m/2 micro-batches each) or DualPipeV (one V-shaped path), per rank.

    The eight steps of DeepSeek's DualPipe schedule, written from its description: warm-up
    forwards of the near phase, then both phases, zero-bubble backwards, the main loop of
    overlapped F&B pairs, and the cool-down of backwards and deferred weight gradients.
    DualPipe: rank r holds stage r of path 0 and stage PP-1-r of path 1; its "phase 0" is the
    path that starts nearer to it; n = PP/2 and h = min(r, PP-1-r); m/2 micro-batches per path.
    DualPipeV: PP ranks, 2 PP chunks in a V (rank r holds chunks r and 2PP-1-r of one path);
    n = PP, h = r, m micro-batches.
    """
    return [_dualpipe_rank(r, pp, m, v_shape) for r in range(pp)]


def _dualpipe_rank(r: int, pp: int, m: int, v_shape: bool) -> list[Op]:
    """The operation order of rank r of `order_dualpipe`."""
    if v_shape:
        n, h, chunks = pp, r, m
        where = {0: (0, r), 1: (0, 2 * pp - 1 - r)}  # phase -> (path, position)
    else:
        n, h, chunks = pp // 2, min(r, pp - 1 - r), m // 2
        near = 0 if r < pp // 2 else 1
        where = {0: (near, r if near == 0 else pp - 1 - r), 1: (1 - near, r if near == 1 else pp - 1 - r)}
    nxt_f, nxt_b = [0, 0], [0, 0]
    ops: list[Op] = []
    w_queue: list[Op] = []

    def f(phase):
        key = (*where[phase], nxt_f[phase])
        nxt_f[phase] += 1
        return key

    def b(phase):
        key = (*where[phase], nxt_b[phase])
        nxt_b[phase] += 1
        return key

    def fwd(phase):
        ops.append(Op("F", f=f(phase)))

    def bwd(phase, zb=False):
        key = b(phase)
        if zb:
            ops.append(Op("Bi", b=key))
            w_queue.append(Op("W", b=key))
        else:
            ops.append(Op("B", b=key))

    def weight():
        ops.append(w_queue.pop(0))

    def fb(f_phase, b_phase):
        ops.append(Op("FB", f=f(f_phase), b=b(b_phase)))

    for _ in range((n - h - 1) * 2):  # 1: nF0
        fwd(0)
    for _ in range(h + 1):  # 2: nF0F1
        fwd(0)
        fwd(1)
    for _ in range(n - h - 1):  # 3: nB1W1F1, zero bubble
        bwd(1, zb=True)
        weight()
        fwd(1)
    for i in range(chunks - 2 * n + h + 1):  # 4: main loop nF0B1F1B0
        if i == 0 and h == n - 1:  # the middle ranks do not overlap their first pair
            fwd(0)
            bwd(1)
        else:
            fb(0, 1)
        fb(1, 0)
    for _ in range(n - h - 1):  # 5: nB1F1B0
        bwd(1)
        fb(1, 0)
    zb = False
    for i in range(h + 1):  # 6: nB1B0, the second half zero bubble
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        bwd(1, zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        bwd(0, zb)
    for _ in range(n - h - 1):  # 7: nWB0
        weight()
        bwd(0, zb=True)
    for _ in range(h + 1):  # 8: nW
        weight()
    return ops


# --- simulation ---------------------------------------------------------------------------------


@dataclass
class Timeline:
    """A simulated schedule: events (every bar), and what `simulate` measured from them."""

    schedule: str
    pp: int
    microbatches: int
    events: list[Event]
    bubble: Fraction  # max over ranks of (makespan - busy time)
    parameters: Fraction  # per rank, in units of one 1F1B stage
    activations: int  # peak micro-batch chunks held by one rank
    devices: int  # ranks: PP, except DualPipeV's PP/2

    def as_tuples(self) -> list[tuple[int, float, float, str, int]]:
        """[(rank, start, end, kind, microbatch)] with float times."""
        return [(e.rank, float(e.start), float(e.end), e.kind, e.microbatch) for e in self.events]


def _durations(F, B, W, FB) -> dict[str, Fraction]:
    F, B, W = Fraction(F), Fraction(B), Fraction(W)
    FB = F + B if FB is None else Fraction(FB)
    if not (F > 0 and B > W >= 0 and FB > 0):
        raise ValueError(f"durations need F > 0, B > W >= 0 and F&B > 0; got F={F}, B={B}, W={W}, F&B={FB}")
    return {"F": F, "B": B, "Bi": B - W, "W": W, "FB": FB}


def table2_exact(schedule: str, F=1, B=2, W=1, FB=None) -> bool:
    """Whether the durations lie where Table 2's bubble formula is exact (see the module docstring)."""
    d = _durations(F, B, W, FB)
    if schedule == "zb1p":
        return d["W"] <= d["F"] and d["W"] <= d["Bi"]
    if schedule in ("dualpipe", "dualpipev"):
        return d["Bi"] == d["F"] and d["W"] <= d["F"] and d["FB"] >= max(d["F"], d["B"])
    return True


def simulate(schedule: str, pp: int, microbatches: int, F=1, B=2, W=1, FB=None) -> Timeline:
    """Simulate `schedule` on `pp` ranks with `microbatches` micro-batches.

    Args:
        schedule: one of `SCHEDULES`.
        pp: pipeline ranks (DualPipe: even).
        microbatches: 1F1B/ZB1P: >= 1; DualPipe: even and >= 2 pp; DualPipeV: >= 2 pp.
        F, B, W, FB: durations (ints, floats or Fractions; exact arithmetic in Fractions); B is the
            full backward, W <= B its weight part; FB the overlapped F&B (None = F + B, no overlap).
    Returns:
        `Timeline`. Raises ValueError: unknown schedule, bad sizes or durations, a deadlock.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} must be one of {SCHEDULES}")
    d = _durations(F, B, W, FB)
    if pp < 2 or microbatches < 1:
        raise ValueError(f"need pp >= 2 and microbatches >= 1, got pp={pp}, microbatches={microbatches}")
    if schedule == "dualpipe" and (pp % 2 or microbatches % 2 or microbatches < 2 * pp):
        raise ValueError(f"DualPipe needs an even pp and an even microbatches >= 2 pp; got {pp}, {microbatches}")
    if schedule == "dualpipev" and (pp % 2 or microbatches < pp):
        raise ValueError(f"DualPipeV needs an even pp and microbatches >= pp; got pp={pp}, microbatches={microbatches}")
    path_len = pp  # stages a micro-batch passes through
    if schedule in ("1f1b", "zb1p"):
        orders = order_1f1b(pp, microbatches, split_w=schedule == "zb1p", w_lag=schedule == "zb1p")
    elif schedule == "dualpipe":
        orders = order_dualpipe(pp, microbatches)
    else:  # PP stages folded in a V onto PP/2 devices
        orders = order_dualpipe(pp // 2, microbatches, v_shape=True)
    n_ranks = len(orders)
    f_done: dict[tuple, Fraction] = {}
    b_done: dict[tuple, Fraction] = {}
    free = [Fraction(0)] * n_ranks
    nxt = [0] * n_ranks
    events: list[Event] = []
    alive: list[list[tuple[Fraction, int]]] = [[] for _ in range(n_ranks)]  # (time, +1/-1) per rank

    def ready(op: Op) -> Fraction | None:
        t = Fraction(0)
        deps = []
        if op.f is not None:
            path, pos, mb = op.f
            if pos > 0:
                deps.append(f_done.get((path, pos - 1, mb)))
        if op.b is not None and op.kind != "W":
            path, pos, mb = op.b
            deps.append(f_done.get(op.b))
            if pos < path_len - 1:
                deps.append(b_done.get((path, pos + 1, mb)))
        if op.kind == "W":
            deps.append(b_done.get(op.b))
        for dep in deps:
            if dep is None:
                return None
            t = max(t, dep)
        return t

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(n_ranks):
            while nxt[r] < len(orders[r]):
                op = orders[r][nxt[r]]
                t_dep = ready(op)
                if t_dep is None:
                    break
                start = max(free[r], t_dep)
                end = start + d[op.kind]
                if op.f is not None:
                    f_done[op.f] = end
                    alive[r].append((start, +1))
                if op.b is not None and op.kind != "W":
                    b_done[op.b] = end
                if op.kind in ("B", "FB", "W"):
                    alive[r].append((end, -1))
                mb = op.f[2] if op.f is not None else op.b[2]
                events.append(Event(r, start, end, op.kind, mb))
                free[r], nxt[r] = end, nxt[r] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule {schedule} deadlocks with pp={pp}, microbatches={microbatches}")
    makespan = max(e.end for e in events)
    busy = [sum((e.end - e.start for e in events if e.rank == r), Fraction(0)) for r in range(n_ranks)]
    bubble = max(makespan - b for b in busy)
    chunks_held = [len({op.f[:2] for op in o if op.f is not None}) for o in orders]
    peak = 0
    for r in range(n_ranks):  # releases sort before acquisitions at the same instant
        level = 0
        for _, step in sorted(alive[r], key=lambda ts: (ts[0], ts[1])):
            level += step
            peak = max(peak, level)
    return Timeline(schedule, pp, microbatches, sorted(events, key=lambda e: (e.rank, e.start)),
                    bubble, Fraction(max(chunks_held)), peak, n_ranks)


def table2(schedule: str, pp: int, F=1, B=2, W=1, FB=None) -> dict[str, Fraction]:
    """V3 Table 2's formulas (DualPipeV from the DualPipe repository): bubble, parameters, activations."""
    d = _durations(F, B, W, FB)
    F, B, W, FB = d["F"], d["B"], d["W"], d["FB"]
    if schedule == "1f1b":
        return {"bubble": (pp - 1) * (F + B), "parameters": Fraction(1), "activations": Fraction(pp),
                "devices": Fraction(pp)}
    if schedule == "zb1p":
        return {"bubble": (pp - 1) * (F + B - 2 * W), "parameters": Fraction(1), "activations": Fraction(pp),
                "devices": Fraction(pp)}
    if schedule in ("dualpipe", "dualpipev"):
        return {"bubble": (Fraction(pp, 2) - 1) * (FB + B - 3 * W), "parameters": Fraction(2),
                "activations": Fraction(pp + 1), "devices": Fraction(pp if schedule == "dualpipe" else pp // 2)}
    raise ValueError(f"schedule {schedule!r} must be one of {SCHEDULES}")


# --- execution: 1F1B over torch.distributed -----------------------------------------------------


def make_stack(dim: int, n_layers: int, seed: int = 0):
    """The small model that `run_1f1b` pipelines: n_layers of (Linear, tanh), seeded."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n_layers)])


def run_1f1b(rank: int, world_size: int, dim: int = 16, n_layers: int = 8, batch: int = 12,
             microbatches: int = 6, seed: int = 0) -> dict:
    """Train step of `make_stack` pipelined with 1F1B over the ranks of the default process group (CPU tensors: gloo).

    Rank r holds layers [r L/W, (r+1) L/W); activations go forward by send/recv, their gradients
    backward; every rank runs exactly the operation order of `order_1f1b` (the one simulated).
    Sends are non-blocking (isend), receives blocking: the order is deadlock-free whenever the
    simulation finishes. Loss: mean squared error, averaged over the micro-batches.

    Returns:
        {"grads": {name: grad} of this rank's layers (names of the full model), "loss": the loss
        (last rank; None elsewhere)}.
    Raises:
        ValueError: world_size does not divide n_layers, or microbatches does not divide batch.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    if n_layers % world_size or batch % microbatches:
        raise ValueError(f"n_layers={n_layers} must divide by world_size={world_size} and batch={batch} by "
                         f"microbatches={microbatches}")
    model = make_stack(dim, n_layers, seed)
    per = n_layers // world_size
    stage = model[rank * per:(rank + 1) * per]
    g = torch.Generator().manual_seed(seed + 1)
    x_all, y_all = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    xs, ys = x_all.chunk(microbatches), y_all.chunk(microbatches)
    mb_rows = batch // microbatches
    inputs, outputs, pending, loss_total = {}, {}, [], 0.0
    for op in order_1f1b(world_size, microbatches)[rank]:
        j = (op.f or op.b)[2]
        if op.kind == "F":
            if rank == 0:
                inp = xs[j]
            else:
                inp = torch.empty(mb_rows, dim)
                dist.recv(inp, src=rank - 1)
                inp.requires_grad_()
            out = stage(inp)
            inputs[j] = inp
            if rank == world_size - 1:
                outputs[j] = F.mse_loss(out, ys[j]) / microbatches
                loss_total += outputs[j].item()
            else:
                outputs[j] = out
                pending.append(dist.isend(out.detach(), dst=rank + 1))
        else:  # "B": the full backward of micro-batch j
            if rank == world_size - 1:
                outputs.pop(j).backward()
            else:
                grad = torch.empty(mb_rows, dim)
                dist.recv(grad, src=rank + 1)
                outputs.pop(j).backward(grad)
            inp = inputs.pop(j)
            if rank > 0:
                pending.append(dist.isend(inp.grad, dst=rank - 1))
    for work in pending:
        work.wait()
    grads = {name: p.grad.clone() for name, p in stage.named_parameters()}  # a slice keeps the full names
    return {"grads": grads, "loss": loss_total if rank == world_size - 1 else None}


def reference_grads(dim: int = 16, n_layers: int = 8, batch: int = 12, microbatches: int = 6,
                    seed: int = 0) -> tuple[dict, float]:
    """The same step without a pipeline: the whole model on the whole batch, one backward."""
    import torch
    import torch.nn.functional as F

    model = make_stack(dim, n_layers, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_all, y_all = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    # mean over micro-batches of per-micro-batch MSE = MSE over the batch (equal micro-batches)
    loss = F.mse_loss(model(x_all), y_all)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item()
