"Exp-CLIP (emonb.expclip): determinism, video folders, the raw-image path, projection files, teacher caching, and parity with the official code (zengqunzhao/Exp-CLIP) on random weights."
from dataclasses import replace
from pathlib import Path
import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emonb.encoders import ClipEncoder, FeatureCache, register_model_configs
from emonb.core import label_set
from emonb.prompts import expclip_prompts
from emonb.expclip import (ExpCLIP, ExpCLIPLoss, ExpCLIPProjection, EXPCLIP_RECIPE, FunctionTeacher, class_text_features,
                           clip_video_features, evaluate_expclip, load_projection, save_projection, teacher_targets,
                           train_projection, projected_logits, DescriptionTeacher, clip_image_features,
                           expclip_options, expclip_config, expclip_transform, expclip_scale, expclip_frame_indices,
                           expclip_text_features, SquashResize, read_rgb, BLIP2FlanT5Teacher, PROMPT_KINDS)
from emonb.synth import SyntheticWorld, WorldDescriber, write_dataset
from emonb.synth_clip import world_image_features
from emonb.data import read_dfew, read_rafdb


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
    feats = world_image_features(clip, world, scenes, cache=FeatureCache(tmp_path), transform=expclip_transform(clip))
    clips = world_image_features(clip, world, scenes[:2], n_frames=4, cache=FeatureCache(tmp_path), transform=expclip_transform(clip))
    assert feats.shape == (6, clip.embed_dim) and clips.shape == (2, 4, clip.embed_dim)
    texts = class_text_features(clip, [('a.', 'b.'), ('c.', 'd.'), ('e.', 'f.')])
    model = ExpCLIP(clip, ExpCLIPProjection(clip.embed_dim, 8))
    images = torch.stack([model.transform(world.render_face(s, clip.image_size)) for s in scenes])
    frames = torch.stack([torch.stack([model.transform(f) for f in world.render_clip(s, 4, size=clip.image_size)]) for s in scenes[:2]])
    torch.testing.assert_close(model(images, texts), projected_logits(feats, texts, model.projection, model.scale), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(model(frames, texts), projected_logits(clips, texts, model.projection, model.scale), atol=1e-3, rtol=1e-4)
    assert model.scale == expclip_scale(clip) != 100.
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
    t = DescriptionTeacher(WorldDescriber(world), Counting())
    scenes = world.scenes(80, 'train')
    z = teacher_targets(t, scenes, FeatureCache(tmp_path), batch_size=16)
    texts = t.describer(scenes)
    assert len(seen) == len(set(texts)) < 80                                   # each distinct description encoded once
    same = [i for i in range(80) if texts[i] == texts[0]]
    assert len(same) > 1 and np.allclose(z[same], z[0])


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the official code (zengqunzhao/Exp-CLIP): literal re-implementations of its computations, written in the
# structure of train.py, test.py, models/Exp_CLIP.py and data_loader/, against emonb's variant='official' on random weights.

@pytest.fixture(scope='module')
def clip224():
    "An OpenAI-like (QuickGELU) CLIP at the official input size, randomly initialised (logit scale ln(1/0.07), not 100)."
    import open_clip
    register_model_configs()
    torch.manual_seed(0)
    m, _, pre = open_clip.create_model_and_transforms('emonb-tiny-vit', force_quick_gelu=True, force_image_size=224)
    return ClipEncoder(m.eval(), open_clip.get_tokenizer('emonb-tiny-vit'), pre, name='emonb-tiny-vit-quickgelu-224')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "RAF-DB faces, DFEW frame folders (33, 34 and 9 frames) and three odd images (wide, grey, transparent)."
    from PIL import Image
    root = tmp_path_factory.mktemp('official')
    write_dataset(SyntheticWorld(seed=5), root/'rafdb', 'rafdb', {'train': 8, 'test': 7})
    write_dataset(SyntheticWorld(seed=5), root/'dfew', 'dfew', {'train': 0, 'test': 3})
    rng = np.random.default_rng(1)
    odd = [Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)), Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8), 'L'),
           Image.fromarray(rng.integers(0, 255, (80, 80, 4), dtype=np.uint8), 'RGBA')]
    for i, im in enumerate(odd): im.save(root/f'odd{i}.png')
    return dict(root=root, faces=read_rafdb(root/'rafdb'), clips=read_dfew(root/'dfew'), odd=[str(root/f'odd{i}.png') for i in range(3)])


