"MLPER (emonb.mlper): loss and gradients against a literal re-computation of the paper's eqs. (1)-(12), the adaptive level weights, hard negatives, the recipe, learning from levels, and an end-to-end run."
import json, math, warnings
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from emonb.core import LEVELS, label_set
from emonb.encoders import ClipEncoder
from emonb.prompts import mlper_prompts
from emonb.learner import class_probabilities
from emonb.mlper import (MLPER, MLPERLoss, LevelWeights, ModalCrossAttention, mlper_texts, class_sentence, prompt_tokens,
                         too_long_texts, mlper_param_groups, mlper_splitter, mlper_config, train_on_tokens,
                         caer_s_with_boxes, train_mlper, evaluate_mlper)

warnings.filterwarnings('ignore', message='.*longer than the CLIP.*')

@pytest.fixture(scope='module')
def texts(): return mlper_texts('caer_s')

def tiny_clip(): return ClipEncoder.from_pretrained('emonb-tiny-vit')

def literal_loss(m, x, y, lam=1.):
    "MLPER's eqs. 1-12 written out sample by sample and token by token, independently of the model's batched code."
    cm, B = m.clip, len(y)
    gelu = lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())
    Fv = {l: [cm.image_tokens(x[b:b + 1, LEVELS.index(l)])[1][0] for b in range(B)] for l in m.levels}
    protos = [cm.encode_text([s], normalize=False)[0] for s in m.texts['classes']]
    L_cls = 0.
    for b in range(B):
        c = torch.cat([Fv[l][b][0] for l in m.levels])
        f = m.mlp.weight @ c + m.mlp.bias if isinstance(m.mlp, nn.Linear) else \
            m.mlp[2].weight @ gelu(m.mlp[0].weight @ c + m.mlp[0].bias) + m.mlp[2].bias
        sims = [cos(f, p) / m.tau for p in protos]
        L_cls = L_cls - torch.log(torch.exp(sims[y[b]]) / sum(torch.exp(s) for s in sims))
    L_cls = L_cls / B
    lw = m.level_weights
    if lw.mode == 'fixed': lam_l = [1.] * len(m.align_levels)
    elif lw.mode == 'uncertainty': lam_l = [torch.exp(-s) for s in lw.logits]
    else: lam_l = [len(m.align_levels) * torch.exp(s) / sum(torch.exp(s2) for s2 in lw.logits) for s in lw.logits]
    L_itm = 0.
    for j, l in enumerate(m.align_levels):
        att, head, d, bce, P = m.attention[l], m.match[l], m.attention[l].dim_head, 0., []
        for text in m.texts[l]:
            ids = cm.tokenize([text]); eot = int(ids[0].argmax())
            pooled, toks = cm.text_tokens(ids)
            P.append([pooled[0]] + [toks[0, i] for i in range(eot)])
        for b in range(B):
            f_l, yb = Fv[l][b], int(y[b])
            neg = max((k for k in range(len(P)) if k != yb), key=lambda k: cos(f_l[0], P[k][0]).item())
            for k, target in ((yb, 1.), (neg, 0.)):
                heads = []
                for h in range(att.heads):
                    sl = slice(h * d, (h + 1) * d)
                    Q = att.to_q.weight[sl] @ P[k][0]
                    gam = [Q @ (att.to_k.weight[sl] @ f_l[i]) / math.sqrt(d) for i in range(len(f_l))]
                    mm = [torch.exp(g) / sum(torch.exp(g2) for g2 in gam) for g in gam]
                    heads.append(sum(mm[i] * (att.to_v.weight[sl] @ f_l[i]) for i in range(len(f_l))))
                f_hat = att.ffn[2].weight @ gelu(att.ffn[0].weight @ torch.cat(heads) + att.ffn[0].bias) + att.ffn[2].bias
                z = 1 / (1 + torch.exp(-(head.weight[0] @ f_hat + head.bias[0])))
                bce = bce - (target * torch.log(z) + (1 - target) * torch.log(1 - z))
        L_itm = L_itm + lam_l[j] * bce / (2 * B)
        if lw.mode == 'uncertainty': L_itm = L_itm + lw.logits[j]
    return L_cls + lam * L_itm

@pytest.mark.parametrize('kw', [{}, dict(heads=2, lambda_mode='softmax', lam=.5), dict(share_attention=True, lambda_mode='fixed', mlp_hidden=0),
                                dict(levels=('body', 'context'), align_levels=('context',), lam=2.), dict(train_image=False, refine='all')])
