"emonb.predict: model bundles, weights by name, sources, policies, and the real face detector (skipped without the shared data)."
import importlib.util, json
import numpy as np, pandas as pd
import pytest, torch
from torch import nn
from PIL import Image

from emonb.core import label_set
from emonb.crops import BoxDetector, shared_data_dir, DETECTOR_FILES
from emonb.synth import SyntheticWorld
from emonb.methods import METHODS, method_spec, registered_methods, input_spec, image_transform, register_method, random_clip
from emonb.predict import BASE_COLUMNS, make_predictor, predict, plot_predictions, frame_rows, Predictor
from emonb.bundles import save_bundle, load_bundle, bundle_header, resolve_weights, install_weights
from emonb.sources import write_video

BASIC7 = list(label_set('basic7').names)


@pytest.fixture(scope='module')
def faces():
    w = SyntheticWorld(seed=3)
    scenes = w.scenes(14, 'test')
    return [w.render_face(s) for s in scenes], [s.label for s in scenes]


@pytest.fixture(scope='module')
def zeroshot():
    return make_predictor('zeroshot', device='cpu')


def _random_tower(name='emonb-tiny-vit'):
    return {'kind': 'clip', 'name': name}


@pytest.mark.parametrize('method,arch,labels,inp', [
    ('kefer', dict(visual=dict(kind='timm', arch='resnet18', embed_dim=32, channels=[8, 16, 32, 64]), n_classes=7, dim=48,
                   neutral_index=6), 'rafdb', input_spec(48)),
    ('kefer', dict(visual=_random_tower(), n_classes=7, dim=64, neutral_index=0), 'basic7', input_spec(64, normalize='clip')),
    ('classifier', dict(visual=dict(kind='timm', arch='resnet18', channels=[8, 16, 32, 64]), n_classes=8), 'basic8', input_spec(40)),
    ('classifier', dict(visual=_random_tower(), n_classes=7), 'fer2013', input_spec(64, normalize='clip')),
    ('clip_classifier', dict(clip='emonb-tiny-vit', n_classes=7), 'rafdb', input_spec(64, normalize='clip')),
    ('quickstart', dict(c_in=1, n_out=7, widen=0.5), 'fer2013', input_spec(48, 'L', 'none')),
])
def test_bundle_round_trip_identical(tmp_path, method, arch, labels, inp, faces):
    torch.manual_seed(0)
    model = method_spec(method).build(**arch).eval()
    for p in model.parameters(): p.data.normal_(0, 0.05)          # non-trivial weights everywhere
    path = save_bundle(model, tmp_path/'m.safetensors', method, labels, arch, inp, info={'k': 1})
    b = load_bundle(path, method=method)
    assert b.labels.names == label_set(labels).names and b.info == {'k': 1} and not b.model.training
    x = torch.stack([image_transform(inp)(im) for im in faces[0][:4]])
    with torch.no_grad(): assert torch.equal(method_spec(method).run(model, x), method_spec(method).run(b.model, x))
    # and through predict, on in-memory faces, whole images
    df = predict(faces[0][:4], method=method, weights=path, detector=None, progress=False)
    with torch.no_grad(): expected = method_spec(method).run(model, x).softmax(-1).numpy()
    np.testing.assert_allclose(df[list(b.labels.names)].to_numpy(), expected, atol=1e-5)
    assert bundle_header(path)['method'] == method


def test_bundle_refuses_what_would_not_load(tmp_path):
    arch = dict(c_in=1, n_out=7, widen=0.5)
    m = method_spec('quickstart').build(**arch)
    with pytest.raises(ValueError, match='outputs of shape'): save_bundle(m, tmp_path/'a.safetensors', 'quickstart', 'basic8', arch, input_spec(48, 'L', 'none'))
    with pytest.raises(ValueError, match='do not fit'): save_bundle(m, tmp_path/'a.safetensors', 'quickstart', 'basic7', {**arch, 'widen': 1.0}, input_spec(48, 'L', 'none'))
    with pytest.raises(ValueError, match='no method'): save_bundle(m, tmp_path/'a.safetensors', 'nope', 'basic7', arch, input_spec(48, 'L', 'none'))
    assert not (tmp_path/'a.safetensors').exists()


