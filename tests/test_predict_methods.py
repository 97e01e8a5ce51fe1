"emonb.predict for the multi-level (MLPER, CocoER) and video (DFER-CLIP) methods: bundles made from tiny training runs predict what the runs reported."
import warnings
from pathlib import Path
import numpy as np, pandas as pd
import pytest, torch
from PIL import Image

from emonb.core import label_set, LEVELS
from emonb.crops import BoxDetector, shared_data_dir, DETECTOR_FILES
from emonb.data import parse_box, read_dfew, read_rafdb
from emonb.synth import SyntheticWorld, write_dataset
from emonb.synth_clip import world_clip_encoder
from emonb.learner import TrainConfig
from emonb.methods import METHODS, method_spec, registered_methods
from emonb.runs import bundle_from_run, run_checkpoint, labels_of_classes
from emonb.bundles import bundle_header, load_bundle
from emonb.predict import predict, predict_clips, face_crops, clip_windows
from emonb.sources import read_image, write_video


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    from emonb.cocoer import train_cocoer, cocoer_config, COCOER_CPU, COCOER_CPU_SIZE
    from emonb.synth_tables import world_table
    from emonb.mlper import train_mlper, mlper_config
    from emonb.dferclip import train_dferclip, dferclip_config
    root = tmp_path_factory.mktemp('runs')
    write_dataset(SyntheticWorld(seed=3), root/'caer', 'caer_s', {'train': 42, 'val': 14, 'test': 14})
    caer = world_table(root/'caer')
    write_dataset(SyntheticWorld(seed=7), root/'dfew', 'dfew', {'train': 21, 'test': 7})
    dfew = read_dfew(root/'dfew')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train_cocoer(caer, root/'cocoer', clip=world_clip_encoder(), size=COCOER_CPU_SIZE, bs=16, progress=False,
                     config=cocoer_config('caer_s', epochs=1, lr=3e-4, schedule='constant'), select='last', **COCOER_CPU)
        train_mlper(caer, world_clip_encoder(), root/'mlper', config=mlper_config(epochs=1, lr=(1e-4, 0.01)), quiet=True)
        train_dferclip(dfew, world_clip_encoder(), root/'dferclip', n_frames=4, bs=8, config=dferclip_config(epochs=1), quiet=True)
    return root, caer, dfew


def _world_detectors(caer):
    test = caer[caer.split == 'test']
    boxes = {read_image(p).tobytes(): (parse_box(f), parse_box(b)) for p, f, b in zip(test.path, test.face_box, test.body_box)}
    return (BoxDetector(lambda im: [[*boxes[im.tobytes()][0], 1.]], 'world faces'),
            BoxDetector(lambda im: [[*boxes[im.tobytes()][1], .9]], 'world persons'))


def _diff(run, got):
    rep = pd.read_csv(run/'report'/'predictions.csv')
    names = [c[2:] for c in rep.columns if c.startswith('p_')]
    assert got.file.tolist() == rep.item.tolist()
    return rep, float(np.abs(got[names].to_numpy() - rep[[f'p_{n}' for n in names]].to_numpy()).max())


def test_registered():
    assert {'mlper', 'cocoer', 'dferclip'} <= set(registered_methods())
    assert method_spec('mlper').levels == LEVELS and method_spec('cocoer').boxes and method_spec('dferclip').video


@pytest.mark.parametrize('method', ['cocoer', 'mlper'])
def test_multilevel_bundle_equals_report(runs, method):
    root, caer, _ = runs
    b = bundle_from_run(root/method)
    h = bundle_header(b)
    assert h['method'] == method and h['input']['crops'] == 'boxes' and h['levels'] == list(LEVELS)
    fd, pd_ = _world_detectors(caer)
    got = predict(list(caer[caer.split == 'test'].path), method='bundle', weights=b, detector=fd, person_detector=pd_, progress=False)
    rep, diff = _diff(root/method, got)
    assert diff < 1e-5 and got.top.tolist() == rep.pred.tolist()
    assert got.attrs['summary']['person_detector'].endswith('world persons')


def test_cocoer_select_last_uses_last_checkpoint(runs):
    root = runs[0]
    assert bundle_header(root/'cocoer'/'model.safetensors' if (root/'cocoer'/'model.safetensors').exists() else bundle_from_run(root/'cocoer'))['info']['checkpoint'] == 'last'
    assert run_checkpoint(root/'mlper').name == 'best.pth'


def test_dferclip_bundle_equals_report(runs):
    root, _, dfew = runs
    b = bundle_from_run(root/'dferclip', path=root/'dfer.safetensors')
    assert bundle_header(b)['input']['n_frames'] == 4
    got = predict(list(dfew[dfew.split == 'test'].path), method='bundle', weights=b, detector=None, progress=False)
    rep, diff = _diff(root/'dferclip', got)
    assert diff < 1e-5
    assert (got.frame_end >= got.frame).all() and (got.status == 'whole').all()


