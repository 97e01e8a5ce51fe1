"DFER-CLIP (emonb.dferclip) beyond its notebook (whose cells check the loss and gradients against emonb.testing.dferclip_literal_loss): parity of variant='official' with literal re-writes of the official code (zengqunzhao/DFER-CLIP), the recipe's parameter groups, and a small run that must learn."
import copy, glob, math, os, random
from dataclasses import replace
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from emonb.encoders import ClipEncoder, TemporalTransformer, register_model_configs
from emonb.dferclip import (DFERCLIP, dferclip_texts, dferclip_param_groups, dferclip_splitter, dferclip_config, dferclip_augment,
                            train_on_features, encode_frames, DFERCLIP_LRS, DFERCLIP_TEMPORAL, DFERCLIP_INPUTS)

@pytest.fixture(scope='module')
def texts(): return dferclip_texts('dfew')

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny models: one thread (conftest), restored afterwards

def tiny_clip(): return ClipEncoder.from_pretrained('emonb-tiny-vit')

def quickgelu_tiny_clip():
    import open_clip
    register_model_configs()
    return ClipEncoder(open_clip.create_model('emonb-tiny-vit', force_quick_gelu=True).eval(), open_clip.get_tokenizer('emonb-tiny-vit'))

# ---- parity with the official code (models/Temporal_Model.py, Generate_Model.py, Prompt_Learner.py; dataloader/*; main.py)

def official_temporal(x, sd, heads):
    "Temporal_Transformer_Cls.forward on a state dict in emonb's names: cls first, + positions, Residual(PreNorm(einsum attention)), Residual(PreNorm(MLP with the tanh GELU)), the cls token."
    gelu = lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * torch.pow(v, 3))))
    ln = lambda v, n: F.layer_norm(v, v.shape[-1:], sd[f'{n}.weight'], sd[f'{n}.bias'])
    b, n, _ = x.shape
    x = torch.cat([sd['cls_token'].expand(b, -1, -1), x], 1) + sd['pos_embedding'][:, :n + 1]
    for i in sorted({int(k.split('.')[1]) for k in sd if k.startswith('blocks.')}):
        p = f'blocks.{i}.'
        q, k, v = (t.reshape(b, n + 1, heads, -1).permute(0, 2, 1, 3) for t in (ln(x, p + 'norm1') @ sd[p + 'qkv.weight'].T).chunk(3, -1))
        a = (torch.einsum('bhid,bhjd->bhij', q, k) * q.shape[-1] ** -0.5).softmax(-1)
        o = torch.einsum('bhij,bhjd->bhid', a, v).permute(0, 2, 1, 3).reshape(b, n + 1, -1)
        x = o @ sd[p + 'out.weight'].T + sd[p + 'out.bias'] + x
        h = gelu(ln(x, p + 'norm2') @ sd[p + 'mlp.0.weight'].T + sd[p + 'mlp.0.bias'])
        x = h @ sd[p + 'mlp.3.weight'].T + sd[p + 'mlp.3.bias'] + x
    return x[:, 0]

@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_temporal_model_matches_the_official_code(dtype, tol):
    torch.manual_seed(0)
    ours = TemporalTransformer(512, 16, 2, 8, 64, 1024).to(dtype)           # the defaults are the official code's
    own = TemporalTransformer(512, 16, 2, 8, 64, 1024, **DFERCLIP_TEMPORAL['emonb']).to(dtype)
    own.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(3, 16, 512, dtype=dtype) * 3
    with torch.no_grad(): ref = official_temporal(x, ours.state_dict(), 8)
    assert (ours(x) - ref).abs().max().item() <= tol
    assert (own(x) - ref).abs().max().item() > 0.1                          # emonb's variant is another model

