"CocoER (emonb.cocoer): the closed-form workspace against per-sample autograd gradients and an independent QP (SciPy SLSQP), the official variant against emonb.testing's literal re-implementation of the official code (bisno/CocoER models_sw.py, utils.py), the variants' differences, the model's gradient paths, and a tiny run."
import copy, json
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from emonb.qp import solve_simplex_qp
from emonb.testing import (slsqp_simplex_qp, cocoer_code_encoder, cocoer_code_box_positions, cocoer_code_vi, cocoer_code_vi_from,
                           cocoer_code_dynamic_loss, cocoer_code_workspace, cocoer_code_heads)
from emonb.core import label_set
from emonb.cocoer import (level_loss_grad, workspace_gram, workspace, per_sample_workspace, CocoER, CocoerLoss, SingleLevelModel,
                          random_batch, cocoer_config, cocoer_dataloaders, train_cocoer, elimination_report,
                          conflict_breakdown, COCOER_CPU, COCOER_CPU_SIZE, LEVEL_NAMES, CrossLevelBlock, GridPositions,
                          VocabularyInformed, COCOER_TEMPLATE, EMOTIC_STATIC_WEIGHTS, COCOER_VARIANTS, _criterion)

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
    ours = workspace(z, h, t, multi_label, cw, step, variant='paper')
    for solver, tol in ((slsqp_simplex_qp, 1e-6), (None, 1e-10)):
        ref = per_sample_workspace(h, layers, t, multi_label, cw, step, solver=solver)
        assert torch.equal(ours.order, ref.order)
        scale = max(1., ref.refined.abs().max().item())
        assert (ours.refined - ref.refined).abs().max().item() < tol * scale
        assert (ours.lam - ref.lam).abs().max().item() < tol * 10
        assert ((ours.delta_sq - ref.delta_sq).abs() / ref.delta_sq.clamp_min(1e-12)).max().item() < tol * 10
        assert torch.allclose(ours.losses, ref.losses, atol=1e-12)

@pytest.mark.parametrize('loss', ['cross_entropy', 'weighted_bce', 'dynamic_bce'])
def test_gradient_and_gram_in_closed_form(loss):
    multi_label = loss != 'cross_entropy'
    torch.manual_seed(0)
    B, q, d, k = 4, 3, 6, 9
    z, h = torch.randn(B, q, k, dtype=torch.float64, requires_grad=True), torch.randn(B, q, d, dtype=torch.float64)
    t = (torch.rand(B, 1, k) < 0.4).double() if multi_label else F.one_hot(torch.randint(0, k, (B,)), k).double()[:, None]
    cw = torch.rand(k, dtype=torch.float64) + 0.5 if multi_label else None
    f, g = level_loss_grad(z, t.expand(B, q, k), loss, cw)
    assert torch.allclose(g, torch.autograd.grad(f.sum(), z)[0], atol=1e-12)
    G = torch.cat([(g[..., :, None] * h[..., None, :]).flatten(2), g], -1)
    assert torch.allclose(workspace_gram(g, h), G @ G.transpose(1, 2), atol=1e-10)
    Gw = (g[..., :, None] * h[..., None, :]).flatten(2)
    assert torch.allclose(workspace_gram(g, h, bias=False), Gw @ Gw.transpose(1, 2), atol=1e-10)

def test_elimination_is_sequential_and_masked():
    layers, h, z, t, _ = random_problem(16, 3, 5, 4, False, 7)
    ws = workspace(z, h, t, variant='paper')
    f, g = level_loss_grad(z, t[:, None])
    Q = workspace_gram(g, h)
    lam1 = solve_simplex_qp(Q, f)
    mask = torch.ones(16, 3, dtype=torch.bool); mask[torch.arange(16), f.argmax(1)] = False
    lam2 = solve_simplex_qp(Q, f, mask)
    assert torch.allclose(ws.lam, lam1 + lam2, atol=1e-10)
    assert torch.equal(ws.order[:, 0], f.argmax(1)) and torch.equal(ws.order[:, 2], f.argmin(1))
    assert (lam2[torch.arange(16), f.argmax(1)] == 0).all()

