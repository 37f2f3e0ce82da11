"""Time of torch.linalg.eigh in float64 and float32 on damped Gram matrices (2 threads), for ALPS's
eigh_dtype option (docs/results/scaling.md).

    python benchmarks/eigh.py
"""
import torch, time
torch.set_num_threads(2)
for n in (2048, 4096):
    X = torch.randn(n, 2*n); H = X @ X.T / (2*n); H += 0.01*torch.eye(n)
    for dt in (torch.float64, torch.float32):
        A = H.to(dt); t=time.perf_counter(); torch.linalg.eigh(A); print(n, dt, round(time.perf_counter()-t,2), flush=True)
