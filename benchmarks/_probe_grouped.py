import torch, sys
torch.manual_seed(0)
dev = "cuda"
E, T, D, m = 16, 32768, 512, 512
x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
g = torch.randn(T, m, device=dev, dtype=torch.bfloat16)
w = torch.randn(E, m, D, device=dev, dtype=torch.bfloat16)  # (E, m, D) like nn.Linear weights
counts = torch.full((E,), T // E, device=dev)
counts[0] += 300; counts[1] -= 300
offs = counts.cumsum(0).to(torch.int32)
wd = torch.randn(D, m, device=dev, dtype=torch.bfloat16)

def t(fn, n=50):
    for _ in range(5): fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize(); s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1e3

flop = 2 * T * D * m
cases = {
  "fwd x@w^T (b = w.transpose)": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs),
  "fwd x@w^T (b contiguous (E,D,m))": (lambda wt=w.transpose(1, 2).contiguous(): torch._grouped_mm(x, wt, offs=offs)),
  "grad_a g@w": lambda: torch._grouped_mm(g, w, offs=offs),
  "grad_b x^T@g (a = x.t() view)": lambda: torch._grouped_mm(x.t(), g, offs=offs),
  "grad_b g^T@x (a = g.t() view)": lambda: torch._grouped_mm(g.t(), x, offs=offs),
  "grad_b x^T contiguous @ g": (lambda xt=x.t().contiguous(): torch._grouped_mm(xt, g, offs=offs)),
  "grad_b x^T @ g contiguous-T": (lambda xt=x.t().contiguous(), gt=g.t().contiguous(): torch._grouped_mm(xt, gt.t(), offs=offs)),
  "dense mm x@wd": lambda: x @ wd,
  "dense mm x^T@g": lambda: x.t() @ g,
}
for name, fn in cases.items():
    try:
        us = t(fn)
        print(f"{name:40s} {us:8.1f} us  {flop / us / 1e6:7.1f} TFLOP/s")
    except Exception as exc:
        print(f"{name:40s} failed {type(exc).__name__}: {str(exc)[:150]}")
# autograd path as the layer does it
xr = x.clone().requires_grad_(); wr = w.clone().requires_grad_()
def fb():
    y = torch._grouped_mm(xr, wr.transpose(1, 2), offs=offs); y.backward(g)
print("autograd fwd+bwd", t(fb, 20))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
    fb(); torch.cuda.synchronize()
for e in p.key_averages():
    if e.self_device_time_total > 0: print(f"  {e.self_device_time_total:8.1f} us  {e.key[:200]}")
