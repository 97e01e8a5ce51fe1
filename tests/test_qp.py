"""emonb.qp against independent references on thousands of random and degenerate simplex QPs.

References: `quadprog` (Goldfarb–Idnani dual active set, one problem at a time; skipped if not installed) and a
vectorised numpy check of the KKT conditions that shares no code with the solver
(`emonb.testing`, which also draws the problems). Objectives must agree to 1e-6 (relative to the problem's scale)
everywhere; λ must agree to 1e-6 where the optimum is unique (Q positive definite).
"""
import warnings
import numpy as np
import pytest
import torch
from emonb.qp import (solve_simplex_qp, simplex_qp_objective, simplex_qp_gap, project_to_simplex, gram_qp,
                      frank_wolfe_simplex_qp)
from emonb.testing import random_simplex_qps, simplex_qp_scale, simplex_qp_kkt_violation

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny models: one thread (conftest), restored afterwards

METHODS = {2: ('exact', 'iterative'), 3: ('exact', 'iterative'), 4: ('exact', 'iterative'), 6: ('exact', 'iterative'), 8: ('iterative',)}

def reference(Q, f, mask, ridge=0.):
    "quadprog, one problem at a time, on the present levels; `ridge` (relative to the scale) makes a singular Q definite."
    quadprog = pytest.importorskip('quadprog')
    Q, f, mask = np.asarray(Q, np.float64), np.asarray(f, np.float64), np.asarray(mask, bool)
    out = np.zeros_like(f)
    for b in range(len(f)):
        idx = np.flatnonzero(mask[b]); n = len(idx)
        A = Q[b][np.ix_(idx, idx)]; A = (A + A.T) / 2
        c = f[b][idx]
        s = max(np.abs(A).max(), np.abs(c - c.mean()).max()) or 1.     # the problem's scale
        C = np.concatenate([np.ones((n, 1)), np.eye(n)], 1)
        x = quadprog.solve_qp(A + ridge * s * np.eye(n), c, C, np.r_[1., np.zeros(n)], 1)[0]
        out[b, idx] = x
    return out

def compare(Q, f, mask, lam, ref, unique, obj_tol=1e-6, lam_tol=1e-6):
    Qn, fn, mn = Q.numpy(), f.numpy(), mask.numpy()
    s = simplex_qp_scale(Qn, fn, mn)
    o, o_ref = (simplex_qp_objective(Q, f, torch.as_tensor(l, dtype=torch.float64), mask).numpy() for l in (lam, ref))
    assert np.isfinite(lam.numpy()).all()
    assert simplex_qp_kkt_violation(Qn, fn, lam.numpy(), mn).max() <= 1e-8
    assert np.all(np.abs(o - o_ref) <= obj_tol * s), np.abs(o - o_ref).max()
    assert np.all(o <= o_ref + 1e-9 * s)            # never worse than the reference
    if unique.any(): np.testing.assert_allclose(lam.numpy()[unique], ref[unique], atol=lam_tol, rtol=0)

@pytest.mark.parametrize('q', [2, 3, 4, 6, 8])
@pytest.mark.parametrize('kind', ['gauss', 'correlated', 'scaled'])
def test_random_full_rank_vs_quadprog(q, kind):
    gen = torch.Generator().manual_seed(q * 10 + len(kind))
    B = 2000 if q <= 3 else 600
    Q, f = random_simplex_qps(B, q, q + 3, kind, generator=gen)
    mask = torch.ones(B, q, dtype=torch.bool)
    ref = reference(Q, f, mask)
    ev = torch.linalg.eigvalsh(Q)
    unique = (ev[:, 0] > 1e-6 * ev[:, -1]).numpy()          # positive definite, well enough conditioned for 1e-6 in λ
    assert unique.mean() > 0.5
    for method in METHODS[q]:
        lam, info = solve_simplex_qp(Q, f, method=method, return_info=True)
        assert info['converged'].all() and info['method'] == method
        compare(Q, f, mask, lam, ref, unique)

@pytest.mark.parametrize('q,n', [(3, 1), (3, 2), (4, 2), (6, 3), (8, 3)])
def test_rank_deficient_vs_quadprog(q, n):
    "Singular Q = G Gᵀ (n < q): the optimum may not be unique, so only objectives (and the KKT conditions) are compared."
    gen = torch.Generator().manual_seed(100 + q * n)
    B = 1500 if q <= 3 else 400
    Q, f = random_simplex_qps(B, q, n, generator=gen)
    mask = torch.ones(B, q, dtype=torch.bool)
    ref = reference(Q, f, mask, ridge=1e-7)                 # perturbs the optimum by ≤ 5e-8 of the scale
    ref = project_to_simplex(torch.tensor(ref)).numpy()     # quadprog's answer on a near-singular Q is feasible only to ~1e-8; projected, it is a feasible point
    for method in METHODS[q]:
        lam = solve_simplex_qp(Q, f, method=method)
        compare(Q, f, mask, lam, ref, np.zeros(B, bool))

