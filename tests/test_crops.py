"emonb.crops without the real detectors: import side effects, errors, the `.pt` code path, subject choice, cache, crop_table."
import importlib.util, json, os, subprocess, sys
from collections import Counter
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from PIL import Image

import emonb.crops as C
from emonb.crops import (BoxDetector, Cropper, CropParams, YOLODetector, choose_subject, crop_table, face_detector,
                         person_detector, box_cover, LEVELS)

HAS_ULTRALYTICS = importlib.util.find_spec('ultralytics') is not None


def test_import_is_light_and_sets_offline_env(tmp_path):
    code = ("import os, sys; os.environ.pop('YOLO_OFFLINE', None); os.environ['YOLO_CONFIG_DIR'] = sys.argv[1]; import emonb.crops; "
            "print('ultralytics' in sys.modules, 'torch' in sys.modules, os.environ['YOLO_OFFLINE'], "
            "os.environ['YOLO_AUTOINSTALL'], os.environ['YOLO_CONFIG_DIR'] == sys.argv[1])")
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, check=True).stdout.split()
    assert out == ['False', 'False', '1', 'False', 'True']  # no ultralytics/torch import; a user's YOLO_CONFIG_DIR is kept


@pytest.mark.skipif(not HAS_ULTRALYTICS, reason='ultralytics is not installed (pip install "emonb[detect]")')
def test_import_ultralytics_keeps_pillow_open():
    code = ("from PIL import Image; o = Image.open; import emonb.crops as C; u = C.import_ultralytics(); "
            "import sys; print(Image.open is o, 'ultralytics' in sys.modules)")
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split() == ['True', 'True']


@pytest.mark.parametrize('name', ['yolov8n-face.pt', 'yolov8n_int8.tflite'])
def test_missing_weights_error_names_path(tmp_path, name):
    p = tmp_path/'nowhere'/name
    with pytest.raises(FileNotFoundError) as e: face_detector(p)
    msg = str(e.value)
    assert str(p) in msg and 'never downloads weights' in msg and 'put the model file' in msg
    with pytest.raises(FileNotFoundError, match='weights not found'): person_detector(p)


def test_detector_identity_tracks_file_and_settings(tmp_path):
    p = tmp_path/'m.pt'; p.write_bytes(b'one')
    a, b = YOLODetector(p), YOLODetector(p, imgsz=320)
    assert a.identity != b.identity and a.identity == YOLODetector(p).identity
    p.write_bytes(b'two!')
    assert YOLODetector(p).identity != a.identity
    (tmp_path/'m.txt').write_text('x')
    with pytest.raises(ValueError, match="unsupported detector file type '.txt'"): YOLODetector(tmp_path/'m.txt')


@pytest.fixture(scope='module')
def random_pt(tmp_path_factory):
    "A randomly initialised YOLOv8n checkpoint built offline from ultralytics' bundled yaml (no download)."
    if not HAS_ULTRALYTICS: pytest.skip('ultralytics is not installed (pip install "emonb[detect]")')
    from ultralytics import YOLO
    p = tmp_path_factory.mktemp('pt')/'random-yolov8n.pt'
    YOLO('yolov8n.yaml').save(p)
    return p


def scene(size=160, seed=0):
    from emonb.synth import SyntheticWorld
    w = SyntheticWorld(seed=seed, image_size=size); s = w.scene(0, split='test')
    return w.render(s), s


def test_pt_file_through_the_same_code_path(random_pt, tmp_path):
    det = YOLODetector(random_pt, task='detect', conf=0.0, max_det=4)
    ims = [scene(128)[0], scene(160, 1)[0], Image.new('RGB', (200, 100))]
    boxes = det.detect(ims)
    assert [b.shape for b in boxes] == [(4, 5)] * 3 and det.calls == Counter(batches=1, images=3)
    for b, im in zip(boxes, ims):
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 2] <= im.width + 1).all() and (b[:, 3] <= im.height + 1).all()
    # and through the pipeline, with the cache
    nobody = BoxDetector(lambda im: [], 'nobody')
    c1 = Cropper(det, nobody, cache_dir=tmp_path/'cache'); r1 = c1.crop(ims)
    c2 = Cropper(YOLODetector(random_pt, task='detect', conf=0.0, max_det=4), nobody, cache_dir=tmp_path/'cache'); r2 = c2.crop(ims)
    assert c1.stats['crop_misses'] == 3 and c2.stats['crop_hits'] == 3 and c2.stats['detect_images'] == 0
    assert [r.fallback for r in r1] == [r.fallback for r in r2] == ['no_person'] * 3


