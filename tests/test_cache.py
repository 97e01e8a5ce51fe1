"emonb.cache: memory-mapped frame/crop caches and their DataLoaders agree with the uncached loaders; stale caches are refused; builds are atomic."
import pickle, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from emonb.core import label_set, LEVELS
from emonb.data import (clip_dataloaders, multilevel_dataloaders, split_dataloader, split_validation, read_dfew, read_caer_s,
                        join_boxes, LevelCrop, parse_box, tsn_indices, DataError, TensorClip, ClipToFloat)
from emonb.synth import SyntheticWorld, write_dataset
import emonb.cache as C
from emonb.cache import (build_clip_cache, build_level_cache, cached_clip_dataloaders, cached_multilevel_dataloaders, ClipCache,
                         LevelCache, StaleCacheError, CacheError, ClipCropFlip, loader_throughput)

COLS = ['dataset', 'path', 'label', 'label_name', 'split', 'fold', 'subset', 'n_frames']

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('cache_world')
    write_dataset(SyntheticWorld(seed=11), root/'dfew', 'dfew', {'train': 16, 'test': 5})
    clips = split_validation(read_dfew(root/'dfew', fold=1), 0.25, seed=0)
    write_dataset(SyntheticWorld(seed=12), root/'caer', 'caer_s', {'train': 21, 'test': 7})
    scenes = join_boxes(read_caer_s(root/'caer', policy='skip'), pd.read_csv(root/'caer'/'emonb_synth.csv'), root=root/'caer')
    scenes = split_validation(scenes, 0.25, seed=0)
    return dict(root=root, clips=clips, scenes=scenes)

def numbered_clips(root: Path, lengths, splits) -> pd.DataFrame:
    "Clips whose frame i of clip c has colour (5 i, 20 c, 0): the sampled indices and the clip can be read from the pixels."
    rows = []
    for c, (n, sp) in enumerate(zip(lengths, splits)):
        folder = root/f'{c:05d}'; folder.mkdir(parents=True)
        for i in range(n): Image.new("RGB", (16, 12), (5 * i, 20 * c, 0)).save(folder/f'{i:05d}.png')
        rows.append(('dfew', str(folder), c % 7, label_set('dfew').names[c % 7], sp, 1, '', n))
    df = pd.DataFrame(rows, columns=COLS); df.attrs['label_set'] = 'dfew'
    return df