def degenerate_problems(gen):
    "Families that break naive solvers: zero, duplicated, collinear, nearly duplicated gradients, ties in the losses."
    B, n = 300, 6
    g = torch.randn(B, n, generator=gen, dtype=torch.float64)
    h = torch.randn(B, n, generator=gen, dtype=torch.float64)
    c = torch.randn(B, 3, 1, generator=gen, dtype=torch.float64)
    fam = {'zero': torch.zeros(B, 3, n, dtype=torch.float64),
           'duplicated': torch.stack([g, g, h], 1),
           'all_equal': torch.stack([g, g, g], 1),
           'collinear': c * g[:, None],
           'near_duplicate': torch.stack([g, g + 1e-7 * h, h], 1),
           'coplanar': torch.stack([g, h, 0.3 * g + 0.7 * h], 1),        # the third gradient on the first two's segment
           'one_zero': torch.stack([g, h, torch.zeros_like(g)], 1)}
    ties = torch.randint(0, 3, (B, 3), generator=gen).to(torch.float64)  # losses with many exact ties
    cont = 3 * torch.rand(B, 3, generator=gen, dtype=torch.float64)
    return {(k, fk): (G @ G.mT, fv) for k, G in fam.items() for fk, fv in (('ties', ties), ('cont', cont))}

def test_degenerate_vs_quadprog():
    gen = torch.Generator().manual_seed(7)
    for (name, fname), (Q, f) in degenerate_problems(gen).items():
        mask = torch.ones_like(f, dtype=torch.bool)
        ref = project_to_simplex(torch.tensor(reference(Q, f, mask, ridge=1e-7))).numpy()
        for method in ('exact', 'iterative'):
            lam, info = solve_simplex_qp(Q, f, method=method, return_info=True)
            assert info['converged'].all(), (name, fname, method)
            compare(Q, f, mask, lam, ref, np.zeros(len(f), bool))

def test_degenerate_kkt_without_reference():
    "The same families, certified by the KKT conditions alone (runs without quadprog)."
    gen = torch.Generator().manual_seed(8)
    for (name, fname), (Q, f) in degenerate_problems(gen).items():
        for method in ('exact', 'iterative'):
            lam = solve_simplex_qp(Q, f, method=method)
            assert torch.isfinite(lam).all()
            assert simplex_qp_kkt_violation(Q.numpy(), f.numpy(), lam.numpy(), np.ones(f.shape, bool)).max() <= 1e-9, (name, fname, method)

def test_zero_Q_and_tie_breaking():
    "Q = 0: the vertex of the largest loss, ties to the lowest present index — for both methods, in any batch."
    gen = torch.Generator().manual_seed(9)
    f = torch.randint(0, 3, (1000, 4), generator=gen).float()
    mask = torch.rand(1000, 4, generator=gen) < 0.7; mask[:, 3] |= ~mask.any(-1)
    expect = torch.nn.functional.one_hot(torch.where(mask, f, -torch.inf).argmax(-1), 4).float()   # argmax → first maximum
    for method in ('exact', 'iterative'):
        torch.testing.assert_close(solve_simplex_qp(torch.zeros(1000, 4, 4), f, mask, method=method), expect, atol=0, rtol=0)
    # duplicated gradients with equal losses: the optimal set is an edge; its lowest-index vertex is returned
    g, h = 0.1 * torch.randn(50, 5, generator=gen, dtype=torch.float64), torch.randn(50, 5, generator=gen, dtype=torch.float64)
    G = torch.stack([g, g, h], 1)                            # levels 0 and 1 identical with equal losses; level 2 has a low loss
    for method in ('exact', 'iterative'):
        lam = gram_qp(G, torch.tensor([[5., 5., 0.]]).expand(50, 3), method=method)
        torch.testing.assert_close(lam, torch.tensor([[1., 0., 0.]], dtype=torch.float64).expand(50, 3), atol=1e-12, rtol=0)

