"Exp-CLIP (emonb.expclip): determinism, video folders, the raw-image path, projection files, teacher caching."
from dataclasses import replace
from pathlib import Path
import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emonb.encoders import ClipEncoder, FeatureCache
from emonb.expclip import (ExpCLIP, ExpCLIPLoss, ExpCLIPProjection, EXPCLIP_RECIPE, FunctionTeacher, class_text_features,
                           clip_video_features, evaluate_expclip, load_projection, save_projection, teacher_targets,
                           train_projection, world_image_features, zero_shot_logits, DescriptionTeacher)
from emonb.synth import SyntheticWorld, write_dataset
from emonb.data import read_dfew


@pytest.fixture(scope='module')
def clip():
    torch.manual_seed(0)
    return ClipEncoder.from_pretrained('emonb-tiny-vit')


def pairs(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, F.normalize(x @ torch.randn(16, 24, generator=g) + 0.2 * torch.randn(n, 24, generator=g), dim=-1)


def test_training_is_deterministic_and_l2_option_learns():
    x, g = pairs()
    cfg = replace(EXPCLIP_RECIPE, epochs=3, seed=7)
    a = train_projection(x, g, cfg, bs=64, device='cpu').model.proj.weight
    b = train_projection(x, g, cfg, bs=64, device='cpu').model.proj.weight
    assert torch.equal(a, b)
    learn = train_projection(x, g, replace(cfg, lr=0.5, epochs=5), bs=64, loss='l2', device='cpu')
    losses = [v[0] for v in learn.recorder.values]
    assert isinstance(learn.loss_func, ExpCLIPLoss) and learn.loss_func.kind == 'l2' and losses[-1] < losses[0]


def test_projection_file_roundtrip(tmp_path):
    p = ExpCLIPProjection(16, 24)
    save_projection(p, tmp_path/'p.safetensors', dict(clip='x:1', n=3))
    q, meta = load_projection(tmp_path/'p.safetensors')
    assert meta == dict(clip='x:1', n=3) and torch.equal(p.proj.weight, q.proj.weight) and q.proj.bias is None
    torch.save({}, tmp_path/'bad.pt')
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(2)}, str(tmp_path/'other.safetensors'))
    with pytest.raises(ValueError, match='not an Exp-CLIP projection'): load_projection(tmp_path/'other.safetensors')


def test_raw_images_match_cached_features(clip, tmp_path):
    world = SyntheticWorld(seed=3)
    scenes = world.scenes(6, 'test')
    feats = world_image_features(clip, world, scenes, cache=FeatureCache(tmp_path))
    clips = world_image_features(clip, world, scenes[:2], n_frames=4, cache=FeatureCache(tmp_path))
    assert feats.shape == (6, clip.embed_dim) and clips.shape == (2, 4, clip.embed_dim)
    texts = class_text_features(clip, [('a.', 'b.'), ('c.', 'd.'), ('e.', 'f.')])
    model = ExpCLIP(clip, ExpCLIPProjection(clip.embed_dim, 8))
    images = torch.stack([clip.preprocess(world.render_face(s, clip.image_size)) for s in scenes])
    frames = torch.stack([torch.stack([clip.preprocess(f) for f in world.render_clip(s, 4, size=clip.image_size)]) for s in scenes[:2]])
    torch.testing.assert_close(model(images, texts), zero_shot_logits(feats, texts, model.projection), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(model(frames, texts), zero_shot_logits(clips, texts, model.projection), atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match='maps 7-d embeddings'): ExpCLIP(clip, ExpCLIPProjection(7, 8))


def test_video_folders_evaluate(clip, tmp_path):
    write_dataset(SyntheticWorld(seed=4), tmp_path/'dfew', 'dfew', {'train': 0, 'test': 7})
    df = read_dfew(tmp_path/'dfew')
    cache = FeatureCache(tmp_path/'features')
    f = clip_video_features(clip, df.path, n_frames=4, cache=cache)
    assert f.shape == (7, 4, clip.embed_dim)
    table = evaluate_expclip(clip, ExpCLIPProjection(clip.embed_dim, 8), df, 'dfew', tmp_path/'report', kinds=('photo',),
                             n_frames=4, cache=cache)
    assert list(table.columns) == ['CLIP WAR', 'CLIP UAR', 'Exp-CLIP WAR', 'Exp-CLIP UAR']
    assert json.loads((tmp_path/'report'/'exp-clip-photo'/'metrics.json').read_text())['run']['video'] is True
    with pytest.raises(FileNotFoundError, match='holds no frames'):
        (tmp_path/'empty').mkdir(); clip_video_features(clip, [tmp_path/'empty'], 4, cache)


def test_description_teacher_encodes_each_text_once(tmp_path):
    world = SyntheticWorld(seed=1)
    seen = []
    class Counting(torch.nn.Module):
        embed_dim = 3
        def forward(self, texts): seen.extend(texts); return torch.randn(len(texts), 3)
    t = DescriptionTeacher(world, Counting())
    scenes = world.scenes(80, 'train')
    z = teacher_targets(t, scenes, FeatureCache(tmp_path), batch_size=16)
    texts = [t.describe(s) for s in scenes]
    assert len(seen) == len(set(texts)) < 80                                   # each distinct description encoded once
    same = [i for i in range(80) if texts[i] == texts[0]]
    assert len(same) > 1 and np.allclose(z[same], z[0])