def test_weights_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv('EMONB_HOME', str(tmp_path/'home'))
    expected = tmp_path/'home'/'weights'/'my-model.safetensors'
    with pytest.raises(FileNotFoundError) as e: resolve_weights('my-model')
    assert str(expected) in str(e.value) and 'never downloads' in str(e.value)
    with pytest.raises(FileNotFoundError, match=str(expected)): make_predictor('kefer', 'my-model')
    arch = dict(c_in=1, n_out=7, widen=0.5)
    p = save_bundle(method_spec('quickstart').build(**arch), tmp_path/'q.safetensors', 'quickstart', 'fer2013', arch, input_spec(48, 'L', 'none'))
    assert install_weights(p, 'my-model') == expected
    assert load_bundle('my-model').method == 'quickstart'
    with pytest.raises(FileNotFoundError, match='weights file not found'): resolve_weights(str(tmp_path/'missing.safetensors'))


def test_predict_table_and_policies(tmp_path, faces, zeroshot):
    ims, labels = faces
    canvas = Image.new('RGB', (200, 100), 'white')
    canvas.paste(ims[0].resize((40, 40)), (120, 30)); canvas.paste(ims[1].resize((40, 40)), (20, 30))
    blank = Image.new('RGB', (50, 50), 'black')
    det = BoxDetector(lambda im: [[126, 36, 154, 64, .8], [26, 36, 54, 64, .9]] if im.getpixel((0, 0)) == (255, 255, 255) else [], 'two')
    df = predict([canvas, blank], method=zeroshot, detector=det, progress=False, save_csv=tmp_path/'p.csv')
    assert list(df.columns) == list(BASE_COLUMNS) + BASIC7 + ['top', 'top_prob', 'error']
    assert df.status.tolist() == ['face', 'face', 'no_face'] and df.face.tolist() == [0, 1, -1]
    assert df.x0.tolist()[:2] == [26., 126.]                      # left to right
    P = df[BASIC7].to_numpy()[:2]
    np.testing.assert_allclose(P.sum(1), 1, atol=1e-5)
    assert df.top.tolist()[:2] == [BASIC7[k] for k in P.argmax(1)] and pd.isna(df.top[2])
    s = json.loads((tmp_path/'p.json').read_text())
    assert (s['faces'], s['no_face_frames'], s['frames']) == (2, 1, 2)
    assert len(pd.read_csv(tmp_path/'p.csv')) == 3
    for policy, status in (('skip', []), ('whole', ['whole'])):
        r = predict(blank, method=zeroshot, detector=det, no_face=policy, progress=False)
        assert r.status.tolist() == status and r.attrs['summary']['no_face_frames'] == 1
    with pytest.raises(FileExistsError, match='overwrite=True'): predict(blank, method=zeroshot, detector=det, save_csv=tmp_path/'p.csv', progress=False)
    fig = plot_predictions(canvas, frame_rows(df, '<image 0>'), path=tmp_path/'p.png')
    assert len(fig.axes[0].patches) == 2 and (tmp_path/'p.png').read_bytes()[:4] == b'\x89PNG'


def test_predict_errors_name_the_file(tmp_path, faces, zeroshot):
    (tmp_path/'bad.png').write_bytes(b'\x89PNG broken')
    faces[0][0].save(tmp_path/'ok.png')
    with pytest.raises(Exception, match='bad.png'): predict(tmp_path, method=zeroshot, detector=None, progress=False)
    df = predict(tmp_path, method=zeroshot, detector=None, on_error='report', progress=False)
    assert df.status.tolist() == ['error', 'whole'] and 'bad.png' in df.error[0]
    with pytest.raises(FileNotFoundError, match='source not found'): predict(tmp_path/'nope.jpg', method=zeroshot, progress=False)


