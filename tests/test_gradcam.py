"Grad-CAM (emonb.gradcam): localisation, agreement with autograd, hooks removed, ViT token layouts, levels of the multi-level models, errors, figures."
import copy
import pytest
import torch
from torch import nn
import torch.nn.functional as F
import pandas as pd
from emonb.gradcam import grad_cam, gradcam_map, tokens_to_grid, grid_shape, cam_levels, token_batch_first, plot_gradcam, save_figure, write_gradcam_figures
from emonb.encoders import default_layer


class ColourNet(nn.Module):
    "Detector 0 fires on red, detector 1 on blue; logit c = mean response of detector c (over one quadrant if given)."
    def __init__(self, quadrant=None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.ReLU())
        with torch.no_grad():
            w = self.features[0].weight; w.zero_()
            w[0, 0], w[0, 2], w[1, 2], w[1, 0] = 1 / 9, -1 / 9, 1 / 9, -1 / 9
        self.quadrant = quadrant

    def forward(self, x):
        a = self.features(x)
        if self.quadrant is not None:
            h, w = a.shape[-2] // 2, a.shape[-1] // 2
            r, c = divmod(self.quadrant, 2)
            a = a[..., r * h:(r + 1) * h, c * w:(c + 1) * w]
        return a.mean((2, 3))


def quadrant_image(colours, size=32):
    x, q = torch.zeros(3, size, size), size // 2
    for quad, ch in colours.items():
        r, c = divmod(quad, 2)
        x[ch, r * q + q // 4: r * q + 3 * q // 4, c * q + q // 4: c * q + 3 * q // 4] = 1.
    return x


def quadrant_mass(maps):
    h, w = maps.shape[-2] // 2, maps.shape[-1] // 2
    q = torch.stack([maps[:, :h, :w], maps[:, :h, w:], maps[:, h:, :w], maps[:, h:, w:]], 1).flatten(2).sum(-1)
    return q / q.sum(1, keepdim=True)


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope='module')
def wclip():
    from emonb.worldclip import world_clip_encoder
    return world_clip_encoder()


@pytest.fixture(scope='module')
def cocoer(wclip):
    from emonb.cocoer import CocoER, COCOER_CPU
    torch.manual_seed(0)
    return CocoER(wclip, 'caer_s', **COCOER_CPU).eval()


@pytest.fixture(scope='module')
def mlper(wclip):
    from emonb.mlper import MLPER, mlper_texts
    torch.manual_seed(0)
    return MLPER(wclip, mlper_texts('caer_s'), train_image=False).eval()


def test_equation_by_hand():
    A = torch.tensor([[[[1., 2.], [0., 4.]], [[2., 0.], [2., 2.]]]])
    G = torch.stack([torch.ones(2, 2), -0.5 * torch.ones(2, 2)])[None]
    assert torch.allclose(gradcam_map(A, G), torch.tensor([[[0., 2.], [0., 3.]]]))


def test_class_discriminative_localisation():
    net = ColourNet()
    x = torch.stack([quadrant_image({0: 0, 3: 2}), quadrant_image({1: 0, 2: 2})])
    red, blue = quadrant_mass(grad_cam(net, x, target=0).maps['image']), quadrant_mass(grad_cam(net, x, target=1).maps['image'])
    assert red.argmax(1).tolist() == [0, 1] and blue.argmax(1).tolist() == [3, 2]
    assert (red.max(1).values > 0.9).all() and (blue.max(1).values > 0.9).all()


def test_quadrant_model_hirescam_vs_gradcam():
    "A score that reads only the top-left quadrant: HiResCAM puts its mass there; Grad-CAM's channel weights spread it over every red square."
    x = quadrant_image({0: 0, 1: 0, 2: 0, 3: 0})[None]
    net = ColourNet(quadrant=0)
    assert quadrant_mass(grad_cam(net, x, target=0, method='hirescam').maps['image'])[0, 0] > 0.99
    assert torch.allclose(quadrant_mass(grad_cam(net, x, target=0).maps['image'])[0], torch.full((4,), 0.25), atol=0.02)


def _direct(layer, inputs, target, score, tokens=None, count=None, index=None):
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o))
    try:
        xs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
        (g,) = torch.autograd.grad(score(*xs).gather(1, target[:, None]).sum(), store[0])
    finally: h.remove()
    A, G = store[0].detach(), g
    if tokens is not None: A, G = (tokens_to_grid(t, tokens) for t in (A, G))
    cam = F.relu((G.mean((2, 3), keepdim=True) * A).sum(1))
    return cam.view(-1, count, *cam.shape[1:])[:, index] if count else cam


def test_equals_autograd_cnn_and_vit(mlper, cocoer):
    from emonb.cocoer import random_batch, COCOER_CPU_SIZE, LEVEL_NAMES
    tgt = torch.tensor([3, 5])
    crops = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    cm = grad_cam(mlper, *crops, target=tgt)
    for j, l in enumerate(mlper.levels):
        ref = _direct(default_layer(mlper), crops, tgt, mlper.predict, tokens=(64, 64), count=3, index=j)
        assert torch.allclose(cm.raw[l], ref, atol=1e-5)
    cb = random_batch(2, COCOER_CPU_SIZE, 7)
    cc = grad_cam(cocoer, *cb[:4], target=tgt)
    for l in LEVEL_NAMES:
        assert torch.allclose(cc.raw[l], _direct(default_layer(cocoer.backbones[l]), cb[:4], tgt, cocoer.predict), atol=1e-5)
    assert [tuple(cc.maps[l].shape) for l in cc.levels] == [(2, 32, 32), (2, 32, 32), (2, 64, 64)]
    assert {l: tuple(cm.raw[l].shape) for l in cm.levels} == {l: (2, 8, 8) for l in ('face', 'body', 'context')}