def test_loss_and_gradients_match_the_equations(texts, kw):
    kw = dict(kw); lam = kw.pop('lam', 1.)
    torch.manual_seed(0)
    m = MLPER(tiny_clip().double(), texts, **kw).double()
    with torch.no_grad():
        if m.level_weights.logits is not None: m.level_weights.logits.normal_(0, .5)
        for p in m.match.parameters(): p.mul_(20)
    x, y = torch.randn(3, 3, 3, 64, 64, dtype=torch.float64), torch.tensor([2, 6, 6])
    params = [p for p in m.parameters() if p.requires_grad]
    loss, ref = MLPERLoss(m, lam)(m(x), y), literal_loss(m, x, y, lam)
    assert abs(loss.item() - ref.item()) < 1e-9
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < 1e-8

def test_class_sentences():
    ps = mlper_prompts('caer_s')
    assert mlper_texts('caer_s')['classes'] == list(ps.texts['composite'])
    assert class_sentence('sadness', {}) == 'a photo of a sad person.'
    assert class_sentence('fear', {'body': 'tense body posture'}) == 'The fearful person has tense body posture.'
    with pytest.raises(ValueError, match='unknown level'): class_sentence('fear', {'posture': 'x'})

def test_prompt_tokens_and_length_policy(texts):
    clip = tiny_clip()
    q, mask = prompt_tokens(clip, texts['body'])
    assert torch.allclose(q[:, 0], clip.encode_text(texts['body'], normalize=False), atol=1e-5)
    assert mask[:, 0].all() and (mask.sum(1) == clip.tokenize(texts['body']).argmax(-1) + 1).all()
    with pytest.raises(ValueError, match='longer than'): too_long_texts(clip, texts['classes'])
    assert len(too_long_texts(clip, texts['classes'], 'truncate')) == 1
    assert MLPER(clip, texts).truncated_texts == [texts['classes'][label_set('caer_s').index('sadness')]]
    with pytest.raises(ValueError, match='longer than'): MLPER(clip, texts, too_long='error')

def test_cross_attention_queries_are_independent():
    torch.manual_seed(0)
    mca = ModalCrossAttention(32, heads=4)
    t, v = torch.randn(2, 6, 32), torch.randn(2, 10, 32)
    assert torch.allclose(mca(t, v)[:, :1], mca(t[:, :1], v), atol=1e-6)
    _, att = mca.attend(t, v)
    assert att.shape == (2, 4, 6, 10) and torch.allclose(att.sum(-1), torch.ones(2, 4, 6), atol=1e-6)

def test_level_weights_cannot_collapse():
    bce = torch.tensor([0.02, 0.4, 0.9])
    for mode in ('uncertainty', 'softmax'):
        w = LevelWeights(3, mode)
        opt = torch.optim.SGD(w.parameters(), lr=0.05)
        for _ in range(3000): opt.zero_grad(); w(bce).backward(); opt.step()
        lam = w.weights().detach()
        if mode == 'uncertainty': assert torch.allclose(lam, 1 / bce, rtol=1e-2) and (lam > 1).all()
        else: assert abs(lam.sum().item() - 3) < 1e-4
    assert torch.equal(LevelWeights(2, 'fixed').weights(), torch.ones(2))
    with pytest.raises(ValueError, match='lambda_mode'): LevelWeights(2, 'free')

def test_hard_negatives_and_switches(texts):
    torch.manual_seed(0)
    clip = tiny_clip()
    m = MLPER(clip, texts, train_image=False)
    tok = m.visual_tokens(torch.randn(8, 3, 3, 64, 64))
    y = torch.arange(8) % 7
    neg = m.negative_classes(tok, y)
    assert neg.shape == (8, 3) and (neg != y[:, None]).all()
    for j, l in enumerate(LEVELS):
        sims = torch.nn.functional.normalize(tok[:, j, 0], dim=-1) @ torch.nn.functional.normalize(clip.encode_text(texts[l]), dim=-1).T
        sims[torch.arange(8), y] = -2
        assert torch.equal(neg[:, j], sims.argmax(1))
    assert MLPER(clip, texts, align_levels=()).matching_logits(tok, y)[0].shape == (0, 8, 2)
    assert MLPERLoss(MLPER(clip, texts, align_levels=()))(m(tok), y).item() == pytest.approx(MLPERLoss(m, 0.)(m(tok), y).item(), rel=1e-6)
    with pytest.raises(ValueError, match='must be among'): MLPER(clip, texts, levels='face', align_levels='body')
    with pytest.raises(ValueError, match='hold the 3 levels'): m(tok[:, :2])