def openai_block(x, sd, pre, heads, mask=None):
    ln = lambda z, n: F.layer_norm(z, z.shape[-1:], sd[f'{pre}{n}.weight'], sd[f'{pre}{n}.bias'])
    L, N, W = x.shape
    q, k, v = ((ln(x, 'ln_1') @ sd[f'{pre}attn.in_proj_weight'].T + sd[f'{pre}attn.in_proj_bias']).chunk(3, -1))
    q, k, v = (t.reshape(L, N * heads, W // heads).transpose(0, 1) for t in (q, k, v))
    s = q @ k.transpose(1, 2) / math.sqrt(W // heads) + (0 if mask is None else mask)
    x = x + (s.softmax(-1) @ v).transpose(0, 1).reshape(L, N, W) @ sd[f'{pre}attn.out_proj.weight'].T + sd[f'{pre}attn.out_proj.bias']
    h = ln(x, 'ln_2') @ sd[f'{pre}mlp.c_fc.weight'].T + sd[f'{pre}mlp.c_fc.bias']
    return x + (h * torch.sigmoid(1.702 * h)) @ sd[f'{pre}mlp.c_proj.weight'].T + sd[f'{pre}mlp.c_proj.bias']

def official_logits(images, sd, heads, texts, tokenizer, ctx, temporal_sd):
    "GenerateModel.forward with OpenAI's VisionTransformer, the official PromptLearner ('end': SOS, ctx, text) and TextEncoder, / 0.01."
    layers = lambda pre: sorted({int(k[len(pre):].split('.')[0]) for k in sd if k.startswith(pre)})
    ln = lambda z, n: F.layer_norm(z, z.shape[-1:], sd[f'{n}.weight'], sd[f'{n}.bias'])
    n, t = images.shape[:2]
    x = F.conv2d(images.flatten(0, 1), sd['visual.conv1.weight'], stride=sd['visual.conv1.weight'].shape[-1]).flatten(2).permute(0, 2, 1)
    x = torch.cat([sd['visual.class_embedding'] + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], 1) + sd['visual.positional_embedding']
    x = ln(x, 'visual.ln_pre').permute(1, 0, 2)
    for i in layers('visual.transformer.resblocks.'): x = openai_block(x, sd, f'visual.transformer.resblocks.{i}.', heads)
    f = (ln(x.permute(1, 0, 2)[:, 0], 'visual.ln_post') @ sd['visual.proj']).view(n, t, -1)
    v = official_temporal(f, temporal_sd, 8); v = v / v.norm(dim=-1, keepdim=True)
    M = ctx.shape[1]
    tok = torch.cat([tokenizer(' '.join(['X'] * M) + ' ' + s) for s in texts])
    emb = sd['token_embedding.weight'][tok]
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + M:]], 1) + sd['positional_embedding']
    L = x.shape[1]
    mask = torch.empty(L, L, dtype=x.dtype).fill_(float('-inf')).triu_(1)
    x = x.permute(1, 0, 2)
    for i in layers('transformer.resblocks.'): x = openai_block(x, sd, f'transformer.resblocks.{i}.', heads, mask)
    x = ln(x.permute(1, 0, 2), 'ln_final')
    tf = x[torch.arange(len(texts)), tok.argmax(-1)] @ sd['text_projection']; tf = tf / tf.norm(dim=-1, keepdim=True)
    return v @ tf.t() / 0.01