def test_official_delta_shifts_every_class_alike():
    "The code's delta: one vector u for every class row and one scalar s for the bias, so a level's refined logits move by one amount."
    layers, h, z, t, _ = random_problem(5, 3, 6, 4, False, 11)
    ws = workspace(z, h, t, variant='official', loss='cross_entropy', step=0.7)
    shift = ws.refined - z
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-12)
    assert torch.allclose(ws.refined.softmax(-1), z.softmax(-1), atol=1e-12)
    assert torch.allclose(shift[..., 0], -0.7 * (torch.einsum('bd,bjd->bj', ws.direction, h) + ws.bias_direction[:, None]), atol=1e-12)

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
    model = CocoER(clip, 'caer_s', variant='emonb', **COCOER_CPU).eval()
    b = random_batch(3, 32, 7)
    with torch.no_grad():
        out = model(*b[:4])
        model.workspace = 'per_sample'; ref = model(*b[:4])
    assert torch.equal(out.order, ref.order)
    assert (out.refined - ref.refined).abs().max() < 1e-4 * max(1., out.refined.abs().max().item())
    assert torch.allclose(out.logits, ref.logits, atol=1e-3)

def test_every_term_of_l_emo_produces_gradients(clip):
    torch.manual_seed(0)
    model = CocoER(clip, 'emotic', multi_label=True, class_weights=torch.rand(26) + 0.5, variant='emonb', **COCOER_CPU).train()
    b = random_batch(4, 32, 26, multi_label=True)
    def norms(betas, alpha):
        model.zero_grad()
        CocoerLoss(True, None, betas, alpha, variant='emonb')(model(*b[:4]), b[4]).backward()
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
    from emonb.synth_tables import world_table
    write_dataset(SyntheticWorld(seed=3, conflict=0.5), tmp_path/'caer', 'caer_s', {'train': 28, 'val': 14, 'test': 14})
    df = world_table(tmp_path/'caer')
    assert set(df.conflict_level) <= {'', 'face', 'body', 'context'} and df.face_box.notna().all()
    learn, met = train_cocoer(df, tmp_path/'run', clip=clip, size=COCOER_CPU_SIZE, bs=14, progress=False,
                              config=cocoer_config('caer_s', epochs=1, lr=1e-3), **COCOER_CPU)
    saved = json.loads((tmp_path/'run'/'report'/'metrics.json').read_text())
    assert saved['n'] == 14 and saved['run']['method'] == 'cocoer'
    assert (saved['run']['variant'], saved['run']['model']['variant'], saved['run']['normalize']) == ('official', 'official', 'imagenet')
    assert saved['run']['options']['coordination'] == 'official' and saved['run']['level_target'] == 'workspace'
    fe = saved['run']['first_eliminated']['all']
    assert fe['n'] == 14 and abs(fe['context'] + fe['body'] + fe['head'] - 100) < 1e-6
    assert (tmp_path/'run'/'models'/'checkpoints'/'best.pth').exists()
    with pytest.raises(ValueError, match='needs a CLIP'): train_cocoer(df, tmp_path/'run2', size=COCOER_CPU_SIZE, **COCOER_CPU)
    with pytest.raises(TypeError, match="variant='official'"): train_cocoer(df, tmp_path/'run3', clip=clip, official=True, **COCOER_CPU)

def test_cached_run_equals_uncached_multilabel(tmp_path, clip):
    "EMOTIC layout (multi-label): a run from the window cache is the run from the images, FlipLevels flips included."
    from emonb.synth import SyntheticWorld, write_dataset
    from emonb.synth_tables import world_table
    write_dataset(SyntheticWorld(seed=4, conflict=0.3), tmp_path/'em', 'emotic', {'train': 28, 'val': 14, 'test': 14})
    df = world_table(tmp_path/'em')
    kw = dict(clip=clip, size=COCOER_CPU_SIZE, bs=14, progress=False, select='last',
              config=cocoer_config('emotic', epochs=1, lr=1e-3, schedule='constant'), **COCOER_CPU)
    li, mi = train_cocoer(df, tmp_path/'images', **kw)
    lc, mc = train_cocoer(df, tmp_path/'cached', cache=tmp_path/'cache', **kw)
    assert mc['run']['data'] == str(tmp_path/'cache') and mc['run']['multi_label']
    # the same run up to float rounding: the official variant's validation loss varies by ~2e-7 (relative) between identical runs
    # in one process, cached or not (measured: 1 run in 4; emonb's variant repeats exactly) - not a difference of the cache
    np.testing.assert_allclose(np.array(lc.recorder.values), np.array(li.recorder.values), rtol=1e-5)
    assert abs(mc['mAP'] - mi['mAP']) < 1e-6
    bi, bc = li.dls.valid.one_batch(), lc.dls.valid.one_batch()
    assert [type(x) for x in bi] == [type(x) for x in bc] and all(torch.allclose(a.float(), b.float()) for a, b in zip(bi, bc))