@pytest.mark.parametrize('scale', [1e8, 1e-8])
def test_scales(scale):
    gen = torch.Generator().manual_seed(11)
    Q, f = random_simplex_qps(1000, 3, 5, generator=gen)
    Q8, f8 = random_simplex_qps(300, 8, 10, generator=gen)
    for A, c, methods in ((Q, f, ('exact', 'iterative')), (Q8, f8, ('iterative',))):
        for method in methods:
            base = solve_simplex_qp(A, c, method=method)
            torch.testing.assert_close(solve_simplex_qp(A * scale, c * scale, method=method), base, atol=1e-9, rtol=0)
    # only Q huge (f negligible) or only f huge (Q negligible): still certified optimal
    for A, c in ((Q * scale, f), (Q, f * scale)):
        lam = solve_simplex_qp(A, c)
        assert simplex_qp_kkt_violation(A.numpy(), c.numpy(), lam.numpy(), np.ones(c.shape, bool)).max() <= 1e-9

def test_masked_vs_quadprog():
    "Random masks (the q−1 problems of CocoER's elimination): absent levels get exactly 0, the rest match the reduced problem."
    gen = torch.Generator().manual_seed(12)
    for q in (3, 5):
        Q, f = random_simplex_qps(1500, q, q + 2, generator=gen)
        mask = torch.rand(1500, q, generator=gen) < 0.6; mask[:, 0] |= ~mask.any(-1)
        Qg, fg = Q.clone(), f.clone()
        Qg[~(mask[:, :, None] & mask[:, None, :])] = torch.nan; fg[~mask] = torch.inf   # garbage in absent levels is ignored
        ref = reference(Q, f, mask)
        for method in ('exact', 'iterative'):
            lam = solve_simplex_qp(Qg, fg, mask, method=method)
            assert (lam[~mask] == 0).all()
            compare(Q, f, mask, lam, ref, np.ones(1500, bool))

def test_float32_and_bfloat16_inputs():
    gen = torch.Generator().manual_seed(13)
    Q, f = random_simplex_qps(2000, 3, 6, generator=gen)
    Q32, f32 = Q.float(), f.float()
    for method in ('exact', 'iterative'):
        lam = solve_simplex_qp(Q32, f32, method=method)
        assert lam.dtype == torch.float32
        torch.testing.assert_close(lam.double(), solve_simplex_qp(Q32.double(), f32.double()), atol=1e-6, rtol=0)
    lam16 = solve_simplex_qp(Q.bfloat16(), f.bfloat16())
    assert lam16.dtype == torch.bfloat16 and torch.isfinite(lam16.float()).all()
    torch.testing.assert_close(lam16.float().sum(-1), torch.ones(2000), atol=2e-2, rtol=0)
    assert gram_qp(torch.randn(10, 3, 4, generator=gen), torch.rand(10, 3, generator=gen)).dtype == torch.float32

def test_batch_independence_and_single_problem():
    "A problem's answer does not depend on the rest of its batch; (q, q), (q,) inputs solve one problem."
    gen = torch.Generator().manual_seed(14)
    Q, f = random_simplex_qps(200, 4, 6, generator=gen)
    for method in ('exact', 'iterative'):
        lam = solve_simplex_qp(Q, f, method=method)
        for i in (0, 57, 199):
            one = solve_simplex_qp(Q[i], f[i], method=method)
            assert one.shape == (4,)
            torch.testing.assert_close(one, lam[i], atol=1e-12, rtol=0)

def test_gram_qp_and_objective():
    gen = torch.Generator().manual_seed(15)
    G = torch.randn(500, 3, 30, generator=gen, dtype=torch.float64); f = torch.rand(500, 3, generator=gen, dtype=torch.float64)
    lam, info = gram_qp(G, f, return_info=True)
    torch.testing.assert_close(lam, solve_simplex_qp(G @ G.mT, f))
    direct = 0.5 * (lam[:, :, None] * G).sum(1).pow(2).sum(-1) - (f * lam).sum(-1)   # ½‖Gᵀλ‖² − fᵀλ
    torch.testing.assert_close(info['objective'], direct)
    assert (simplex_qp_gap(G @ G.mT, f, lam) <= 1e-9).all()

def test_iterative_matches_exact_on_many_levels():
    "Exact enumeration (63 / 255 faces) and the iterative solver agree on q = 6 and 8, including singular Q."
    gen = torch.Generator().manual_seed(16)
    for q, n in ((6, 9), (6, 2), (8, 11), (8, 4)):
        Q, f = random_simplex_qps(300, q, n, generator=gen)
        ex, it = solve_simplex_qp(Q, f, method='exact'), solve_simplex_qp(Q, f, method='iterative')
        s = torch.as_tensor(simplex_qp_scale(Q.numpy(), f.numpy(), np.ones(f.shape, bool)))
        torch.testing.assert_close(simplex_qp_objective(Q, f, it) / s, simplex_qp_objective(Q, f, ex) / s, atol=1e-9, rtol=0)
        if n >= q: torch.testing.assert_close(it, ex, atol=1e-7, rtol=0)