def test_model_matches_the_official_code(texts):
    torch.manual_seed(0)
    clip = quickgelu_tiny_clip()
    m = DFERCLIP(clip, texts, n_frames=16).double().eval()
    with torch.no_grad(): m.prompts.ctx.normal_(0, 1.)
    sd = {k: v.detach() for k, v in clip.model.state_dict().items()}
    x = torch.rand(2, 3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = official_logits(x, sd, 2, texts, clip.tokenizer, m.prompts.ctx.detach(), m.temporal.state_dict())
        assert (m(x) - ref).abs().max().item() <= 1e-10 and ref.abs().max() > 5

def test_inputs_match_the_official_loader(tmp_path):
    "VideoDataset: TSN offsets (numpy), the dataset's transforms (random), GroupResize for testing, [0, 1] pixels; the same draws, the same pixels."
    import torchvision
    from emonb.data import LoadTrainClip, LoadEvalClip
    rs = np.random.RandomState(0)
    folders = []
    for c, (n, w, h) in enumerate([(5, 40, 40), (23, 48, 36), (40, 36, 52)]):
        d = tmp_path/f'{c}'; d.mkdir(); folders.append(str(d))
        for i in range(n): Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(d/f'{i:05d}.png')
    def offsets(n, t, train):
        if train and n // t > 0: return np.multiply(list(range(t)), n // t) + np.random.randint(n // t, size=t)
        if not train and n > t: return np.array([int(n / float(t) / 2.0 + n / float(t) * x) for x in range(t)])
        return np.pad(np.array(list(range(n))), (0, t - n), 'edge')
    def crop(g, size):
        W, H = g[0].size
        for _ in range(10):
            a = random.uniform(0.08, 1.0) * (W * H); r = random.uniform(3. / 4, 4. / 3)
            w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if random.random() < 0.5: w, h = h, w
            if w <= W and h <= H:
                x1, y1 = random.randint(0, W - w), random.randint(0, H - h)
                return [im.crop((x1, y1, x1 + w, y1 + h)).resize((size, size), Image.BILINEAR) for im in g]
        g = [torchvision.transforms.Resize(size)(im) for im in g]
        x1, y1 = random.randint(0, g[0].size[0] - size), random.randint(0, g[0].size[1] - size)
        return [im.crop((x1, y1, x1 + size, y1 + size)) for im in g]
    def flip(g): return [im.transpose(Image.FLIP_LEFT_RIGHT) for im in g] if random.random() < 0.5 else g
    def bright(g): f = random.uniform(0.5, 1.5); return [torchvision.transforms.functional.adjust_brightness(im, f) for im in g]
    def rotate(g): a = random.uniform(-4, 4); return [im.rotate(a) for im in g]
    tfs = {'dfew': lambda g, s: flip(crop(bright(g), s)), 'ferv39k': lambda g, s: flip(crop(rotate(g), s)), 'mafw': lambda g, s: flip(crop(g, s))}
    def official(folder, train, dataset, t=16, size=32):
        paths = sorted(glob.glob(os.path.join(folder, '*')))
        g = [Image.open(paths[int(p)]).convert('RGB') for p in offsets(len(paths), t, train)]
        g = tfs[dataset](g, size) if train else [im.resize((size, size), Image.BILINEAR) for im in g]
        return torch.from_numpy(np.concatenate(g, axis=2)).permute(2, 0, 1).float().div(255).reshape(-1, 3, size, size)
    for dataset in ('dfew', 'ferv39k', 'mafw'):
        kw = dict(n_frames=16, size=32, augment=dferclip_augment(dataset), sampling=DFERCLIP_INPUTS['official']['sampling'])
        for folder in folders:
            row = pd.Series({'path': folder})
            assert torch.equal(LoadEvalClip(**kw).encodes(row).float() / 255, official(folder, False, dataset))
            for seed in range(3):
                random.seed(seed); np.random.seed(seed); ours = LoadTrainClip(**kw).encodes(row).float() / 255
                random.seed(seed); np.random.seed(seed)
                assert torch.equal(ours, official(folder, True, dataset)), (dataset, folder, seed)

def test_recipe_matches_the_official_optimiser(texts):
    "main.py: SGD (temporal 1e-2, image 1e-5, prompts 1e-3; momentum 0.9, wd 1e-4 on all), MultiStepLR(30, 40): the same steps as make_learner's."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.losses import CrossEntropyLossFlat
    from emonb.learner import make_learner, lr_schedule
    torch.manual_seed(0)
    ours = DFERCLIP(quickgelu_tiny_clip(), texts, n_frames=2).double()
    ref = copy.deepcopy(ours)
    cfg = dferclip_config(ours)
    learn = make_learner(DataLoaders(DataLoader([]), DataLoader([])), ours, CrossEntropyLossFlat(), replace(cfg, checkpoint=False), splitter=dferclip_splitter)
    learn.create_opt(); learn.opt.set_hyper('lr', np.array(lr_schedule(cfg)(0.)))
    opt = torch.optim.SGD([{'params': ref.temporal.parameters(), 'lr': 1e-2}, {'params': ref.clip.model.visual.parameters(), 'lr': 1e-5},
                           {'params': [ref.prompts.ctx], 'lr': 1e-3}], lr=1e-2, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 40], gamma=0.1)
    x, y = torch.rand(2, 2, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 6])
    for _ in range(2):
        for m, o in ((ours, learn.opt), (ref, opt)): o.zero_grad(); F.cross_entropy(m(x), y).backward(); o.step()
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters())) <= 1e-12
    for e in range(50):
        lr = lr_schedule(cfg)((e + 0.5) / 50)
        assert np.allclose([lr[1], lr[0], lr[2]], [g['lr'] for g in opt.param_groups], rtol=1e-12, atol=0); sched.step()
    assert (cfg.monitor, cfg.precision) == ('war', 'fp32')

