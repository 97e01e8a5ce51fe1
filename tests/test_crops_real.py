"emonb.crops with the real int8 TFLite detectors and images of the shared data folder (skipped when it is absent)."
import importlib.util, json
import numpy as np, pandas as pd
import pytest
from PIL import Image

from emonb.crops import (Cropper, CropParams, choose_subject, crop_table, face_detector, person_detector, score_crops,
                         shared_data_dir, box_cover, box_area, DETECTOR_FILES)

D = shared_data_dir()
missing = [str(D/f) for f in DETECTOR_FILES.values() if D is None or not (D/f).is_file()] if D else []
if D is None:
    pytestmark = pytest.mark.skip(reason="shared data folder not found: set EMONB_SHARED_DATA to the folder holding "
                                         "detectors/ and images/ (default: ../shared/data beside the repository)")
elif missing:
    pytestmark = pytest.mark.skip(reason=f"real detector files missing from the shared data folder: {missing}")
elif importlib.util.find_spec('ultralytics') is None or importlib.util.find_spec('ai_edge_litert') is None:
    pytestmark = pytest.mark.skip(reason="ultralytics and ai-edge-litert are needed for the TFLite detectors: pip install 'emonb[detect]'")


@pytest.fixture(scope='module')
def dets():
    return face_detector(), person_detector()


@pytest.fixture(scope='module')
def photos():
    return {n: Image.open(D/'images'/n).convert('RGB') for n in ('astronaut.png', 'multiface.jpg')}


def test_astronaut_one_face_inside_one_person(dets, photos):
    f, p = dets
    (fa,), (pa,) = f.detect([photos['astronaut.png']]), p.detect([photos['astronaut.png']])
    assert fa.shape == (1, 5) and pa.shape == (1, 5)
    assert fa[0, 4] > 0.7 and pa[0, 4] > 0.7 and box_cover(fa[0], pa[0]) > 0.99
    s = choose_subject(fa, pa, 512, 512)
    assert s.fallback == 'none' and (s.n_faces, s.n_persons) == (1, 1)


def test_multiface_six_faces(dets, photos):
    f, p = dets
    (fm,), (pm,) = f.detect([photos['multiface.jpg']]), p.detect([photos['multiface.jpg']])
    assert len(fm) == 6 and len(pm) == 6
    s = choose_subject(fm, pm, *photos['multiface.jpg'].size)
    assert s.fallback == 'none' and box_area(s.face) == max(box_area(b) for b in fm)
    assert box_cover(s.face, s.body) >= 0.5
    assert all(box_area(b) <= box_area(s.body) for b in pm if box_cover(s.face, b) >= 0.5)


def test_batched_equals_one_by_one(dets, photos):
    f, _ = dets
    ims = [photos['astronaut.png'], photos['multiface.jpg'], photos['astronaut.png']]
    batched = f.detect(ims)
    single = [f.detect([im])[0] for im in ims]
    for a, b in zip(batched, single): np.testing.assert_allclose(a, b, atol=1e-3)


def test_nobody(dets):
    rng = np.random.default_rng(0)
    ims = [Image.new('RGB', (320, 240), (128, 128, 128)), Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),
           Image.fromarray(np.broadcast_to(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 320, 3)).copy())]
    res = Cropper(*dets).crop(ims)
    assert [r.fallback for r in res] == ['no_detection'] * 3
    assert all(r.image('face').size == im.size for r, im in zip(res, ims))  # documented fallback: the whole image


@pytest.mark.parametrize('size', [128, 256])
def test_synthetic_scenes_overlap_ground_truth(dets, size):
    from emonb.synth import SyntheticWorld
    w = SyntheticWorld(seed=0, image_size=size); scs = w.scenes(40, split='test')
    res = Cropper(*dets, batch_size=8).crop([w.render(s) for s in scs])
    t = score_crops(res, [s.face_box for s in scs], [s.body_box for s in scs])
    print(f"\nsynthetic {size}px: face rate {t.face_found.mean():.2f}, person rate {t.person_found.mean():.2f}, "
          f"face IoU (detected) {t.face_iou[t.face_found].mean():.3f}, body IoU {t.body_iou.mean():.3f}, "
          f"face crop cover {t.face_crop_cover.mean():.3f}, body crop cover {t.body_crop_cover.mean():.3f}, "
          f"fallbacks {t.fallback.value_counts().to_dict()}")
    assert t.face_found.mean() >= 0.8
    assert t.face_iou[t.face_found].mean() >= 0.4
    assert t.face_crop_cover.mean() >= 0.8 and t.body_crop_cover.mean() >= 0.8


def test_crop_table_real_detectors_and_cache(tmp_path, photos):
    (tmp_path/'imgs').mkdir()
    for n, im in photos.items(): im.save(tmp_path/'imgs'/(n.split('.')[0] + '.png'))
    Image.new('RGB', (200, 200), (90, 140, 60)).save(tmp_path/'imgs'/'grass.png')
    pd.DataFrame(dict(path=['imgs/astronaut.png', 'imgs/multiface.png', 'imgs/grass.png'])).to_csv(tmp_path/'t.csv', index=False)
    df, s = crop_table(tmp_path/'t.csv', tmp_path/'out', cache_dir=tmp_path/'cache', context='masked', progress=False, batch_size=2)
    assert list(df['fallback']) == ['none', 'none', 'no_detection']
    assert list(df['n_faces']) == [1, 6, 0] and s['fallbacks']['none'] == 2 and s['fallbacks']['no_detection'] == 1
    assert 'yolov8n-face_int8.tflite' in s['face_detector'] and 'sha256=' in s['person_detector']
    ctx = np.asarray(Image.open(df['context_path'][0]))
    x0, y0, x1, y1 = (int(np.ceil(df[c][0])) for c in ('body_x0', 'body_y0', 'body_x1', 'body_y1'))
    assert (ctx[y0 + 1:y1 - 1, x0 + 1:x1 - 1] == 0).all()  # masked subject
    df2, s2 = crop_table(tmp_path/'t.csv', tmp_path/'out2', cache_dir=tmp_path/'cache', context='masked', progress=False)
    assert (s2['cache_hits'], s2['detector_images']) == (3, 0) and df2['face_path'].tolist() == df['face_path'].tolist()
    assert json.loads((tmp_path/'out2'/'summary.json').read_text())['cache_hits'] == 3