def max_diff(a, b): return (a.detach().double() - b.detach().double()).abs().max().item()
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

@pytest.mark.parametrize('dt', [torch.float32, torch.float64])
def test_official_modules_match_the_code(dt, clip):
    torch.manual_seed(1)
    d, B = 32, 3
    blk = CrossLevelBlock(d, heads=4, ffn_dim=64, activation='swish').to(dt).eval()
    x, y, px, py = [torch.randn(B, 49, d, dtype=dt) for _ in range(4)]
    assert max_diff(blk(x, y, px, py), cocoer_code_encoder(blk).eval()(x, y, px, py)) <= TOL[dt]
    pos = GridPositions(7, d, sampling='code').to(dt)
    rois = torch.tensor([[0, 0, 224, 224], [11, 5, 200, 64], [100, 100, 101, 223]])
    assert max_diff(pos.sample(rois.to(dt) / 224), cocoer_code_box_positions(pos.col, pos.row, rois)) <= TOL[dt]
    for labels in ('caer_s', 'emotic'):
        names = label_set(labels).names
        vi = VocabularyInformed(clip, [COCOER_TEMPLATE.format(n) for n in names], d, 'repeat', False, 'orthogonal').eval()
        for m in (vi.W, vi.ffn, vi.head): m.to(dt)
        with torch.no_grad(): raw = clip.encode_image(torch.randn(B, 3, clip.image_size, clip.image_size), normalize=False).float().to(dt)
        e_out = vi.from_embedding(F.normalize(raw, dim=-1))
        W_c, ffn_c = cocoer_code_vi_from(vi)
        c_out, c_feat = cocoer_code_vi(raw, W_c, ffn_c, len(names))
        assert max(max_diff(e_out[0], c_out), max_diff(e_out[1], c_feat)) <= TOL[dt]
    z = torch.randn(5, 7, dtype=dt, requires_grad=True); t = (torch.rand(5, 7) < 0.3).to(dt)
    f, g = level_loss_grad(z.detach(), t, 'dynamic_bce')
    f_c = torch.stack([cocoer_code_dynamic_loss(z[i:i + 1], t[i:i + 1]) for i in range(5)])
    assert max_diff(f, f_c) <= TOL[dt] and max_diff(g, torch.autograd.grad(f_c.sum(), z)[0]) <= TOL[dt]

@pytest.mark.parametrize('dt', [torch.float32, torch.float64])
@pytest.mark.parametrize('labels,k', [('caer_s', 7), ('emotic', 26)])
def test_official_workspace_and_head_match_the_code(dt, labels, k, clip):
    torch.manual_seed(2)
    B, d = 3, 16
    m = CocoER(clip, labels, multi_label=labels == 'emotic', dim=d, ffn_dim=2 * d, arch='resnet10t', backbone_kw=dict(channels=(16, 32, 64, 128)), stage=1)
    for name in ('mappings', 'global_head'): getattr(m, name).to(dt)
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randn(B, 49, d, generator=g).to(dt).requires_grad_() for _ in range(3)]
    vi_out, vi_feat = (3 * torch.randn(B, k, generator=g)).to(dt), torch.randn(B, d, generator=g).to(dt).requires_grad_()
    heads, ghead = cocoer_code_heads(m), copy.deepcopy(m.global_head)
    tokens_c, vi_feat_c = [t.detach().clone().requires_grad_() for t in tokens], vi_feat.detach().clone().requires_grad_()
    out = m.from_tokens(tokens, vi_out, vi_feat)
    out_c, refined_c, rec = cocoer_code_workspace(tokens_c, vi_out, vi_feat_c, heads, ghead, m.step)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    assert torch.equal(out.order, torch.tensor(rec['order']))
    for ours, theirs in ((out.level_losses, f64(rec['losses'])), (out.lam, f64(rec['lam'])), (out.lam_bias, f64(rec['lam_bias'])),
                         (out.direction, torch.stack(rec['direction'])), (out.bias_direction, torch.stack(rec['bias_direction'])),
                         (out.delta_norm, f64(rec['grad_d'])), (out.refined_features, refined_c), (out.logits, out_c)):
        assert max_diff(ours, theirs) <= TOL[dt], (ours, theirs)
    y = (torch.rand(B, k, generator=g) < 0.3).to(dt)
    crit = _criterion(True, None, class_sum=True)
    params = lambda mods: [mm.weight for mm in mods]
    ge = torch.autograd.grad(crit(out.logits, y), tokens + [vi_feat] + params([m.mappings[l].features[2] for l in LEVEL_NAMES]))
    gc = torch.autograd.grad(crit(out_c, y), tokens_c + [vi_feat_c] + params([hd[1] for hd in heads]))
    assert max(max_diff(a, b) for a, b in zip(ge, gc)) <= TOL[dt]

