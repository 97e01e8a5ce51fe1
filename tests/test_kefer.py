"""KEFER's variant='official' against the official code (hangyu94/KE2NT), written out here independently of emonb:
the loss and its gradients, the text prototypes, the face-embedding head, the schedule and the inputs (fast versions of
the parity section of nbs/10_kefer.ipynb), and what the variants change."""
import json, math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emonb.core import VARIANTS, label_set
from emonb.encoders import ClipEncoder
from emonb.losses import KeferLoss
from emonb.kefer import (KeferModel, resnet_encoder, text_prototypes, kefer_texts, kefer_variant, kefer_config, kefer_official_lr,
                         kefer_official_transforms, clip_temperature, lr_step_callbacks, KEFER_OFFICIAL_TEMPLATE)

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny models: one thread (conftest), restored afterwards
RAF = label_set('rafdb')


# ---- the official computations, written out (swint_raf_main.py, models/backbone_raf.py, models/swin.py, utils/*.py)

def official_losses(feature_e, feature_n, feature_t, scale, label, neutral=6):
    "(total, L_s, L_t, L_c, logits) of one official training step."
    logits = scale * F.normalize(feature_e, dim=-1) @ F.normalize(feature_t, dim=-1).t()
    feature_l = torch.stack([feature_t[c] for c in label])                      # raw class text features
    keep = torch.where(label != neutral)[0]
    d_f = (feature_e - feature_n)[keep]
    d_t = (feature_l - feature_t[neutral].repeat(len(label), 1))[keep]
    L_t = (1 - F.cosine_similarity(d_f / d_f.norm(dim=-1, keepdim=True), d_t / d_t.norm(dim=-1, keepdim=True))).mean()
    L_s = F.cross_entropy(logits, label)
    a, p, n = (z / z.norm(dim=-1, keepdim=True) for z in (feature_l[keep], feature_e[keep], feature_n[keep]))
    L_c = (a @ n.t() - a @ p.t() + 2).mean()                                     # every anchor against every sample
    return L_s + L_t + L_c, L_s, L_t, L_c, logits


def official_text_features(m, tokens):
    x = m.token_embedding(tokens) + m.positional_embedding
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ m.text_projection


