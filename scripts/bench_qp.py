#!/usr/bin/env python
"""Throughput of emonb.qp's batched simplex-QP solvers (solves per second), printed, never asserted.

Problems: Q = G Gᵀ from Gaussian per-level gradients G (B, q, q + 5), losses f ~ U(0, 3) — CocoER's competition step.
Rows: q = 3 exact (face enumeration), q = 3 iterative, q = 8 iterative, each for batches of 64 and 4,096 problems;
against a reference solver called per problem in a Python loop (quadprog if installed, SciPy SLSQP always) and against
a batched MGDA-style Frank–Wolfe loop (with the number of iterations it needs to reach a duality gap of 1e-6; its
solves/s count the time to converge or to hit --fw-max-iter, whichever comes first).

    python scripts/bench_qp.py                    # CPU, well under a minute
    python scripts/bench_qp.py --device cuda      # GPU (synchronised timings)
    python scripts/bench_qp.py --threads 1        # torch CPU threads (tiny tensors: 1 is often fastest)
"""
from __future__ import annotations
import argparse, time
import numpy as np
import torch
from emonb.qp import solve_simplex_qp, simplex_qp_objective, frank_wolfe_simplex_qp
from emonb.testing import random_simplex_qps, slsqp_simplex_qp

def problems(B, q, device, seed=0):
    Q, f = random_simplex_qps(B, q, q + 5, generator=torch.Generator().manual_seed(seed))
    return Q.to(device), f.to(device)

def timed(fn, device, min_time=0.3, max_reps=50):
    "Best seconds per call after a warm-up (repeated until `min_time` has passed)."
    def sync():
        if device.type == 'cuda': torch.cuda.synchronize()
    fn(); sync()
    best, total, reps = float('inf'), 0., 0
    while (total < min_time and reps < max_reps) or reps < 2:
        t = time.perf_counter(); out = fn(); sync(); dt = time.perf_counter() - t
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best

def timed_once(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

def quadprog_loop(Q, f):
    import quadprog
    n = f.shape[1]
    C, b0 = np.concatenate([np.ones((n, 1)), np.eye(n)], 1), np.r_[1., np.zeros(n)]
    return np.stack([quadprog.solve_qp(Q[b], f[b], C, b0, 1)[0] for b in range(len(f))])

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    p.add_argument('--batches', type=int, nargs='+', default=[64, 4096])
    p.add_argument('--ref-problems', type=int, default=200, help='problems timed for the per-problem reference loops')
    p.add_argument('--fw-max-iter', type=int, default=2000)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    print(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == 'cuda' else f", {torch.get_num_threads()} torch threads")
          + f", torch {torch.__version__}; solves per second (higher is better)")
    print(f"{'solver':34s} {'q':>2s} {'batch':>6s} {'solves/s':>12s}  notes")
    rows = [('emonb exact (faces)', 3, 'exact'), ('emonb iterative (FISTA+polish)', 3, 'iterative'),
            ('emonb iterative (FISTA+polish)', 8, 'iterative')]
    for B in a.batches:
        for name, q, method in rows:
            Q, f = problems(B, q, dev)
            t = timed(lambda: solve_simplex_qp(Q, f, method=method), dev)
            _, info = solve_simplex_qp(Q, f, method=method, return_info=True)
            it = info['iterations'].float()
            note = '' if method == 'exact' else f"iterations mean {it.mean():.1f}, max {it.max():.0f}; certified exact {info['exact'].float().mean():.1%}"
            print(f"{name:34s} {q:2d} {B:6d} {B / t:12,.0f}  {note}")
    # references, one problem at a time (timed on --ref-problems problems)
    for q in (3, 8):
        Q, f = problems(a.ref_problems, q, torch.device('cpu'))
        Qn, fn = Q.numpy(), f.numpy()
        ours = solve_simplex_qp(Q, f)
        for name, fn_loop in (('quadprog loop (per problem)', quadprog_loop), ('SciPy SLSQP loop (per problem)', slsqp_simplex_qp)):
            try: ref = fn_loop(Qn, fn)
            except ImportError: print(f"{name:34s} {q:2d}      -            -  (not installed)"); continue
            t = min(timed_once(lambda: fn_loop(Qn, fn)) for _ in range(3))
            d = (simplex_qp_objective(Q, f, ours) - simplex_qp_objective(Q, f, torch.as_tensor(ref))).abs().max().item()
            print(f"{name:34s} {q:2d} {'-':>6s} {a.ref_problems / t:12,.0f}  max |objective − emonb| = {d:.1e}")
    # MGDA-style Frank–Wolfe, batched
    for B in a.batches:
        for q in (3, 8):
            Q, f = problems(B, q, dev)
            t = time.perf_counter(); lam, info = frank_wolfe_simplex_qp(Q, f, tol=1e-6, max_iter=a.fw_max_iter)
            if dev.type == 'cuda': torch.cuda.synchronize()
            t = time.perf_counter() - t
            it = info['iterations'][info['converged']].float().cpu()
            qs = [f"{x:.0f}" for x in it.quantile(torch.tensor([.5, .9, .99], dtype=it.dtype)).tolist()] if len(it) else ['-'] * 3
            print(f"{'Frank–Wolfe (batched, gap 1e-6)':34s} {q:2d} {B:6d} {B / t:12,.0f}  reached gap ≤ 1e-6: "
                  f"{info['converged'].float().mean().item():.1%} within {a.fw_max_iter:,} iterations; iterations median/90%/99% {'/'.join(qs)}")

if __name__ == '__main__': main()