def official_static(path):
    "test.py / train.py: ImageFolder's loader, transforms.Resize((224, 224)), transforms.ToTensor()."
    import torchvision.transforms as T
    from PIL import Image
    with open(path, 'rb') as f: img = Image.open(f).convert('RGB')
    return T.Compose([T.Resize((224, 224)), T.ToTensor()])(img)


def official_clip(folder, num_frames, num_segments=16):
    "video_dataloader.py (test mode, duration 1) + GroupResize(224) + Stack + ToTorchFormatTensor."
    import glob, os
    from PIL import Image
    if num_frames > num_segments:
        tick = num_frames / float(num_segments)
        offsets = np.array([int(tick / 2.0 + tick * x) for x in range(num_segments)])
    else: offsets = np.zeros((num_segments,))
    paths = sorted(glob.glob(os.path.join(folder, '*')))
    imgs = [Image.open(paths[int(p)]).convert('RGB').resize((224, 224), Image.BILINEAR) for p in offsets]
    return torch.from_numpy(np.concatenate(imgs, axis=2)).permute(2, 0, 1).contiguous().float().div(255).reshape(-1, 3, 224, 224)


class OfficialHead(torch.nn.Module):
    "models/Exp_CLIP.py's Linear_Matrix: one bias-free nn.Linear called mlp."
    def __init__(self, L, Lp): super().__init__(); self.mlp = torch.nn.Linear(L, Lp, bias=False)
    def forward(self, x): return self.mlp(x)


def test_official_image_transform_is_exact(clip224, files):
    static = files['faces'].path.tolist()[:3] + files['odd']
    ours = expclip_transform(clip224)
    assert repr(ours) == 'SquashResize(224)'
    for f in static: assert torch.equal(official_static(f), ours(read_rgb(f)))
    folder, n = files['clips'].path[0], int(files['clips'].n_frames[0])
    frames = sorted(Path(folder).iterdir())
    ours_clip = torch.stack([ours(read_rgb(frames[i])) for i in expclip_frame_indices(n)])
    assert torch.equal(official_clip(folder, n), ours_clip)
    assert expclip_frame_indices(9) == [0] * 16 and expclip_frame_indices(16) == [0] * 16     # N <= 16: the first frame