def test_variants_differ(texts):
    clip = tiny_clip()
    off, own = DFERCLIP(clip, texts, n_frames=4), DFERCLIP(clip, texts, n_frames=4, variant='emonb')
    own.temporal.load_state_dict(off.temporal.state_dict(), strict=False)
    with torch.no_grad():
        own.prompts.ctx.copy_(off.prompts.ctx)
        f = torch.randn(3, 4, clip.embed_dim) * 3
        assert (off(f) - own(f)).abs().max() > 0.1
    assert DFERCLIP_INPUTS['official'] != DFERCLIP_INPUTS['emonb'] and dferclip_augment('dfew') != dferclip_augment('dfew', 'emonb')
    assert dferclip_config(off).monitor != dferclip_config(own).monitor
    with pytest.raises(ValueError, match="DFER-CLIP has no variant 'code'"): DFERCLIP(clip, texts, variant='code')

# ---- the recipe and training

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
    m = DFERCLIP(clip, texts, n_frames=T, train_image=False)   # the official variant
    _, met = train_on_features(m, (xtr[70:], ytr[70:]), (xtr[:70], ytr[:70]), (xte, yte), dferclip_config(m, epochs=15))
    assert met['war'] > 0.5, met['war']

def test_encode_frames_checks_size():
    with pytest.raises(ValueError, match='the CLIP takes 64 px'): encode_frames(tiny_clip(), np.zeros((1, 2, 32, 32, 3), np.uint8))

def test_train_dferclip_from_a_frame_cache(tmp_path, monkeypatch):
    "cache=True builds the frame cache of the whole table under EMONB_HOME, trains from it (the official augmentation on the device), and scores the test clips as the frame folders do."
    from emonb.synth import SyntheticWorld, write_dataset
    from emonb.data import read_dfew, split_validation, clip_dataloaders, split_dataloader
    from emonb.cache import CachedDataLoaders, ClipCache, ClipAugment
    from emonb.dferclip import train_dferclip
    monkeypatch.setenv('EMONB_HOME', str(tmp_path/'home'))
    write_dataset(SyntheticWorld(seed=2), tmp_path/'d', 'dfew', {'train': 21, 'test': 7})
    df = split_validation(read_dfew(tmp_path/'d'), 0.2, seed=0)
    clip = tiny_clip()
    learn, met = train_dferclip(df, clip, tmp_path/'run', n_frames=4, bs=4, config=dferclip_config(epochs=1), cache=True, quiet=True)
    folders = list((tmp_path/'home'/'cache').iterdir())
    assert len(folders) == 1 and folders[0].name.startswith('clips-') and met['run']['data'] == str(folders[0])
    assert isinstance(learn.dls, CachedDataLoaders) and len(ClipCache(folders[0])) == len(df) and met['n'] == 7
    assert [f.preset for f in learn.dls.train.after_batch.fs if isinstance(f, ClipAugment)] == ['dfew']
    r = met['run']
    assert (r['variant'], r['normalize'], r['augment'], r['sampling'], r['model']) == ('official', 'none', 'dfew', 'official', {'variant': 'official'})
    udls = clip_dataloaders(df, 4, clip.image_size, 4, normalize='none', sampling='official')
    with learn.no_bar():
        s_u = learn.get_preds(dl=split_dataloader(udls, df, 'test'))[0]
        s_c = learn.get_preds(dl=split_dataloader(learn.dls, df, 'test'))[0]
    assert torch.allclose(s_u, s_c, atol=1e-5)   # evaluation reads the same pixels
    with pytest.raises(ValueError, match='not both'): train_dferclip(df, clip, tmp_path/'run2', cache=True, dls=learn.dls)