def test_projection_vs_quadprog():
    gen = torch.Generator().manual_seed(17)
    V = 2 * torch.randn(1000, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(1000, 6, generator=gen) < 0.7; mask[:, 0] = True
    P = project_to_simplex(V, mask)
    ref = reference(torch.eye(6, dtype=torch.float64).expand(1000, 6, 6), V, mask)   # ½‖λ‖² − vᵀλ
    np.testing.assert_allclose(P.numpy(), ref, atol=1e-10)

def test_frank_wolfe_baseline():
    gen = torch.Generator().manual_seed(18)
    Q, f = random_simplex_qps(500, 3, 6, generator=gen)
    lam_fw, info = frank_wolfe_simplex_qp(Q, f, tol=1e-6, max_iter=20_000)
    opt = simplex_qp_objective(Q, f, solve_simplex_qp(Q, f))
    d = simplex_qp_objective(Q, f, lam_fw) - opt
    s = torch.as_tensor(simplex_qp_scale(Q.numpy(), f.numpy(), np.ones(f.shape, bool)))
    assert info['converged'].float().mean() > 0.5 and (d >= -1e-12).all() and (d[info['converged']] <= 1e-6 * s[info['converged']]).all()

def test_bad_inputs():
    Q, f = torch.eye(3).expand(5, 3, 3).clone(), torch.rand(5, 3)
    Q[1, 0, 0] = float('nan'); f[4, 2] = float('-inf')
    with pytest.raises(ValueError, match=r'batch element\(s\) \[1, 4\]'): solve_simplex_qp(Q, f)
    with pytest.raises(ValueError, match=r'f must have shape'): solve_simplex_qp(torch.eye(3).expand(5, 3, 3), torch.rand(4, 3))
    with pytest.raises(ValueError, match=r'Q must have shape'): solve_simplex_qp(torch.rand(5, 3, 2), torch.rand(5, 3))
    with pytest.raises(ValueError, match=r'mask must have shape'): solve_simplex_qp(torch.eye(3).expand(5, 3, 3), torch.rand(5, 3), torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'bool'): solve_simplex_qp(torch.eye(3).expand(5, 3, 3), torch.rand(5, 3), torch.ones(5, 3))
    m = torch.ones(5, 3, dtype=torch.bool); m[2] = False
    with pytest.raises(ValueError, match=r'no level present.*\[2\]'): solve_simplex_qp(torch.eye(3).expand(5, 3, 3), torch.rand(5, 3), m)
    with pytest.raises(ValueError, match=r"too many"): solve_simplex_qp(torch.eye(12)[None], torch.rand(1, 12), method='exact')
    assert solve_simplex_qp(torch.zeros(0, 3, 3), torch.zeros(0, 3)).shape == (0, 3)

def test_max_iter_warns():
    gen = torch.Generator().manual_seed(19)
    Q, f = random_simplex_qps(50, 8, 3, generator=gen)
    with pytest.warns(UserWarning, match='did not reach'):
        solve_simplex_qp(Q, f, method='iterative', max_iter=1, tol=1e-15)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(20)
    for q, n in ((3, 5), (3, 1), (8, 10), (8, 3)):
        Q, f = random_simplex_qps(4096, q, n, generator=gen)
        mask = torch.rand(4096, q, generator=gen) < 0.8; mask[:, 0] = True
        for method in METHODS[q if q in METHODS else 8]:
            cpu = solve_simplex_qp(Q, f, mask, method=method)
            gpu = solve_simplex_qp(Q.cuda(), f.cuda(), mask.cuda(), method=method)
            assert gpu.device.type == 'cuda'
            o_c, o_g = (simplex_qp_objective(Q, f, l.cpu(), mask) for l in (cpu, gpu))
            s = torch.as_tensor(simplex_qp_scale(Q.numpy(), f.numpy(), mask.numpy()))
            assert ((o_g - o_c).abs() <= 1e-9 * s).all()
            if n >= q: torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-7, rtol=0)
        lam32 = solve_simplex_qp(Q.float().cuda(), f.float().cuda(), mask.cuda())
        assert lam32.dtype == torch.float32 and lam32.device.type == 'cuda'