def test_official_projection_file_and_zero_shot_logits(clip224, files, tmp_path):
    torch.manual_seed(1)
    head = OfficialHead(clip224.embed_dim, 24)
    torch.save(head.state_dict(), tmp_path/'job-model.pth')                 # train.py: torch.save(projection_head.state_dict(), ...)
    P, meta = load_projection(tmp_path/'job-model.pth', clip_dim=clip224.embed_dim)
    assert meta['format'] == 'official' and torch.equal(P.proj.weight, head.mlp.weight) and P.proj.bias is None
    x = torch.randn(4, clip224.embed_dim)
    assert (head(x) - P(x)).abs().max() == 0
    cm, W, scale = clip224.model, head.mlp.weight.detach(), expclip_scale(clip224)
    assert abs(scale - 1 / 0.07) < 1e-4
    cache = FeatureCache(tmp_path/'features')
    faces = files['faces'][files['faces'].split == 'test']
    with torch.no_grad():
        for ls, df, video in (('rafdb', faces, False), ('dfew', files['clips'], True)):
            if video:
                imgs = torch.stack([official_clip(f, n) for f, n in zip(df.path, df.n_frames)])
                n, t, c, h, w = imgs.shape
                f = (cm.encode_image(imgs.view(-1, c, h, w)).float() @ W.T).reshape(n, t, -1).mean(1)    # ExpCLIP_Test, Dynamic_FER
                feats = clip_video_features(clip224, df.path, 16, cache)
            else:
                imgs = torch.stack([official_static(p) for p in df.path]); n = len(imgs)
                f = cm.encode_image(imgs).float() @ W.T                                                   # Static_FER
                feats = clip_image_features(clip224, df.path, cache)
            img = f / f.norm(dim=-1, keepdim=True)
            names = label_set(ls).names
            texts, tf = expclip_prompts(names, official=True), expclip_text_features(clip224, names)
            for kind in PROMPT_KINDS:
                flat = [s for c in texts[kind] for s in ([c] if isinstance(c, str) else c)]   # Text.py: class-major lists
                txt = cm.encode_text(clip224.tokenizer(flat)).float() @ W.T
                txt = txt / txt.norm(dim=-1, keepdim=True)
                literal = (cm.logit_scale.exp() * img @ txt.t()).view(n, -1, len(flat) // len(names)).mean(-1)   # test.py
                ours = projected_logits(feats, tf[kind], P, scale)
                assert (literal - ours).abs().max() <= 1e-5, (ls, kind, (literal - ours).abs().max())
                if video and kind == 'ensemble10': video_pred = literal.argmax(1).numpy()
    table = evaluate_expclip(clip224, P, files['clips'], 'dfew', n_frames=16, cache=cache)
    assert table.loc['ensemble10', 'Exp-CLIP WAR'] == (video_pred == files['clips'].label.to_numpy()).mean()


def test_official_training_loss_gradient_and_sgd_steps(clip224, files, tmp_path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config, AutoTokenizer
    from emonb.encoders import minilm_path
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cfg = Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=224, patch_size=32),
                      qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, encoder_hidden_size=32, vocab_size=100),
                      text_config=T5Config(vocab_size=tok.vocab_size, d_model=24, d_kv=8, d_ff=37, num_layers=1, num_decoder_layers=1, num_heads=2).to_dict(),
                      num_query_tokens=4)
    torch.manual_seed(2)
    blip = Blip2ForConditionalGeneration(cfg).eval()
    paths = files['faces'][files['faces'].split == 'train'].path.tolist()
    images = torch.stack([official_static(p) for p in paths])        # the same tensor goes to CLIP and to BLIP-2
    teacher = BLIP2FlanT5Teacher(model=blip, tokenizer=tok, device='cpu')
    assert torch.equal(teacher.pixel_values(paths), images)
    head = OfficialHead(clip224.embed_dim, 24)
    W = head.mlp.weight.detach().clone().requires_grad_(True)
    with torch.no_grad():                                            # ExpCLIP_Train.forward, BLIP2_T5.generate (hooked final layer norm)
        e = clip224.model.encode_image(images).float()
        tokens = tok([teacher.instruction] * len(paths), padding='longest', return_tensors='pt')
        v = blip.vision_model(pixel_values=images).last_hidden_state
        q = blip.language_projection(blip.qformer(query_embeds=blip.query_tokens.expand(len(paths), -1, -1), encoder_hidden_states=v,
                                                  encoder_attention_mask=torch.ones(v.shape[:-1], dtype=torch.long)).last_hidden_state)
        enc, hooked = blip.language_model.get_encoder(), []
        h = enc.final_layer_norm.register_forward_hook(lambda m, i, o: hooked.append(o))
        enc(inputs_embeds=torch.cat([q, enc.embed_tokens(tokens.input_ids)], 1),
            attention_mask=torch.cat([torch.ones(q.shape[:2], dtype=torch.long), tokens.attention_mask], 1)); h.remove()
    t = torch.mean(hooked[0], dim=1).float(); t = t / t.norm(dim=-1, keepdim=True)
    i = e @ W.T; i = i / i.norm(dim=-1, keepdim=True)
    s, target = clip224.model.logit_scale.exp(), torch.arange(len(paths))
    literal = 0.5 * F.cross_entropy(s * i @ t.T, target) + 0.5 * F.cross_entropy(s * t @ i.T, target)   # train.py
    literal.backward()
    cache = FeatureCache(tmp_path)
    e_I, e_G = (torch.tensor(np.asarray(a)) for a in (clip_image_features(clip224, paths, cache), teacher_targets(teacher, paths, cache)))
    P = ExpCLIPProjection(clip224.embed_dim, 24); P.proj.weight.data.copy_(head.mlp.weight.data)
    ours = ExpCLIPLoss(expclip_options()['loss'], expclip_scale(clip224))(P(e_I), e_G); ours.backward()
    assert abs(literal.item() - ours.item()) <= 1e-5 and (W.grad - P.proj.weight.grad).abs().max() <= 1e-5
    # the recipe: torch.optim.SGD + MultiStepLR([30]) stepping once per batch; one batch of all pairs for 3 epochs
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 16, generator=g), F.normalize(torch.randn(40, 12, generator=g), dim=-1)
    learn = train_projection(x, y, expclip_config(epochs=3, seed=5), bs=40, scale=14.3, device='cpu', path=tmp_path)
    torch.manual_seed(5); ref = OfficialHead(16, 12)
    opt = torch.optim.SGD([{'params': ref.parameters(), 'lr': 1e-3}], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30], gamma=0.1)
    for _ in range(3):
        a = ref(x); a = a / a.norm(dim=-1, keepdim=True)
        loss = 0.5 * F.cross_entropy(14.3 * a @ y.T, torch.arange(40)) + 0.5 * F.cross_entropy(14.3 * y @ a.T, torch.arange(40))
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    assert (learn.model.proj.weight - ref.mlp.weight).abs().max() <= 1e-6 and len(learn.dls.valid.dataset) == 0