def test_unreadable_image_even_after_ultralytics_import(tmp_path):
    if HAS_ULTRALYTICS: import ultralytics  # noqa: F401  (it patches PIL.Image.open)
    bad = tmp_path/'bad.jpg'; bad.write_bytes(b'garbage')
    c = Cropper(BoxDetector(lambda im: [], 'a'), BoxDetector(lambda im: [], 'b'))
    with pytest.raises(ValueError, match='bad.jpg'): c.crop([bad])
    with pytest.raises(FileNotFoundError, match='missing.png'): c.crop([tmp_path/'missing.png'])
    r = c.crop([bad], on_error='report')[0]
    assert r.fallback == 'unreadable' and 'bad.jpg' in r.error and c.fallbacks['unreadable'] == 1


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new('RGB', (60, 40), 'white'); im.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif(); exif[0x0112] = 6  # rotate 90° clockwise to display
    p = tmp_path/'rot.jpg'; im.save(p, exif=exif, quality=100)
    seen = []
    c = Cropper(BoxDetector(lambda x: seen.append(x.size) or [], 'f'), BoxDetector(lambda x: [], 'p'))
    r = c.crop([p])[0]
    assert seen == [(40, 60)] and r.image('context').size == (40, 60) and (r.subject.width, r.subject.height) == (40, 60)


def test_subject_rules_and_fallbacks():
    W, H = 640, 480
    faces = [[100, 40, 140, 90, .9], [300, 60, 330, 100, .8]]
    persons = [[70, 20, 180, 400, .9], [270, 40, 370, 380, .7], [60, 10, 200, 470, .5]]
    s = choose_subject(faces, persons, W, H)
    assert s.fallback == 'none' and s.face == (100., 40., 140., 90.) and s.body == (60., 10., 200., 470.)  # largest container
    assert choose_subject(faces, persons, W, H, rule='largest_person').body == (60., 10., 200., 470.)
    assert choose_subject(faces, [[400, 0, 600, 400]], W, H).fallback == 'unpaired'
    assert choose_subject(faces, [], W, H).fallback == 'no_person'
    assert choose_subject([], persons, W, H).fallback == 'no_face'
    s = choose_subject([], [], 48, 48)
    assert s.fallback == 'no_detection' and s.face == s.body == (0., 0., 48., 48.)
    with pytest.raises(ValueError, match='no face and no person'): choose_subject([], [], 48, 48, on_nothing='raise')
    # min_face_in_body: a face half outside the person box
    half = [[160, 40, 200, 90, .9]]  # 20 of 40 px inside [70, 180]
    assert choose_subject(half, persons[:1], W, H).fallback == 'none'
    assert choose_subject(half, persons[:1], W, H, min_face_in_body=0.6).fallback == 'unpaired'


def test_crops_cover_ground_truth_and_mask():
    img, s = scene(256)
    subj = choose_subject([list(s.face_box)], [list(s.body_box)], *img.size)
    crops, boxes = C.crop_subject(img, subj, CropParams(context='masked', mask='face', mask_fill=(255, 0, 255)))
    assert box_cover(s.face_box, boxes['face']) == 1 and box_cover(s.body_box, boxes['body']) == 1
    x0, y0, x1, y1 = s.face_box
    ctx = np.asarray(crops['context'])
    assert (ctx[y0:y1, x0:x1] == [255, 0, 255]).all() and not (ctx[:, :x0] == [255, 0, 255]).all()
    small, _ = C.crop_subject(img, subj, CropParams(max_side=64))
    assert max(small['context'].size) == 64 and max(small['body'].size) <= 64


def _gt_detectors(truth, miss_face=(), miss_person=()):
    f = BoxDetector(lambda im: [] if im.size in miss_face else [list(truth[im.size][0]) + [.9]], 'gt-f')
    p = BoxDetector(lambda im: [] if im.size in miss_person else [list(truth[im.size][1]) + [.8]], 'gt-p')
    return f, p


def _scene_files(tmp_path, sizes=(96, 112, 128, 144)):
    truth, rows = {}, []
    (tmp_path/'imgs').mkdir()
    for i, S in enumerate(sizes):
        im, s = scene(S, i); im.save(tmp_path/'imgs'/f'{i}.png'); truth[(S, S)] = (s.face_box, s.body_box)
        rows.append(dict(path=f'imgs/{i}.png', label=i))
    return truth, rows