def read_back(x):
    "(clip ids, frame indices) of a batch (B, T, C, H, W) in [0, 1] of numbered clips."
    px = (x[:, :, :, 4, 4] * 255).round().long()
    return (px[:, 0, 1] // 20).tolist(), (px[:, :, 0] // 5).tolist()

def test_clip_eval_batches_equal_uncached(world, tmp_path):
    clips = world['clips']
    cc = build_clip_cache(clips, tmp_path/'c', size=40)
    for norm in ('none', 'clip'):
        cdls = cached_clip_dataloaders(clips, cc, n_frames=8, bs=3, normalize=norm)
        udls = clip_dataloaders(clips, n_frames=8, size=40, bs=3, normalize=norm)
        got = torch.cat([x for x, _ in cdls.valid]); want = torch.cat([x for x, _ in udls.valid])
        assert got.shape == want.shape == (int((clips.split == 'val').sum()), 8, 3, 40, 40)
        assert (got - want).abs().max() < (0.5 / 255 if norm == 'none' else 1e-5)
        assert torch.cat([y for _, y in cdls.valid]).tolist() == torch.cat([y for _, y in udls.valid]).tolist()
        test = clips[clips.split == 'test'].reset_index(drop=True)
        (xt, yt), (xu, yu) = cdls.test_dl(test, with_labels=True).one_batch(), split_dataloader(udls, clips, 'test').one_batch()
        assert (xt - xu).abs().max() < 1e-5 and yt.tolist() == yu.tolist()
    x, y = cdls.train.one_batch()
    assert isinstance(x, TensorClip) and x.shape == (3, 8, 3, 40, 40) and x.dtype == torch.float32

def test_clip_training_sampling_is_tsn(tmp_path):
    lengths = [20, 33, 7, 16, 50, 25, 9, 20]
    df = numbered_clips(tmp_path/'frames', lengths, ['train'] * 6 + ['val'] * 2)
    cc = build_clip_cache(df, tmp_path/'c', size=16)
    dls = cached_clip_dataloaders(df, cc, n_frames=8, bs=2, normalize='none', augment=False, num_workers=2)
    seen = {}
    for _ in range(4):
        for x, _y in dls.train:
            ids, idx = read_back(x)
            for c, d in zip(ids, idx):
                n = lengths[c]
                if n < 8: assert d == tsn_indices(n, 8), (n, d)
                else: assert all(int(i * n / 8) <= j < max(int(i * n / 8) + 1, int((i + 1) * n / 8)) for i, j in enumerate(d)), (n, d)
                seen.setdefault(c, set()).add(tuple(d))
    assert set(seen) == set(range(6)) and len(seen[4]) > 1            # every training clip served; the draws vary
    ids, idx = read_back(dls.valid.one_batch()[0])
    assert ids == [6, 7] and idx == [tsn_indices(9, 8), tsn_indices(20, 8)]
    loop = cached_clip_dataloaders(df, cc, n_frames=8, bs=2, normalize='none', pad='loop')
    assert read_back(loop.valid.one_batch()[0])[1][0] == tsn_indices(9, 8, pad='loop')

def test_clip_crop_flip():
    x = TensorClip(torch.rand(3, 4, 3, 10, 12))
    assert torch.allclose(ClipCropFlip(1., 1.)(x, split_idx=0), x.flip(-1), atol=1e-5)
    assert ClipCropFlip(0.5)(x, split_idx=1) is x
    same = TensorClip(torch.rand(5, 1, 3, 16, 16).expand(5, 6, 3, 16, 16).contiguous())
    out = ClipCropFlip(0.5)(same, split_idx=0)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)
    # a crop of a horizontal ramp is a ramp within the original range, zoomed in: its step per pixel shrinks by the crop's scale (0.5..1)
    ramp = TensorClip(torch.linspace(0, 1, 32).expand(2, 1, 3, 32, 32).contiguous())
    r = ClipCropFlip(0.5, p=0.)(ramp, split_idx=0)[:, 0, 0, 0]
    slope = (r[:, -1] - r[:, 0]) / 31
    assert ((slope > 0.5 / 31 - 1e-3) & (slope < 1 / 31 + 1e-4)).all() and r.min() >= 0 and r.max() <= 1

@pytest.mark.parametrize('resize,context', [('squish', 'whole'), ('squish', 'masked'), ('crop', 'whole'), ('pad', 'masked')])
def test_level_crops_equal_levelcrop(world, tmp_path, resize, context):
    scenes = world['scenes']
    df = pd.concat([scenes, scenes.iloc[:1].assign(fallback='no_detection', body_box='0 0 128 128', split='val')], ignore_index=True)
    df.attrs = scenes.attrs
    lc = build_level_cache(df, tmp_path/'l', size=(24, 32, 40), resize=resize, context=context)
    from fastai.vision.all import Resize, PILImage
    for i in [0, 3, len(df) - 1]:
        r = df.iloc[i]; p = lc.positions(df.iloc[[i]])[0]
        for lv, s in zip(LEVELS, lc.sizes):
            im = LevelCrop(lv, context)(r)
            want = im.resize((s, s), Image.BILINEAR) if resize == 'squish' else Resize(s, method=resize)(PILImage(im), split_idx=1)
            assert np.array_equal(lc.array(lv)[p], np.asarray(want)), (lv, i)
        with Image.open(r.path) as im: w, h = im.size
        assert np.allclose(lc.array('boxes')[p], np.array([parse_box(r.face_box), parse_box(r.body_box)]) / [w, h, w, h])
    if context == 'masked':   # the no-detection row keeps its context unmasked, as LevelCrop does
        p = lc.positions(df.iloc[[len(df) - 1]])[0]; q = lc.positions(df.iloc[[0]])[0]
        assert not np.array_equal(lc.array('context')[p], lc.array('context')[q])

def test_level_batches_equal_uncached(world, tmp_path):
    scenes = world['scenes']
    lc = build_level_cache(scenes, tmp_path/'l', size=32, resize='crop', context='masked')
    cdls = cached_multilevel_dataloaders(scenes, lc, bs=4, augment='none', normalize='imagenet')
    udls = multilevel_dataloaders(scenes, size=32, bs=4, augment='none', normalize='imagenet', context='masked')
    for got, want in zip(zip(*cdls.valid), zip(*udls.valid)):
        for g, w in zip(got, want): assert g.shape == w.shape and torch.allclose(g.float(), w.float(), atol=1e-5)
    assert cdls.n_inp == udls.n_inp == 3 and list(cdls.vocab) == list(udls.vocab)
    tr = cdls.train.one_batch()
    assert len(tr) == 4 and tr[0].shape == (4, 3, 32, 32)
    aug = cached_multilevel_dataloaders(scenes, lc, bs=4, augment='mlper', with_boxes=True)
    f, b, c, bx, y = aug.train.one_batch()
    assert bx.shape == (4, 2, 4) and aug.n_inp == 4