def test_projection_files_official_format_and_errors(tmp_path):
    W = torch.randn(24, 16)
    torch.save({'module.projection_head.mlp.weight': W, 'module.clip_model.logit_scale': torch.tensor(4.6)}, tmp_path/'dp.pth')
    assert torch.equal(load_projection(tmp_path/'dp.pth')[0].proj.weight, W)              # found as test.py finds it
    torch.save({'mlp.weight': W.T.contiguous()}, tmp_path/'t.pth')
    with pytest.raises(ValueError, match='looks transposed'): load_projection(tmp_path/'t.pth', clip_dim=16)
    with pytest.raises(ValueError, match='maps 16-d CLIP embeddings, but the CLIP gives 512-d'): load_projection(tmp_path/'dp.pth', clip_dim=512)
    torch.save({'mlp.weight': torch.zeros(2, 2, 2)}, tmp_path/'c.pth')
    with pytest.raises(ValueError, match=r'c.pth: mlp.weight has shape \(2, 2, 2\)'): load_projection(tmp_path/'c.pth')
    torch.save({'fc.weight': W}, tmp_path/'o.pth')
    with pytest.raises(ValueError, match="o.pth is not an Exp-CLIP projection: no 'mlp.weight'"): load_projection(tmp_path/'o.pth')
    torch.save({'a.mlp.weight': W, 'b.mlp.weight': W}, tmp_path/'two.pth')
    with pytest.raises(ValueError, match='several projection matrices'): load_projection(tmp_path/'two.pth')
    torch.save([W], tmp_path/'l.pth')
    with pytest.raises(ValueError, match='l.pth holds a list, not a state dict'): load_projection(tmp_path/'l.pth')
    (tmp_path/'j.pth').write_bytes(b'junk')
    with pytest.raises(ValueError, match='j.pth could not be read as a PyTorch state dict'): load_projection(tmp_path/'j.pth')
    p = load_projection(tmp_path/'dp.pth')[0]
    save_projection(p, tmp_path/'back.pth')
    back = torch.load(tmp_path/'back.pth', weights_only=True)
    assert list(back) == ['mlp.weight'] and torch.equal(back['mlp.weight'], W)
    with pytest.raises(ValueError, match='has a bias'): save_projection(ExpCLIPProjection(4, 3, bias=True), tmp_path/'b.pth')


def test_variants_differ_where_the_table_says(clip224, files, tmp_path):
    wide = read_rgb(files['odd'][0])
    off, own = expclip_transform(clip224), expclip_transform(clip224, 'emonb')
    assert repr(expclip_transform(clip224, 'paper')) == repr(off) and own is clip224.preprocess
    assert (off(wide) - own(wide)).abs().max() > 0.5 and off(wide).min() >= 0 > own(wide).min()
    assert expclip_scale(clip224, 'paper') == expclip_scale(clip224) != expclip_scale(clip224, 'emonb') == 100.
    z, g = torch.randn(8, 6), F.normalize(torch.randn(8, 6), dim=-1)
    assert expclip_options('paper')['loss'] == 'l2' and abs(ExpCLIPLoss('l2')(z, g) - ExpCLIPLoss('infonce')(z, g)) > 0.1
    a = expclip_text_features(clip224, 'dfew', ('ensemble5', 'photo'))
    b = expclip_text_features(clip224, 'dfew', ('ensemble5', 'photo'), 'emonb')
    assert (a['ensemble5'] - b['ensemble5']).abs().max() > 1e-3 and torch.equal(a['photo'], b['photo'])
    assert expclip_frame_indices(9, variant='emonb') == list(range(9)) + [8] * 7 != expclip_frame_indices(9)
    assert expclip_frame_indices(40, variant='emonb') == expclip_frame_indices(40)
    assert (expclip_options()['valid_pct'], expclip_options('emonb')['valid_pct']) == (0., 0.1)
    assert (EXPCLIP_RECIPE.schedule, EXPCLIP_RECIPE.milestones, EXPCLIP_RECIPE.precision) == ('multistep', (30,), 'fp32')
    assert (expclip_config('emonb').schedule, expclip_config('emonb').precision) == ('constant', 'auto')
    x, y = torch.randn(100, 16), F.normalize(torch.randn(100, 12), dim=-1)
    assert len(train_projection(x, y, expclip_config('emonb', epochs=1), bs=32, device='cpu', variant='emonb', path=tmp_path).dls.valid.dataset) == 10
    with pytest.raises(ValueError, match="Exp-CLIP has no variant 'code'"): expclip_options('code')
    with pytest.raises(ValueError, match='inputs must be one of'): expclip_options(inputs='x')