def test_recipe_and_parameter_groups(texts):
    clip = tiny_clip()
    m = MLPER(clip, texts)
    cfg = mlper_config(m)
    assert cfg.lr == (2e-5, 2e-5) and (cfg.opt, cfg.momentum, cfg.wd, cfg.schedule, cfg.gamma, cfg.epochs) == ('sgd', .9, 1e-4, 'exp_epoch', .9, 60)
    g = mlper_param_groups(m)
    assert len(g['image']) == len(list(clip.model.visual.parameters())) and any(p is m.level_weights.logits for p in g['heads'])
    assert sum(map(len, mlper_splitter(m))) == sum(p.requires_grad for p in m.parameters())
    assert mlper_config(m, lr={'image': 1e-4, 'heads': 1e-2}).lr == (1e-4, 1e-2)
    clip.model.ln_final.weight.requires_grad_(True)
    with pytest.raises(ValueError, match='text tower must be frozen'): mlper_param_groups(m)

def test_learns_what_only_the_context_shows(texts):
    "Class evidence only in the context level's class token: MLPER learns it, a face-only model cannot."
    torch.manual_seed(0)
    clip = tiny_clip()
    D, T = clip.embed_dim, 17
    protos = torch.nn.functional.normalize(torch.randn(7, D), dim=-1) * 8
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 7
        x = torch.randn(n, 3, T, D, generator=g)
        x[:, 2, 0] += protos[y]
        return x, y
    train, valid, test = make(420, 1), make(70, 2), make(210, 3)
    acc = {}
    for lv in (LEVELS, ('face',)):
        m = MLPER(clip, mlper_texts('caer_s', lv), levels=lv, train_image=False)
        train_on_tokens(m, train, valid, mlper_config(m, epochs=8, lr=0.05))
        p, t = class_probabilities(m, [test])
        acc[lv] = (p.argmax(1) == t).float().mean().item()
    assert acc[LEVELS] > 0.9 and acc[('face',)] < 0.3, acc

def test_train_mlper_end_to_end(tmp_path):
    from emonb.synth import SyntheticWorld, write_dataset
    write_dataset(SyntheticWorld(seed=5), tmp_path/'d', 'caer_s', {'train': 56, 'test': 14})
    write_dataset(SyntheticWorld(seed=5, occlusion=1.), tmp_path/'o', 'caer_s', {'test': 14})
    df = caer_s_with_boxes(tmp_path/'d')
    learn, met = train_mlper(df, tiny_clip(), tmp_path/'run', config=mlper_config(epochs=1, lr=(1e-4, 1e-2)), bs=8, quiet=True)
    assert met['n'] == 14 and len(met['confusion']) == 7
    run = json.loads((tmp_path/'run'/'report'/'metrics.json').read_text())['run']
    assert run['method'] == 'mlper' and run['n_val'] > 0 and run['config']['lr'] == [1e-4, 1e-2] and len(run['truncated_texts']) == 1
    assert (tmp_path/'run'/'models'/'checkpoints'/'best.pth').exists()
    occ = evaluate_mlper(learn, caer_s_with_boxes(tmp_path/'o'))
    assert occ['n'] == 14
    with pytest.raises(ValueError, match="no 'test' rows"): train_mlper(df[df.split != 'test'], tiny_clip(), tmp_path/'x')
    with pytest.raises(FileExistsError): train_mlper(df, tiny_clip(), tmp_path/'run')

def test_train_mlper_from_a_window_cache_equals_images(tmp_path, monkeypatch):
    "Without augmentation, a run from the window cache (cache=True: under EMONB_HOME) is the run from the images: same losses and test metrics."
    from emonb.synth import SyntheticWorld, write_dataset
    from emonb.cache import CachedDataLoaders
    monkeypatch.setenv('EMONB_HOME', str(tmp_path/'home'))
    write_dataset(SyntheticWorld(seed=5), tmp_path/'d', 'caer_s', {'train': 56, 'test': 14})
    df = caer_s_with_boxes(tmp_path/'d')
    kw = dict(config=mlper_config(epochs=1, lr=(1e-4, 1e-2)), bs=8, augment='none', quiet=True)
    clip = lambda: (torch.manual_seed(0), tiny_clip())[1]   # the tiny CLIP is randomly initialised: the same weights for both runs
    li, mi = train_mlper(df, clip(), tmp_path/'images', **kw)
    lc, mc = train_mlper(df, clip(), tmp_path/'cached', cache=True, **kw)
    assert isinstance(lc.dls, CachedDataLoaders) and mc['run']['data'].startswith(str(tmp_path/'home'/'cache'/'levels-'))
    assert lc.recorder.values == li.recorder.values and (mc['war'], mc['uar']) == (mi['war'], mi['uar'])
    la, ma = train_mlper(df, tiny_clip(), tmp_path/'augmented', cache=True, config=kw['config'], bs=8, quiet=True)   # the cache is reused
    assert ma['run']['data'] == mc['run']['data'] and len(list((tmp_path/'home'/'cache').iterdir())) == 1