def test_stale_cache_detected(world, tmp_path):
    scenes = world['scenes']
    folder = tmp_path/'l'
    lc = build_level_cache(scenes, folder, size=16)
    created = lc.manifest['created']
    assert build_level_cache(scenes, folder, size=16, rebuild='never').manifest['created'] == created
    moved = scenes.copy(); moved.loc[0, 'face_box'] = '1 1 20 20'
    for df, kw, why in [(moved, {}, 'not in it'), (scenes, dict(size=24), 'sizes was [16, 16, 16], asked [24, 24, 24]'),
                        (scenes, dict(resize='crop'), "resize was 'squish'"), (scenes.iloc[:5], {}, 'holds')]:
        with pytest.raises(StaleCacheError, match='stale cache') as e: build_level_cache(df, folder, **{'size': 16, **kw}, rebuild='never')
        assert str(folder) in str(e.value) and why in str(e.value)
    with pytest.raises(StaleCacheError, match='not in the cache'): cached_multilevel_dataloaders(moved, lc)
    # an image replaced on disk under the same path
    p = Path(scenes.path[2]); Image.open(p).convert('RGB').transpose(Image.FLIP_LEFT_RIGHT).save(p)
    with pytest.raises(StaleCacheError, match='changed on disk'): build_level_cache(scenes, folder, size=16, rebuild='never')
    assert build_level_cache(scenes, folder, size=16, rebuild='never', verify=False).manifest['created'] == created   # verify=False: table only
    with pytest.warns(UserWarning, match=f'stale cache {folder}.*rebuilding'): lc2 = build_level_cache(scenes, folder, size=16)
    r = scenes.iloc[2]
    assert np.array_equal(lc2.array('face')[lc2.positions(scenes.iloc[[2]])[0]], np.asarray(LevelCrop('face')(r).resize((16, 16), Image.BILINEAR)))
    assert build_level_cache(scenes, folder, size=16, rebuild='never').manifest == lc2.manifest

def test_stale_clip_cache(tmp_path):
    df = numbered_clips(tmp_path/'frames', [10, 12, 9], ['train', 'train', 'val'])
    build_clip_cache(df, tmp_path/'c', size=16)
    (Path(df.path[1])/'99999.png').write_bytes((Path(df.path[1])/'00000.png').read_bytes())   # a frame added
    with pytest.raises(StaleCacheError, match='changed on disk'): build_clip_cache(df, tmp_path/'c', size=16, rebuild='never')
    with pytest.warns(UserWarning, match='rebuilding'): cc = build_clip_cache(df, tmp_path/'c', size=16)
    assert cc.index['count'].tolist() == [10, 13, 9] and cc.manifest['n_frames'] == 32

def test_failed_build_leaves_no_partial_cache(world, tmp_path):
    df = numbered_clips(tmp_path/'frames', [10, 12, 9], ['train', 'train', 'val'])
    folder = tmp_path/'caches'/'c'
    good = build_clip_cache(df, folder, size=16)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    bad = Path(df.path[1])/'00004.png'; bad.write_bytes(b'\x89PNG broken')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(DataError, match=str(bad)): build_clip_cache(df, folder, size=16)
        with pytest.raises(DataError, match=str(bad)): build_clip_cache(df, tmp_path/'caches'/'new', size=16, num_workers=2)
    assert sorted(p.name for p in (tmp_path/'caches').iterdir()) == ['c']                 # nothing partial, no temporary folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before                    # the old cache is untouched
    Image.new('RGB', (16, 12)).save(bad)
    # a failure after the arrays were written (the manifest cannot be written): still nothing partial
    orig = C.atomic_write_json
    def boom(*a, **k): raise OSError('disk full')
    C.atomic_write_json = boom
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with pytest.raises(OSError, match='disk full'): build_clip_cache(df, folder, size=16)
    finally: C.atomic_write_json = orig
    assert sorted(p.name for p in (tmp_path/'caches').iterdir()) == ['c']
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