def test_dferclip_windows_and_video(runs, tmp_path):
    root, _, dfew = runs
    b = root/'dfer.safetensors' if (root/'dfer.safetensors').exists() else bundle_from_run(root/'dferclip', path=root/'dfer.safetensors')
    folder = Path(dfew[dfew.split == 'test'].path.iloc[0])
    frames = [read_image(f) for f in sorted(folder.iterdir())]
    v = write_video(frames, tmp_path/'v.mp4', fps=10)
    df = predict_clips(v, weights=b, detector=None, window=4, stride=2, progress=False)
    assert list(zip(df.frame, df.frame_end)) == [(a, e - 1) for a, e in clip_windows(len(frames), 4, 2)]
    assert np.allclose(df[list(label_set('dfew').names)].sum(1), 1, atol=1e-5)
    # in-memory frames as one clip; a face detector that finds nothing follows no_face
    nothing = BoxDetector(lambda im: [], 'nothing')
    assert predict_clips([frames], weights=b, detector=nothing, progress=False).status.tolist() == ['no_face']
    assert predict_clips([frames], weights=b, detector=nothing, no_face='whole', progress=False).status.tolist() == ['whole']
    assert len(predict_clips([frames], weights=b, detector=nothing, no_face='skip', progress=False)) == 0


def test_person_fallback_and_whole(runs):
    root, caer, _ = runs
    b = root/'mlper'/'model.safetensors' if (root/'mlper'/'model.safetensors').exists() else bundle_from_run(root/'mlper')
    p = caer[caer.split == 'test'].path.iloc[0]
    _, persons = _world_detectors(caer)
    r = predict(p, method='mlper', weights=b, detector=BoxDetector(lambda im: [], 'no faces'), person_detector=persons, progress=False)
    assert r.status.tolist() == ['person'] and r.attrs['summary']['person_fallback_frames'] == 1
    assert predict(p, method='mlper', weights=b, detector=None, progress=False).status.tolist() == ['whole']


def test_clip_outside_bundle(runs, tmp_path):
    root, caer, _ = runs
    full = bundle_from_run(root/'cocoer', path=tmp_path/'full.safetensors')
    slim = bundle_from_run(root/'cocoer', path=tmp_path/'slim.safetensors', clip_in_bundle=False)
    assert slim.stat().st_size < full.stat().st_size
    fd, pd_ = _world_detectors(caer)
    paths = list(caer[caer.split == 'test'].path)[:4]
    a = predict(paths, method='bundle', weights=full, detector=fd, person_detector=pd_, progress=False)
    c = predict(paths, method='bundle', weights=slim, detector=fd, person_detector=pd_, progress=False)
    names = list(label_set('caer_s').names)
    assert np.allclose(a[names], c[names], atol=1e-6)
    with pytest.raises(FileNotFoundError, match='nowhere.safetensors, which does not exist'):
        load_bundle(slim, clip_weights=tmp_path/'nowhere.safetensors')


def test_run_errors(runs, tmp_path):
    root = runs[0]
    with pytest.raises(FileNotFoundError, match='output folder of an emonb trainer'): bundle_from_run(tmp_path)
    with pytest.raises(ValueError, match='do not fit the network'): bundle_from_run(root/'mlper', path=tmp_path/'x.safetensors', mlp_hidden=16)
    assert labels_of_classes(label_set('caer_s').names).name == 'caer_s'
    assert labels_of_classes(['happiness', 'anger']).name == 'custom'


@pytest.mark.skipif(shared_data_dir() is None or not all((shared_data_dir()/f).is_file() for f in DETECTOR_FILES.values()),
                    reason='the shared data folder with the YOLO face and person detectors is absent')
def test_real_detectors_multilevel(runs):
    root = runs[0]
    b = root/'cocoer'/'model.safetensors' if (root/'cocoer'/'model.safetensors').exists() else bundle_from_run(root/'cocoer')
    D = shared_data_dir()
    df = predict([D/'images'/'astronaut.png', D/'images'/'multiface.jpg'], method='bundle', weights=b, progress=False)
    assert df.groupby(df.file.map(lambda f: Path(f).name)).size().to_dict() == {'astronaut.png': 1, 'multiface.jpg': 6}
    assert (df.status == 'face').all() and df.attrs['summary']['person_detector'] is not None


def _bundle_of(root, method, name='hflip_test.safetensors'):
    f = root/method/name
    return f if f.exists() else bundle_from_run(root/method, path=f)


def test_hflip_multilevel_and_refusals(runs):
    "hflip=True mirrors a multi-level model's levels together and averages the probabilities; models whose boxes or clips it would not mirror are refused."
    from PIL import ImageOps
    from emonb.predict import make_predictor
    root = runs[0]
    b = _bundle_of(root, 'mlper')
    rng = np.random.default_rng(0)
    crops = [{lv: Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for lv in LEVELS} for _ in range(4)]
    mirrored = [{lv: ImageOps.mirror(im) for lv, im in c.items()} for c in crops]
    plain, flip = make_predictor('bundle', b, device='cpu'), make_predictor('bundle', b, device='cpu', hflip=True)
    both = flip.predict_crops(crops)
    assert np.allclose(both, (plain.predict_crops(crops) + plain.predict_crops(mirrored)) / 2, atol=1e-5)
    assert np.allclose(both.sum(1), 1, atol=1e-5) and flip.name.endswith('+hflip')
    for method in ('cocoer', 'dferclip'):
        with pytest.raises(ValueError, match='does not mirror'):
            make_predictor('bundle', _bundle_of(root, method), device='cpu', hflip=True)
