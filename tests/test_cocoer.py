"CocoER (emonb.cocoer): the closed-form workspace against per-sample autograd gradients and an independent QP (SciPy SLSQP), the official variant against a literal re-implementation of the code's steps, the model's gradient paths, and a tiny run."
import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from scipy.optimize import minimize
from emonb.qp import solve_simplex_qp
from emonb.cocoer import (level_loss_grad, workspace_gram, workspace, per_sample_workspace, CocoER, CocoerLoss, SingleLevelModel,
                          random_batch, cocoer_config, cocoer_dataloaders, world_table, train_cocoer, elimination_report,
                          conflict_breakdown, COCOER_CPU, COCOER_CPU_SIZE, LEVEL_NAMES)

def slsqp(Q, f, mask):
    "Reference QP: SciPy SLSQP, one problem at a time in float64 numpy; absent levels get 0 (shares no code with emonb.qp)."
    out = []
    for Qb, fb, mb in zip(Q.detach().double().cpu().numpy(), f.detach().double().cpu().numpy(), mask.cpu().numpy()):
        i = np.flatnonzero(mb); Qi, fi = Qb[np.ix_(i, i)], fb[i]
        r = minimize(lambda l: 0.5 * l @ Qi @ l - fi @ l, np.full(len(i), 1 / len(i)), jac=lambda l: Qi @ l - fi, method='SLSQP',
                     bounds=[(0, None)] * len(i), constraints=[dict(type='eq', fun=lambda l: l.sum() - 1, jac=lambda l: np.ones_like(l))],
                     options=dict(ftol=1e-16, maxiter=1000))
        lam = np.zeros(len(fb)); lam[i] = r.x; out.append(lam)
    return torch.tensor(np.array(out))