def test_hooks_removed_and_model_untouched(cocoer):
    from emonb.cocoer import random_batch, COCOER_CPU_SIZE
    cb = random_batch(2, COCOER_CPU_SIZE, 7)
    grad_cam(cocoer, *cb[:4])
    assert n_hooks(cocoer) == 0
    with pytest.raises(ValueError, match="target class 9 is out of range for the model's 7 classes"):
        grad_cam(cocoer, *cb[:4], target=9)
    assert n_hooks(cocoer) == 0
    cocoer.train()
    try:
        grad_cam(cocoer, *cb[:4], levels='body')
        assert cocoer.training
    finally: cocoer.eval()
    assert all(p.grad is None for p in cocoer.parameters())


def test_vit_grid_and_seq_first(wclip):
    from open_clip.transformer import Transformer
    from emonb.kefer import KeferModel, ClipImageTower
    seq = copy.deepcopy(wclip)
    old = seq.model.visual.transformer
    new = Transformer(old.width, old.layers, old.resblocks[0].attn.num_heads, batch_first=False)
    new.load_state_dict(old.state_dict()); seq.model.visual.transformer = new.eval()
    shapes = []
    h = new.resblocks[-1].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    x = torch.randn(3, 3, 64, 64)
    seq.encode_image(x); h.remove()
    assert shapes == [(65, 3, 64)]
    protos = torch.randn(7, 64)
    a = KeferModel(ClipImageTower(wclip), protos, 6).eval()
    b = KeferModel(ClipImageTower(seq), protos, 6).eval()
    assert token_batch_first(a, default_layer(a)) is True and token_batch_first(b, default_layer(b)) is False
    ca, cb_ = grad_cam(a, x), grad_cam(b, x)
    assert ca.raw['image'].shape == (3, 8, 8) and ca.maps['image'].shape == (3, 64, 64)
    assert torch.allclose(ca.raw['image'], cb_.raw['image'], atol=1e-5)
    with pytest.raises(ValueError, match='ran on 65 rows for 3 samples'):
        grad_cam(b, x, batch_first=True)
    assert grid_shape(197, (224, 224)) == (1, 14, 14)


def test_last_block_output_is_flat(mlper):
    crops = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    c = grad_cam(mlper, *crops, layer='clip.model.visual.transformer.resblocks.2', levels='face')
    assert c.flat['face'].all() and float(c.maps['face'].abs().max()) == 0.


def test_levels_of_models(mlper, cocoer, wclip):
    from emonb.dferclip import DFERCLIP
    assert list(cam_levels(mlper)) == ['face', 'body', 'context']
    assert list(cam_levels(cocoer)) == ['head', 'body', 'context']
    d = DFERCLIP(wclip, ['a happy face.', 'a sad face.'], n_frames=3, train_image=False).eval()
    clips = torch.randn(2, 3, 3, 64, 64)
    c = grad_cam(d, clips)
    assert c.levels == ('frame 0', 'frame 1', 'frame 2') and c.raw['frame 1'].shape == (2, 8, 8)
    assert torch.equal(c.images['frame 2'], clips[:, 2])


def test_bad_settings(mlper, cocoer):
    import timm
    from emonb.cocoer import random_batch, COCOER_CPU_SIZE
    crops = [torch.randn(1, 3, 64, 64) for _ in range(3)]
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['posture'\] for MLPER"):
        grad_cam(mlper, *crops, levels='posture')
    cb = random_batch(1, COCOER_CPU_SIZE, 7)
    with pytest.raises(ValueError, match=r"its levels are \['head', 'body', 'context'\]"):
        grad_cam(cocoer, *cb[:4], levels='face')
    r = timm.create_model('resnet10t', num_classes=3, channels=(8, 8, 16, 16)).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="layer 'layer9' is not a module of ResNet"): grad_cam(r, x, layer='layer9')
    with pytest.raises(ValueError, match='is not part of ResNet'): grad_cam(r, x, layer=nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match='out of range'): grad_cam(r, x, target=3)
    with pytest.raises(ValueError, match='out of range'): grad_cam(r, x, target=-1)
    with pytest.raises(ValueError, match='method must be one of'): grad_cam(r, x, method='gradcam++')
    with pytest.raises(ValueError, match='no default Grad-CAM layer for Sequential'):
        grad_cam(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), x)
    assert n_hooks(r) + n_hooks(cocoer) + n_hooks(mlper) == 0


def test_figures(tmp_path, cocoer):
    from emonb.cocoer import random_batch, COCOER_CPU_SIZE
    cb = random_batch(3, COCOER_CPU_SIZE, 7)
    cam = grad_cam(cocoer, *cb[:4])
    fig = plot_gradcam(cam, 'clip', true=cb[4].tolist())
    assert len(fig.axes) == 9 and [a.get_title() for a in fig.axes[:3]] == ['head', 'body', 'context']
    p = save_figure(fig, tmp_path/'f.png')
    assert p.read_bytes()[:4] == b'\x89PNG' and sorted(q.name for q in tmp_path.iterdir()) == ['f.png']
    df = write_gradcam_figures(cocoer, cb, tmp_path/'rep', n=3, per_figure=2)
    assert sorted(q.name for q in (tmp_path/'rep').iterdir() if not q.name.startswith('.')) == ['gradcam.csv', 'gradcam_000.png', 'gradcam_001.png']
    assert len(pd.read_csv(tmp_path/'rep'/'gradcam.csv')) == 3 and df.figure.tolist() == ['gradcam_000.png'] * 2 + ['gradcam_001.png']
    with pytest.raises(FileExistsError, match='overwrite=True'):
        write_gradcam_figures(cocoer, cb, tmp_path/'rep')