def test_variants_differ(clip):
    torch.manual_seed(0)
    z, h, t = torch.randn(5, 3, 7), torch.randn(5, 3, 12), F.one_hot(torch.randint(0, 7, (5,)), 7).float()
    wo, wp, we = workspace(z, h, t), workspace(z, h, t, variant='paper'), workspace(z, h, t, variant='emonb')
    assert torch.equal(wp.lam, we.lam) and torch.equal(wp.refined, we.refined)
    assert max_diff(wo.lam, wp.lam) > 1e-3 and max_diff(wo.refined, wp.refined) > 1e-3 and max_diff(wo.losses, wp.losses) > 1e-3
    b = random_batch(3, COCOER_CPU_SIZE, 7)
    models = {}
    for v in COCOER_VARIANTS:
        torch.manual_seed(0); models[v] = CocoER(clip, 'caer_s', variant=v, **COCOER_CPU).eval()
    assert models['official'].blocks['head'][0].heads == 4 and models['emonb'].blocks['head'][0].heads == 3
    assert type(models['official'].blocks['head'][0].ffn[1]) is nn.SiLU and type(models['paper'].blocks['head'][0].ffn[1]) is nn.GELU
    assert type(models['official'].vi.ffn[0]) is nn.GELU and type(models['emonb'].vi.ffn[0]) is nn.LayerNorm
    assert models['official'].global_head[2].in_features == 4 * 64 and models['emonb'].global_head[0].in_features == 3 * 7 + 64
    with torch.no_grad(): outs = {v: m(*b[:4]) for v, m in models.items()}
    assert 'refined_features' in outs['official'] and 'refined_features' not in outs['emonb']
    two = torch.tensor([[2., 1.5, -3., -3., -3., -3., -3.]])
    assert models['official'].pseudo_labels(two).sum() == 2 and models['emonb'].pseudo_labels(two).sum() == 1
    eo, ep = cocoer_config('emotic'), cocoer_config('emotic', variant='paper')
    assert (eo.opt, eo.betas, eo.wd, eo.epochs, eo.gamma) == ('adamw', (0.9, 0.96), 0.01, 20, 0.1) and (ep.opt, ep.epochs, ep.gamma) == ('adam', 9, 0.01)
    assert CocoER(clip, 'caer_s', variant='emonb', heads=4, **COCOER_CPU).blocks['head'][0].heads == 4     # explicit options override
    with pytest.raises(TypeError, match="variant='official'"): CocoER(clip, 'caer_s', official=True, **COCOER_CPU)
    with pytest.raises(ValueError, match="CocoER has no variant 'code'"): workspace(z, h, t, variant='code')

def test_official_loss_is_the_codes(clip):
    torch.manual_seed(0)
    m = CocoER(clip, 'emotic', multi_label=True, **COCOER_CPU).train()
    b = random_batch(4, COCOER_CPU_SIZE, 26, multi_label=True)
    out = m(*b[:4])
    loss = CocoerLoss(multi_label=True)(out, b[4])
    w = torch.tensor(EMOTIC_STATIC_WEIGHTS)
    bce = lambda z: (F.binary_cross_entropy_with_logits(z, b[4], reduction='none') * w).sum(-1).mean()
    manual = 0.2 * (bce(out.logits) + out.level_losses.mean(0).sum() + bce(out.vi)) + 0.1 * out.delta_norm[-1]
    assert abs(loss.item() - manual.item()) < 1e-4
    loss.backward()
    assert all(m.mappings[l].pred.weight.grad is None for l in LEVEL_NAMES)        # the prediction layers get no gradient
    assert m.mappings['head'].features[2].weight.grad.abs().sum() > 0               # the mappings do (through the refined features)