def test_refuses_foreign_and_damaged_folders(world, tmp_path):
    df = numbered_clips(tmp_path/'frames', [10, 12, 9], ['train', 'train', 'val'])
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'notes.txt').write_text('keep')
    with pytest.raises(CacheError, match='is not an emonb cache'): build_clip_cache(df, tmp_path/'mine', size=16, rebuild='always')
    assert (tmp_path/'mine'/'notes.txt').read_text() == 'keep'
    build_clip_cache(df, tmp_path/'c', size=16)
    with pytest.raises(CacheError, match='not a levels cache'): LevelCache(tmp_path/'c')
    with pytest.raises(StaleCacheError, match='it is a clips cache'): build_level_cache(world['scenes'], tmp_path/'c', size=16, rebuild='never')
    np.save(tmp_path/'c'/'frames.npy', np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(CacheError, match='is damaged'): ClipCache(tmp_path/'c')
    with pytest.raises(FileNotFoundError, match='does not exist'): build_clip_cache(df.assign(path=str(tmp_path/'nope')), tmp_path/'d')

def test_workers_share_the_memmap(world, tmp_path):
    clips = world['clips']
    cc = build_clip_cache(clips, tmp_path/'c', size=24, num_workers=2)
    assert np.array_equal(np.asarray(cc.frames), np.asarray(build_clip_cache(clips, tmp_path/'c0', size=24).frames))  # built by 2 workers = by 1
    w0 = cached_clip_dataloaders(clips, cc, n_frames=4, bs=2, normalize='none')
    w2 = cached_clip_dataloaders(clips, cc, n_frames=4, bs=2, normalize='none', num_workers=2)
    assert torch.equal(torch.cat([x for x, _ in w0.valid]), torch.cat([x for x, _ in w2.valid]))
    n = 0
    for _ in range(2):
        for x, y in w2.train: n += len(y); assert x.dtype == torch.float32 and x.shape[1:] == (4, 3, 24, 24)
    assert n == 2 * len(w2.train) * 2
    blob = pickle.dumps(w2.train.dataset)
    assert len(blob) < cc.frames.nbytes / 4                      # the workers get the folder, not the pixels
    lc = build_level_cache(world['scenes'], tmp_path/'l', size=16, num_workers=2)
    l2 = cached_multilevel_dataloaders(world['scenes'], lc, bs=4, augment='none', num_workers=2)
    l0 = cached_multilevel_dataloaders(world['scenes'], lc, bs=4, augment='none')
    for a, b in zip(zip(*l2.valid), zip(*l0.valid)):
        for u, v in zip(a, b): assert torch.equal(u, v)
    r = loader_throughput(w2.train, n_batches=4, raw=True)
    assert r['frames'] == 4 * 2 * 4 and r['frames_per_s'] > 0

def test_trains_with_a_fastai_learner(world, tmp_path):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    clips = world['clips']
    dls = cached_clip_dataloaders(clips, build_clip_cache(clips, tmp_path/'c', size=16), n_frames=4, bs=4)
    class Mean(torch.nn.Module):
        def __init__(self): super().__init__(); self.fc = torch.nn.Linear(3, 7)
        def forward(self, x): return self.fc(x.mean((1, 3, 4)))
    learn = Learner(dls, Mean(), loss_func=CrossEntropyLossFlat(), path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    test = clips[clips.split == 'test']
    preds, targs = learn.get_preds(dl=split_dataloader(dls, clips, 'test'))
    assert preds.shape == (len(test), 7) and targs.tolist() == [label_set('dfew').names.index(n) for n in test.label_name]
    scenes = world['scenes']
    ldls = cached_multilevel_dataloaders(scenes, build_level_cache(scenes, tmp_path/'l', size=16), bs=4, with_boxes=True)
    class Four(torch.nn.Module):
        def __init__(self): super().__init__(); self.fc = torch.nn.Linear(9 + 8, 7)
        def forward(self, f, b, c, bx): return self.fc(torch.cat([f.mean((2, 3)), b.mean((2, 3)), c.mean((2, 3)), bx.flatten(1)], 1))
    learn = Learner(ldls, Four(), loss_func=CrossEntropyLossFlat(), path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    preds, _ = learn.get_preds(dl=split_dataloader(ldls, scenes, 'test'))
    assert preds.shape == ((scenes.split == 'test').sum(), 7)