OFFICIAL_PROMPTS = [f"a photo of a person making {a} {w} facial expression." for a, w in
                    [('a', 'surprise'), ('a', 'fear'), ('a', 'disgust'), ('a', 'happiness'), ('a', 'sadness'), ('an', 'anger'),
                     ('a', 'neutral')]]


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    T = (torch.randn(7, 512) * torch.linspace(0.4, 3.0, 7)[:, None]).float()   # raw features of different lengths
    net = KeferModel(resnet_encoder('resnet18', 512, channels=(8, 16, 32, 64), head='face_embedding'), T, 6).to(dtype).train()
    return net, T.to(dtype)


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_loss_and_gradients_match_official(dtype, tol):
    net, T = _model(dtype)
    x, y = torch.randn(24, 3, 32, 32, dtype=dtype), torch.randint(0, 7, (24,))
    params = [p for p in net.parameters() if p.requires_grad]
    loss = KeferLoss(net.prototypes, 6, tau=net.tau)
    v, n = net(x)
    ours = [loss((v, n), y), loss.last['L_s'], loss.last['L_t'], loss.last['L_c'], net.logits(v)]
    fe = net.visual(x)
    lin1, lin2 = net.neutral_transform[0], net.neutral_transform[2]
    fn = F.linear(F.relu(F.linear(fe, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    ref = official_losses(fe, fn, T, 1 / net.tau, y)
    for a, b in zip(ours, ref): assert (a - b).abs().max().item() <= tol
    for a, b in zip(torch.autograd.grad(ours[0], params), torch.autograd.grad(ref[0], params)):
        assert (a - b).abs().max().item() <= tol


def test_variants_differ_where_they_should():
    torch.manual_seed(1)
    T = torch.randn(7, 64) * torch.linspace(0.4, 3.0, 7)[:, None]
    y = torch.randint(0, 7, (48,))
    v = F.normalize(T[y], dim=-1) + 0.05 * torch.randn(48, 64)
    n = v - (T[y] - T[6])                      # solves the official L_t exactly
    out = {}
    for variant in VARIANTS:
        loss = KeferLoss(T, 6, variant=variant); loss((v, n), y); out[variant] = {k: t.item() for k, t in loss.last.items()}
    ref = official_losses(v, n, T, 100., y)
    assert abs(out['official']['L_t'] - ref[2].item()) < 1e-5 and abs(out['official']['L_c'] - ref[3].item()) < 1e-5
    assert abs(out['official']['L_t']) < 1e-5 and out['emonb']['L_t'] > 0.02          # normalised prototypes: another direction
    assert abs(out['paper']['L_t'] - out['official']['L_t']) < 1e-6                       # the paper's L_t: raw, as the code
    assert abs(out['paper']['L_c'] - out['official']['L_c']) > 0.1                        # per sample vs all pairs
    assert len({round(o['L_s'], 5) for o in out.values()}) == 1
    assert KeferLoss(T, 6, variant='emonb', all_pairs=True).all_pairs                      # explicit options win
    with pytest.raises(ValueError, match="KEFER has no variant 'code'"): KeferLoss(T, 6, variant='code')


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_prototypes_match_official(dtype, tol):
    assert kefer_texts(RAF, KEFER_OFFICIAL_TEMPLATE, articles=True) == OFFICIAL_PROMPTS
    torch.manual_seed(0)
    clip = ClipEncoder.from_pretrained('emonb-tiny-vit', activation='quickgelu')
    clip.model.to(dtype)
    ours = text_prototypes(RAF, clip)
    with torch.no_grad(): ref = official_text_features(clip.model, clip.tokenize(OFFICIAL_PROMPTS))
    assert ours.dtype == dtype and (ours - ref).abs().max().item() <= tol
    assert ref.norm(dim=-1).std() > 0.05                                                 # raw: lengths differ
    unit = text_prototypes(RAF, clip, variant='emonb')
    assert torch.allclose(unit.norm(dim=-1), torch.ones(7, dtype=dtype))
    assert abs(clip_temperature(clip) - 1 / clip.model.logit_scale.exp().item()) < 1e-12


def test_face_embedding_head_matches_official():
    torch.manual_seed(0)
    enc = resnet_encoder('resnet18', 512, channels=(8, 16, 32, 64), head='face_embedding').double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    def bn(z, m):
        mean, var = (z.mean(0), z.var(0, unbiased=False)) if m.training else (m.running_mean, m.running_var)
        return (z - mean) / torch.sqrt(var + 2e-5) * m.weight + m.bias
    for train in (True, False):
        enc.train(train)
        with torch.no_grad():
            h, head = enc.backbone(x), enc.proj
            ref = bn(F.linear(bn(F.linear(h, head[0].weight), head[1]), head[2].weight), head[3])
            assert (enc(x) - ref).abs().max().item() <= 1e-10


def test_schedule_matches_official():
    class Warmup(torch.optim.lr_scheduler.LRScheduler):      # utils/lr_scheduler.py, ConstantWarmupScheduler
        def __init__(self, opt, succ, w, lr): self.succ, self.w, self.lr0 = succ, w, lr; super().__init__(opt)
        def get_lr(self): return self.succ.get_last_lr() if self.last_epoch >= self.w else [self.lr0 for _ in self.base_lrs]
        def step(self, epoch=None):
            if self.last_epoch >= self.w: self.succ.step(epoch); self._last_lr = self.succ.get_last_lr()
            else: super().step(epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3, momentum=0.9, weight_decay=5e-4)
    sched = Warmup(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50.), 1, 1e-4)
    lrs = []
    for _ in range(50): lrs.append(opt.param_groups[0]['lr']); opt.step(); sched.step()
    assert max(abs(a - kefer_official_lr(e, 50, 2e-3)) for e, a in enumerate(lrs)) <= 1e-12
    cfg = kefer_config()
    assert (cfg.lr, cfg.momentum, cfg.wd, cfg.nesterov, cfg.epochs, cfg.warmup_epochs, cfg.schedule) == (2e-3, 0.9, 5e-4, False, 50, 1, 'warmup_cosine')
    assert lr_step_callbacks(cfg, None)[0] == 'epoch' and lr_step_callbacks(kefer_config('emonb'), None, variant='emonb')[0] == 'batch'
    assert kefer_config('emonb').warmup_epochs == 5.


def test_inputs_match_official():
    tvt = pytest.importorskip('torchvision.transforms')
    from fastai.vision.core import PILImage, TensorImage, image2tensor
    from fastai.data.transforms import IntToFloatTensor
    from fastai.vision.all import imagenet_stats
    from emonb.synth import SyntheticWorld
    train = tvt.Compose([tvt.Resize(112), tvt.RandomApply([tvt.RandomCrop(112, padding=4)], p=0.5), tvt.RandomHorizontalFlip(),
                         tvt.ToTensor(), tvt.Normalize(*imagenet_stats), tvt.RandomErasing(scale=(0.02, 0.25))])
    val = tvt.Compose([tvt.Resize(112), tvt.ToTensor(), tvt.Normalize(*imagenet_stats)])
    items, batch = kefer_official_transforms(112)
    def ours(im, split):
        x = PILImage(im)
        for t in items: x = t(x, split_idx=split)
        x = IntToFloatTensor()(TensorImage(image2tensor(x))[None])
        for t in batch: x = t(x, split_idx=split)
        return x[0]
    w = SyntheticWorld(seed=5)
    faces = [w.render_face(w.scene(i), size=100) for i in range(3)]
    erased = 0
    for s in range(30):
        im = faces[s % 3]
        torch.manual_seed(s); ref = train(im)
        torch.manual_seed(s); got = ours(im, 0)
        assert (got - ref).abs().max().item() <= 1e-5
        erased += int((ref == 0).all(0).any())
    assert 5 < erased < 25
    for im in faces: assert (ours(im, 1) - val(im)).abs().max().item() <= 1e-5


def test_variant_defaults_and_errors():
    assert [kefer_variant(v)['all_pairs'] for v in VARIANTS] == [True, False, False]
    assert [kefer_variant(v)['normalize_prototypes'] for v in VARIANTS] == [False, False, True]
    assert [kefer_variant(v)['head'] for v in VARIANTS] == ['face_embedding', 'linear', 'linear']
    with pytest.raises(ValueError, match="KEFER has no variant"): kefer_config('code')
    with pytest.raises(ValueError, match='head must be one of'): resnet_encoder(head='mlp')
    net = KeferModel(torch.nn.Identity(), torch.randn(7, 8) * 3, 6, variant='emonb')
    assert net.variant == 'emonb' and torch.allclose(net.prototypes.norm(dim=-1), torch.ones(7))


def test_train_kefer_records_the_variant(tmp_path):
    "A two-epoch official run on world faces: the report's run record, the per-batch learning rates and the optimiser."
    from emonb.synth import SyntheticWorld, write_dataset
    from emonb.data import read_rafdb, split_validation
    from emonb.kefer import train_kefer
    write_dataset(SyntheticWorld(seed=2), tmp_path/'raf', 'rafdb', {'train': 84, 'test': 28})
    df = split_validation(read_rafdb(tmp_path/'raf'), valid_pct=1/6, seed=0)
    T = torch.randn(7, 16) * torch.linspace(0.5, 2, 7)[:, None]
    learn, m = train_kefer(df, tmp_path/'k', prototypes=T, encoder_kw=dict(channels=(8, 16, 32, 64)), size=32, bs=16,
                           config=kefer_config(epochs=2, lr=0.1), progress=False)
    r = json.loads((tmp_path/'k'/'report'/'metrics.json').read_text())['run']
    assert (r['variant'], r['all_pairs'], r['normalize_prototypes'], r['head'], r['lr_steps'], r['augment']) == \
           ('official', True, False, 'face_embedding', 'epoch', 'kefer_official')
    lrs = np.array(learn.recorder.lrs).reshape(2, -1)
    assert np.allclose(lrs[0], 1e-4) and np.allclose(lrs[1], 0.1)
    assert torch.equal(learn.model.prototypes, T.float())          # raw prototypes kept
    _, m2 = train_kefer(df, tmp_path/'e', prototypes=T, encoder_kw=dict(channels=(8, 16, 32, 64)), size=32, bs=16,
                        config=kefer_config('emonb', epochs=2, lr=0.1), progress=False, variant='emonb')
    r2 = m2['run']
    assert (r2['variant'], r2['all_pairs'], r2['normalize_prototypes'], r2['head'], r2['lr_steps'], r2['augment']) == \
           ('emonb', False, True, 'linear', 'batch', 'kefer')