def random_problem(B, q, d, k, multi_label, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = [nn.Linear(d, k).double() for _ in range(q)]
    h = torch.randn(B, q, d, dtype=torch.float64, generator=g) * (1 + torch.rand(B, q, 1, generator=g, dtype=torch.float64))
    with torch.no_grad(): z = torch.stack([layers[m](h[:, m]) for m in range(q)], 1)
    if multi_label:
        t, cw = (torch.rand(B, k, generator=g) < 0.3).double(), torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    else:
        t, cw = F.one_hot(torch.randint(0, k, (B,), generator=g), k).double(), None
    return layers, h, z, t, cw

@pytest.mark.parametrize('multi_label', [False, True])
@pytest.mark.parametrize('q,B,d,k,step,seed', [(3, 8, 5, 7, 1., 0), (3, 5, 16, 26, 0.3, 1), (2, 6, 4, 3, 1., 2), (3, 1, 3, 2, 2., 3)])
def test_closed_form_equals_autograd_and_reference_qp(multi_label, q, B, d, k, step, seed):
    layers, h, z, t, cw = random_problem(B, q, d, k, multi_label, seed)
    ours = workspace(z, h, t, multi_label, cw, step)
    for solver, tol in ((slsqp, 1e-6), (None, 1e-10)):
        ref = per_sample_workspace(h, layers, t, multi_label, cw, step, solver=solver)
        assert torch.equal(ours.order, ref.order)
        scale = max(1., ref.refined.abs().max().item())
        assert (ours.refined - ref.refined).abs().max().item() < tol * scale
        assert (ours.lam - ref.lam).abs().max().item() < tol * 10
        assert ((ours.delta_sq - ref.delta_sq).abs() / ref.delta_sq.clamp_min(1e-12)).max().item() < tol * 10
        assert torch.allclose(ours.losses, ref.losses, atol=1e-12)

@pytest.mark.parametrize('multi_label', [False, True])
def test_gradient_and_gram_in_closed_form(multi_label):
    torch.manual_seed(0)
    B, q, d, k = 4, 3, 6, 9
    z, h = torch.randn(B, q, k, dtype=torch.float64, requires_grad=True), torch.randn(B, q, d, dtype=torch.float64)
    t = (torch.rand(B, 1, k) < 0.4).double() if multi_label else F.one_hot(torch.randint(0, k, (B,)), k).double()[:, None]
    cw = torch.rand(k, dtype=torch.float64) + 0.5 if multi_label else None
    f, g = level_loss_grad(z, t.expand(B, q, k), multi_label, cw)
    assert torch.allclose(g, torch.autograd.grad(f.sum(), z)[0], atol=1e-12)
    G = torch.cat([(g[..., :, None] * h[..., None, :]).flatten(2), g], -1)
    assert torch.allclose(workspace_gram(g, h), G @ G.transpose(1, 2), atol=1e-10)
    Gw = (g[..., :, None] * h[..., None, :]).flatten(2)
    assert torch.allclose(workspace_gram(g, h, bias=False), Gw @ Gw.transpose(1, 2), atol=1e-10)

def test_elimination_is_sequential_and_masked():
    layers, h, z, t, _ = random_problem(16, 3, 5, 4, False, 7)
    ws = workspace(z, h, t)
    f, g = level_loss_grad(z, t[:, None])
    Q = workspace_gram(g, h)
    lam1 = solve_simplex_qp(Q, f)
    mask = torch.ones(16, 3, dtype=torch.bool); mask[torch.arange(16), f.argmax(1)] = False
    lam2 = solve_simplex_qp(Q, f, mask)
    assert torch.allclose(ws.lam, lam1 + lam2, atol=1e-10)
    assert torch.equal(ws.order[:, 0], f.argmax(1)) and torch.equal(ws.order[:, 2], f.argmin(1))
    assert (lam2[torch.arange(16), f.argmax(1)] == 0).all()

def official_literal(layers, h, t, multi_label, cw, step):
    "The official code's steps for each sample, written out: weight and bias QPs, rows L2-normalised, class mean, subtracted."
    B, q, _ = h.shape
    out = []
    for i in range(B):
        Gw, Gb, f = [], [], []
        for m, layer in enumerate(layers):
            zi = layer(h[i, m])
            fm, gm = level_loss_grad(zi[None], t[i][None], multi_label, cw)
            Gw.append(torch.outer(gm[0], h[i, m]).flatten()); Gb.append(gm[0]); f.append(fm[0])
        Gw, Gb, f = torch.stack(Gw), torch.stack(Gb), torch.stack(f)
        alive = list(range(q)); u = torch.zeros_like(h[i, 0]); s = torch.zeros((), dtype=h.dtype)
        while len(alive) > 1:
            mask = torch.zeros(1, q, dtype=torch.bool); mask[0, alive] = True
            lw = slsqp((Gw @ Gw.T)[None], f[None], mask)[0]
            lb = slsqp((Gb @ Gb.T)[None], f[None], mask)[0]
            dW = -(Gw.T @ lw).view(-1, h.shape[-1])                        # (k, d)
            db = -(Gb.T @ lb).view(-1, 1)                                 # (k, 1)
            u = u + F.normalize(dW, dim=1).mean(0); s = s + F.normalize(db, dim=1).mean(0)[0]
            worst = max(alive, key=lambda m: f[m].item()); alive.remove(worst)
        out.append(torch.stack([F.linear(h[i, m], layers[m].weight - step * u[None], layers[m].bias - step * s) for m in range(q)]))
    return torch.stack(out)

@pytest.mark.parametrize('multi_label', [False, True])
def test_official_variant_matches_the_code(multi_label):
    layers, h, z, t, cw = random_problem(5, 3, 6, 4, multi_label, 11)
    with torch.no_grad():
        ours = workspace(z, h, t, multi_label, cw, step=0.7, official=True)
        ref = official_literal(layers, h, t, multi_label, cw, 0.7)
    assert (ours.refined - ref).abs().max().item() < 1e-6
    if not multi_label: assert torch.allclose(ours.refined.softmax(-1), z.softmax(-1), atol=1e-12)

def test_paper_delta_is_a_descent_direction_of_the_linearised_max():
    layers, h, z, t, _ = random_problem(32, 3, 8, 5, False, 5)
    f, g = level_loss_grad(z, t[:, None])
    G = torch.cat([(g[..., :, None] * h[..., None, :]).flatten(2), g], -1)
    lam = solve_simplex_qp(workspace_gram(g, h), f)
    delta = -torch.einsum('bm,bmp->bp', lam, G)
    lin = f + torch.einsum('bmp,bp->bm', G, delta)
    assert (lin.max(1).values <= f.max(1).values - 0.5 * delta.pow(2).sum(1) + 1e-9).all()

@pytest.fixture(scope='module')
def clip():
    from emonb.encoders import ClipEncoder
    return ClipEncoder.from_pretrained('emonb-tiny-vit')

def test_model_closed_form_equals_per_sample(clip):
    torch.manual_seed(0)
    model = CocoER(clip, 'caer_s', **COCOER_CPU).eval()
    b = random_batch(3, 32, 7)
    with torch.no_grad():
        out = model(*b[:4])
        model.workspace = 'per_sample'; ref = model(*b[:4])
    assert torch.equal(out.order, ref.order)
    assert (out.refined - ref.refined).abs().max() < 1e-4 * max(1., out.refined.abs().max().item())
    assert torch.allclose(out.logits, ref.logits, atol=1e-3)

def test_every_term_of_l_emo_produces_gradients(clip):
    torch.manual_seed(0)
    model = CocoER(clip, 'emotic', multi_label=True, class_weights=torch.rand(26) + 0.5, **COCOER_CPU).train()
    b = random_batch(4, 32, 26, multi_label=True)
    def norms(betas, alpha):
        model.zero_grad()
        CocoerLoss(True, None, betas, alpha)(model(*b[:4]), b[4]).backward()
        return {l: sum(p.grad.abs().sum().item() for n, p in model.named_parameters() if n.startswith(f'mappings.{l}') and p.grad is not None)
                for l in LEVEL_NAMES}
    for i, lv in ((0, 'context'), (1, 'body'), (2, 'head')):          # betas: (context, body, head, V-I, global)
        betas = [0.] * 5; betas[i] = 1.
        n = norms(betas, 0.)
        assert n[lv] > 0 and all(v == 0 for k, v in n.items() if k != lv)
    assert all(v > 0 for v in norms([0.] * 5, 1.).values())                    # alpha ||delta||^2 reaches every level
    model.detach_workspace = True
    assert all(v == 0 for v in norms([0.] * 5, 1.).values())

def test_reports():
    out = dict(order=torch.tensor([[2, 0, 1], [1, 0, 2], [0, 1, 2]]), logits=torch.eye(3) * 3, targets=torch.tensor([0, 2, 2]))
    r = elimination_report(out, ['', 'body', 'face'])
    assert list(r.columns) == ['context', 'body', 'head', 'n'] and r.loc['all', 'n'] == 3
    assert r.loc['body conflicts', 'body'] == 100. and r.loc['head conflicts', 'head'] == 100.
    c = conflict_breakdown(out, ['', 'body', 'face'])
    assert c.loc['all', 'war'] == pytest.approx(2 / 3) and np.isnan(c.loc['context conflicts', 'war'])

def test_tiny_run_writes_a_report(tmp_path, clip):
    from emonb.synth import SyntheticWorld, write_dataset
    write_dataset(SyntheticWorld(seed=3, conflict=0.5), tmp_path/'caer', 'caer_s', {'train': 28, 'val': 14, 'test': 14})
    df = world_table(tmp_path/'caer')
    assert set(df.conflict_level) <= {'', 'face', 'body', 'context'} and df.face_box.notna().all()
    learn, met = train_cocoer(df, tmp_path/'run', clip=clip, size=COCOER_CPU_SIZE, bs=14, progress=False,
                              config=cocoer_config('caer_s', epochs=1, lr=1e-3), **COCOER_CPU)
    saved = json.loads((tmp_path/'run'/'report'/'metrics.json').read_text())
    assert saved['n'] == 14 and saved['run']['method'] == 'cocoer'
    fe = saved['run']['first_eliminated']['all']
    assert fe['n'] == 14 and abs(fe['context'] + fe['body'] + fe['head'] - 100) < 1e-6
    assert (tmp_path/'run'/'models'/'checkpoints'/'best.pth').exists()
    with pytest.raises(ValueError, match='needs a CLIP'): train_cocoer(df, tmp_path/'run2', size=COCOER_CPU_SIZE, **COCOER_CPU)

def test_cached_run_equals_uncached_multilabel(tmp_path, clip):
    "EMOTIC layout (multi-label): a run from the window cache is the run from the images, FlipLevels flips included."
    from emonb.synth import SyntheticWorld, write_dataset
    write_dataset(SyntheticWorld(seed=4, conflict=0.3), tmp_path/'em', 'emotic', {'train': 28, 'val': 14, 'test': 14})
    df = world_table(tmp_path/'em')
    kw = dict(clip=clip, size=COCOER_CPU_SIZE, bs=14, progress=False, select='last',
              config=cocoer_config('emotic', epochs=1, lr=1e-3, schedule='constant'), **COCOER_CPU)
    li, mi = train_cocoer(df, tmp_path/'images', **kw)
    lc, mc = train_cocoer(df, tmp_path/'cached', cache=tmp_path/'cache', **kw)
    assert mc['run']['data'] == str(tmp_path/'cache') and mc['run']['multi_label']
    assert lc.recorder.values == li.recorder.values and mc['mAP'] == mi['mAP']
    bi, bc = li.dls.valid.one_batch(), lc.dls.valid.one_batch()
    assert [type(x) for x in bi] == [type(x) for x in bc] and all(torch.allclose(a.float(), b.float()) for a, b in zip(bi, bc))