def test_cache_reuse_counts_and_atomicity(tmp_path, monkeypatch):
    truth, rows = _scene_files(tmp_path)
    f, p = _gt_detectors(truth, miss_face={(112, 112)})
    paths = [tmp_path/r['path'] for r in rows]
    c1 = Cropper(f, p, cache_dir=tmp_path/'cache', batch_size=3); r1 = c1.crop(paths)
    assert (c1.stats['crop_misses'], c1.stats['detect_batches']) == (4, 4) and f.calls == Counter(batches=2, images=4)
    assert [r.fallback for r in r1] == ['none', 'no_face', 'none', 'none']
    f.calls.clear()
    c2 = Cropper(f, p, cache_dir=tmp_path/'cache', batch_size=3); r2 = c2.crop(paths)
    assert (c2.stats['crop_hits'], c2.stats['crop_misses'], f.calls['images']) == (4, 0, 0)
    assert all(r.cached for r in r2) and [r.paths for r in r2] == [r.paths for r in r1]
    for a, b in zip(r1, r2):
        for lv in LEVELS: assert np.array_equal(np.asarray(a.image(lv)), np.asarray(b.image(lv)))
    # a crash while writing meta.json leaves no complete entry and no temp file; the next run completes it
    orig = C.atomic_write_json
    def crash(path, obj, **kw):
        if Path(path).name == 'meta.json': raise OSError('disk full (simulated)')
        return orig(path, obj, **kw)
    monkeypatch.setattr(C, 'atomic_write_json', crash)
    c3 = Cropper(f, p, cache_dir=tmp_path/'cache', context='masked')
    with pytest.raises(OSError, match='simulated'): c3.crop(paths[:1])
    monkeypatch.setattr(C, 'atomic_write_json', orig)
    assert not list((tmp_path/'cache').rglob('*.tmp'))
    c4 = Cropper(f, p, cache_dir=tmp_path/'cache', context='masked'); c4.crop(paths[:1])
    assert c4.stats['crop_misses'] == 1 and c4.stats['detect_hits'] == 2  # detections were cached before the crash
    c5 = Cropper(f, p, cache_dir=tmp_path/'cache', context='masked'); c5.crop(paths[:1])
    assert c5.stats['crop_hits'] == 1
    meta = json.loads((c5._entry(c5.crop_key(C._read(paths[0])[1]))/'meta.json').read_text())
    assert meta['params']['context'] == 'masked' and meta['detectors']['face'] == 'boxes:gt-f'


def test_crop_table_outputs_and_summary(tmp_path):
    truth, rows = _scene_files(tmp_path)
    rows.append(dict(path='imgs/broken.png', label=9)); (tmp_path/'imgs'/'broken.png').write_bytes(b'\x89PNG\r\n')
    pd.DataFrame(rows).to_csv(tmp_path/'t.csv', index=False)
    f, p = _gt_detectors(truth, miss_person={(128, 128)})
    df, s = crop_table(tmp_path/'t.csv', tmp_path/'out', face_detector=f, person_detector=p, cache_dir=tmp_path/'cache',
                       on_error='report', progress=False, batch_size=2)
    assert list(df['fallback']) == ['none', 'none', 'no_person', 'none', 'unreadable']
    assert s['fallbacks'] == dict(none=3, unpaired=0, no_person=1, no_face=0, no_detection=0, unreadable=1)
    assert (s['cache_misses'], s['cache_hits'], s['errors'], s['detector_batches']) == (4, 0, 1, 4)  # 2 batches x 2 detectors; the broken-only batch runs none
    for c in C.BOX_COLUMNS + ('face_path', 'body_path', 'context_path', 'fallback', 'n_faces', 'n_persons', 'label', 'error'):
        assert c in df.columns
    assert df.loc[0, ['face_x0', 'face_y0', 'face_x1', 'face_y1']].tolist() == [float(v) for v in truth[(96, 96)][0]]
    saved = pd.read_csv(tmp_path/'out'/'crops.csv'); assert len(saved) == 5 and saved['fallback'].iloc[4] == 'unreadable'
    assert json.loads((tmp_path/'out'/'summary.json').read_text())['fallbacks']['no_person'] == 1
    df2, s2 = crop_table(tmp_path/'t.csv', tmp_path/'out', face_detector=f, person_detector=p, cache_dir=tmp_path/'cache',
                         on_error='report', progress=True, overwrite=True)
    assert (s2['cache_hits'], s2['cache_misses'], s2['detector_images']) == (4, 0, 0)
    with pytest.raises(ValueError, match='broken.png'):
        crop_table(tmp_path/'t.csv', face_detector=f, person_detector=p, cache_dir=tmp_path/'cache', progress=False)
    with pytest.raises(FileExistsError):
        crop_table(tmp_path/'t.csv', tmp_path/'out', face_detector=f, person_detector=p, cache_dir=tmp_path/'cache', progress=False)
    with pytest.raises(ValueError, match="no 'path' column"): crop_table(pd.DataFrame(dict(x=[1])), face_detector=f, person_detector=p)
    with pytest.raises(ValueError, match='CropParams.context'):
        crop_table(tmp_path/'t.csv', face_detector=f, person_detector=p, cache_dir=tmp_path/'cache', context='nope')


def test_shared_data_setting(tmp_path, monkeypatch):
    monkeypatch.setenv('EMONB_SHARED_DATA', str(tmp_path))
    assert C.shared_data_dir() == tmp_path.resolve()
    assert C.detector_path('face') == tmp_path.resolve()/'detectors'/'yolov8n-face_int8.tflite'
    with pytest.raises(FileNotFoundError, match="detector 'face' weights not found"): face_detector()
    monkeypatch.setenv('EMONB_SHARED_DATA', str(tmp_path/'absent'))
    assert C.shared_data_dir() is None
    with pytest.raises(FileNotFoundError, match='EMONB_SHARED_DATA'): C.shared_data_dir(required=True)
