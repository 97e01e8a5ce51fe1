"DFER-CLIP (emonb.dferclip): loss and gradients against a literal re-computation of the paper's eqs. (1)-(5), the recipe's parameter groups, and a small run that must learn."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from emonb.encoders import ClipEncoder
from emonb.dferclip import (DFERCLIP, dferclip_texts, dferclip_param_groups, dferclip_splitter, dferclip_config,
                            train_on_features, encode_frames, DFERCLIP_LRS)

@pytest.fixture(scope='module')
def texts(): return dferclip_texts('dfew')

def tiny_clip(): return ClipEncoder.from_pretrained('emonb-tiny-vit')

def literal_loss(m, x, y):
    "Eqs. (1)-(5) of the paper, written out independently of the model's batched code."
    cm, B, T = m.clip.model, x.shape[0], x.shape[1]
    f = torch.stack([cm.encode_image(x[:, i]) for i in range(T)], 1)
    if m.temporal is None: fV = f.mean(1)
    else:
        tm = m.temporal
        z = torch.cat([tm.cls_token.expand(B, 1, -1), f], 1) + tm.pos_embedding[:, :T + 1]
        for blk in tm.blocks:
            q, k, v = (blk.norm1(z) @ blk.qkv.weight.T).chunk(3, -1)
            d = q.shape[-1] // blk.heads
            heads = [torch.softmax(q[..., j*d:(j+1)*d] @ k[..., j*d:(j+1)*d].transpose(1, 2) / math.sqrt(d), -1) @ v[..., j*d:(j+1)*d]
                     for j in range(blk.heads)]
            z = z + torch.cat(heads, -1) @ blk.out.weight.T + blk.out.bias
            z = z + F.gelu(blk.norm2(z) @ blk.mlp[0].weight.T + blk.mlp[0].bias) @ blk.mlp[3].weight.T + blk.mlp[3].bias
        fV = tm.norm(z[:, 0])
    pl, fT = m.prompts, []
    for kk, text in enumerate(pl.texts):
        ids = m.clip.tokenize([text])[0]; n = int(ids.argmax()) - 1
        e, c = cm.token_embedding(ids), pl.ctx[kk if pl.class_specific else 0]
        seq = {'front': [e[:1], c, e[1:n + 1]], 'end': [e[:1], e[1:n + 1], c],
               'middle': [e[:1], c[:pl.n_ctx // 2], e[1:n + 1], c[pl.n_ctx // 2:]]}[pl.position]
        P, eos = torch.cat(seq + [e[n + 1:]])[:len(ids)], sum(len(s) for s in seq)
        h = cm.ln_final(cm.transformer((P + cm.positional_embedding)[None], attn_mask=cm.attn_mask))
        fT.append(h[0, eos] @ cm.text_projection)
    cos = torch.stack([torch.stack([fV[i] @ t / (fV[i].norm() * t.norm()) for t in fT]) for i in range(B)])
    p = torch.exp(cos / m.tau) / torch.exp(cos / m.tau).sum(1, keepdim=True)
    return -torch.log(p[torch.arange(B), y]).mean()

@pytest.mark.parametrize('kw', [{}, dict(temporal=False), dict(depth=2, class_specific=False, position='middle'),
                                dict(position='end', n_ctx=2), dict(train_image=False, tau=0.07)])
def test_loss_and_gradients_match_the_equations(texts, kw):
    torch.manual_seed(0)
    m = DFERCLIP(tiny_clip(), texts, n_frames=3, n_ctx=kw.pop('n_ctx', 4), **kw).double()
    with torch.no_grad(): m.prompts.ctx.normal_(0, 1.)
    x = torch.randn(2, 3, 3, 64, 64, dtype=torch.float64); y = torch.tensor([1, 6])
    params = [p for p in m.parameters() if p.requires_grad]
    loss, ref = F.cross_entropy(m(x), y), literal_loss(m, x, y)
    assert abs(loss.item() - ref.item()) < 1e-9
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < 1e-8

def test_parameter_groups_and_recipe(texts):
    clip = tiny_clip()
    m = DFERCLIP(clip, texts, n_frames=4)
    g = dferclip_param_groups(m)
    assert [len(v) > 0 for v in g.values()] == [True, True, True] and g['context'] == [m.prompts.ctx]
    assert sum(map(len, dferclip_splitter(m))) == sum(p.requires_grad for p in m.parameters())
    cfg = dferclip_config(m)
    assert cfg.lr == (1e-5, 1e-2, 1e-3) and cfg.milestones == (30, 40) and (cfg.opt, cfg.momentum, cfg.wd) == ('sgd', 0.9, 1e-4)
    assert dferclip_config(DFERCLIP(clip, texts, temporal=False, train_image=False)).lr == (DFERCLIP_LRS['context'],)
    clip.model.ln_final.weight.requires_grad_(True)
    with pytest.raises(ValueError, match='text tower must be frozen'): dferclip_param_groups(m)

def test_temporal_model_learns_a_one_frame_signal(texts):
    "Class evidence in one random frame of eight, hidden among noise frames: the temporal model must find it."
    torch.manual_seed(0)
    clip = tiny_clip()
    D, T, n = clip.embed_dim, 8, 420
    protos = F.normalize(torch.randn(7, D), dim=-1) * 10
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 7
        x = torch.randn(n, T, D, generator=g)
        x[torch.arange(n), torch.randint(0, T, (n,), generator=g)] += protos[y]
        return x, y
    (xtr, ytr), (xte, yte) = make(n, 1), make(210, 2)
    m = DFERCLIP(clip, texts, n_frames=T, train_image=False)
    _, met = train_on_features(m, (xtr[70:], ytr[70:]), (xtr[:70], ytr[:70]), (xte, yte), dferclip_config(m, epochs=15))
    assert met['war'] > 0.5, met['war']

def test_encode_frames_checks_size():
    with pytest.raises(ValueError, match='the CLIP takes 64 px'): encode_frames(tiny_clip(), np.zeros((1, 2, 32, 32, 3), np.uint8))

def test_train_dferclip_from_a_frame_cache(tmp_path, monkeypatch):
    "cache=True builds the frame cache of the whole table under EMONB_HOME, trains from it, and scores the test clips as the frame folders do."
    from emonb.synth import SyntheticWorld, write_dataset
    from emonb.data import read_dfew, split_validation, clip_dataloaders, split_dataloader
    from emonb.cache import CachedDataLoaders, ClipCache
    from emonb.dferclip import train_dferclip, _use_clip_stats
    monkeypatch.setenv('EMONB_HOME', str(tmp_path/'home'))
    write_dataset(SyntheticWorld(seed=2), tmp_path/'d', 'dfew', {'train': 21, 'test': 7})
    df = split_validation(read_dfew(tmp_path/'d'), 0.2, seed=0)
    clip = tiny_clip()
    learn, met = train_dferclip(df, clip, tmp_path/'run', n_frames=4, bs=4, config=dferclip_config(epochs=1), cache=True, quiet=True)
    folders = list((tmp_path/'home'/'cache').iterdir())
    assert len(folders) == 1 and folders[0].name.startswith('clips-') and met['run']['data'] == str(folders[0])
    assert isinstance(learn.dls, CachedDataLoaders) and len(ClipCache(folders[0])) == len(df) and met['n'] == 7
    udls = clip_dataloaders(df, 4, clip.image_size, 4, normalize='none'); _use_clip_stats(udls, clip.image_mean_std)
    with learn.no_bar():
        s_u = learn.get_preds(dl=split_dataloader(udls, df, 'test'))[0]
        s_c = learn.get_preds(dl=split_dataloader(learn.dls, df, 'test'))[0]
    assert torch.allclose(s_u, s_c, atol=1e-5)   # evaluation reads the same pixels
    with pytest.raises(ValueError, match='not both'): train_dferclip(df, clip, tmp_path/'run2', cache=True, dls=learn.dls)