def test_video_and_arrays(tmp_path, faces, zeroshot):
    ims, labels = faces
    v = write_video(ims[:10], tmp_path/'v.mp4', fps=5)
    df = predict(v, method=zeroshot, detector=None, frame_step=3, progress=False)
    assert df.frame.tolist() == [0, 3, 6, 9]
    assert df.attrs['summary']['video_info'][str(v)] == dict(fps=5.0, frames=10, frames_used=4, frames_declared=10)
    arr = predict([np.asarray(ims[0]), np.asarray(ims[0]).astype(np.float32) / 255], method=zeroshot, detector=None, progress=False)
    np.testing.assert_allclose(arr[BASIC7].to_numpy()[0], arr[BASIC7].to_numpy()[1], atol=1e-5)
    assert arr.file.tolist() == ['<array 0>', '<array 1>']


def test_zeroshot_above_chance(faces, zeroshot):
    ims, labels = faces
    df = predict(ims, method=zeroshot, detector=None, progress=False)
    assert (df.top == np.array(labels)).mean() > 2 / 7              # chance is 1/7


def test_multilevel_method_gets_body_and_context(tmp_path, faces):
    "A three-level method (as MLPER / CocoER will register) receives face, body and context crops of each face."
    class ThreeLevel(nn.Module):
        def __init__(self, n=7):
            super().__init__(); self.w = nn.Parameter(torch.zeros(3, n))
        def forward(self, xs): return torch.stack([xs[k].mean((1, 2, 3)) for k in ('face', 'body', 'context')], 1) @ self.w
    seen = {}
    def forward(model, xs):
        seen.update({k: tuple(v.shape) for k, v in xs.items()}); return model(xs)
    register_method('three_level_test', lambda n=7: ThreeLevel(n), forward=forward, levels=('face', 'body', 'context'))
    try:
        m = ThreeLevel(); m.w.data.normal_()
        p = save_bundle(m, tmp_path/'t.safetensors', 'three_level_test', 'basic7', {'n': 7}, input_spec(32, normalize='none'))
        img = Image.new('RGB', (300, 300), 'gray'); img.paste(faces[0][0], (100, 40))
        fdet = BoxDetector(lambda im: [[110, 50, 154, 94, .9]], 'face')
        pdet = BoxDetector(lambda im: [[60, 20, 220, 300, .8]], 'person')
        df = predict(img, method='three_level_test', weights=p, detector=fdet, person_detector=pdet, progress=False)
        assert len(df) == 1 and seen == {'face': (1, 3, 32, 32), 'body': (1, 3, 32, 32), 'context': (1, 3, 32, 32)}
        assert df.attrs['summary']['person_detector'] == 'boxes:person'
    finally: METHODS.pop('three_level_test', None)


# --- the real detector of the shared data folder
D = shared_data_dir()
_real_ok = (D is not None and all((D/f).is_file() for f in DETECTOR_FILES.values())
            and importlib.util.find_spec('ultralytics') is not None and importlib.util.find_spec('ai_edge_litert') is not None)
real = pytest.mark.skipif(not _real_ok, reason="needs the shared data folder (EMONB_SHARED_DATA or ../shared/data) with detectors/ "
                                               "and ultralytics + ai-edge-litert (pip install 'emonb[detect]')")


@real
def test_real_photos_one_and_six_faces(zeroshot, tmp_path):
    df = predict([D/'images'/'astronaut.png', D/'images'/'multiface.jpg'], method=zeroshot, progress=False)
    counts = df.groupby(df.file.str.rsplit('/', n=1).str[-1]).size().to_dict()
    assert counts == {'astronaut.png': 1, 'multiface.jpg': 6}
    assert (df.status == 'face').all() and (df.det_conf > 0.25).all()
    np.testing.assert_allclose(df[BASIC7].sum(axis=1), 1, atol=1e-5)
    multi = df[df.file.str.endswith('multiface.jpg')]
    assert multi.x0.is_monotonic_increasing and multi.face.tolist() == list(range(6))
    fig = plot_predictions(D/'images'/'multiface.jpg', multi, path=tmp_path/'m.png')
    assert len(fig.axes[0].patches) == 6


@real
def test_real_detector_nobody_is_counted(zeroshot):
    df = predict(Image.new('RGB', (320, 240), (128, 128, 128)), method=zeroshot, progress=False)
    assert df.status.tolist() == ['no_face'] and df.attrs['summary']['no_face_frames'] == 1
