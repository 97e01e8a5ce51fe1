"Every image mode becomes the right 8-bit image (emonb.core.image_to_8bit), through every reader that decodes files: checked per mode against a reference computed with numpy."
import numpy as np
import pytest
from PIL import Image

from emonb.core import image_to_8bit, eight_bit_rule
from emonb.data import load_image

H, W = 24, 40
RNG = np.random.default_rng(0)
RAMP16 = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)


def _save(tmp_path, name, im, **kw):
    p = tmp_path/name; im.save(p, **kw); return p


def _grey(ref):
    "A grey reference as the RGB image it must become."
    return np.repeat(np.asarray(ref, np.float64)[..., None], 3, axis=2)


def case_16bit_png(tmp_path):
    p = _save(tmp_path, 'g16.png', Image.fromarray(RAMP16))
    return p, 'I;16', _grey(RAMP16 / 257)


def case_16bit_png_dark(tmp_path):   # a 12-bit camera's values in a 16-bit file: dark, not stretched
    a = (RAMP16 >> 4).astype(np.uint16)
    return _save(tmp_path, 'g12.png', Image.fromarray(a)), 'I;16', _grey(a / 257)


def case_16bit_tiff(tmp_path):
    return _save(tmp_path, 'g16.tif', Image.fromarray(RAMP16)), 'I;16', _grey(RAMP16 / 257)


def case_int32_8bit_values(tmp_path):
    a = RNG.integers(0, 256, (H, W)).astype(np.int32)
    return _save(tmp_path, 'i8.tif', Image.fromarray(a)), 'I', _grey(a)


def case_int32_16bit_values(tmp_path):
    a = RAMP16.astype(np.int32)
    return _save(tmp_path, 'i16.tif', Image.fromarray(a)), 'I', _grey(a / 257)


def case_int32_other_range(tmp_path):
    a = np.linspace(-1000, 200000, H * W).reshape(H, W).astype(np.int32)
    return _save(tmp_path, 'iw.tif', Image.fromarray(a)), 'I', _grey((a + 1000) * 255 / 201000)


def case_float_unit(tmp_path):
    a = RNG.random((H, W)).astype(np.float32)
    return _save(tmp_path, 'f1.tif', Image.fromarray(a)), 'F', _grey(a * 255)


def case_float_other_range(tmp_path):
    a = np.linspace(-3, 5, H * W).reshape(H, W).astype(np.float32)
    return _save(tmp_path, 'fw.tif', Image.fromarray(a)), 'F', _grey((a + 3) * 255 / 8)


def case_la(tmp_path):
    l, al = RNG.integers(0, 256, (H, W)), RNG.integers(0, 256, (H, W))
    im = Image.fromarray(np.stack([l, al], 2).astype(np.uint8), 'LA')
    return _save(tmp_path, 'la.png', im), 'LA', _grey(l * al / 255)   # on black


def case_rgba(tmp_path):
    c, al = RNG.integers(0, 256, (H, W, 3)), RNG.integers(0, 256, (H, W, 1))
    im = Image.fromarray(np.concatenate([c, al], 2).astype(np.uint8), 'RGBA')
    return _save(tmp_path, 'rgba.png', im), 'RGBA', c * al / 255


def case_palette_transparent(tmp_path):
    im = Image.new('P', (W, H), 1); im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.paste(0, (0, 0, W // 2, H))                       # left half: colour 0, transparent
    ref = np.zeros((H, W, 3)); ref[:, W // 2:] = (200, 100, 50)
    return _save(tmp_path, 'p.png', im, transparency=0), 'P', ref


def case_cmyk(tmp_path):
    a = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    ref = np.stack([(255 - a[..., i].astype(int)) * (255 - a[..., 3].astype(int)) / 255 for i in range(3)], 2)   # no colour profile
    return _save(tmp_path, 'cmyk.tif', Image.fromarray(a, 'CMYK')), 'CMYK', ref


def case_one_bit(tmp_path):
    a = RNG.random((H, W)) > .5
    return _save(tmp_path, 'bw.png', Image.fromarray(a)), '1', _grey(a * 255)


def case_grey8(tmp_path):
    a = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    return _save(tmp_path, 'g8.png', Image.fromarray(a)), 'L', _grey(a)


def case_48bit_png(tmp_path):
    cv2 = pytest.importorskip('cv2')
    a = (RNG.random((H, W, 3)) * 65535).astype(np.uint16)
    p = tmp_path/'c48.png'; cv2.imwrite(str(p), a[..., ::-1])    # OpenCV writes BGR
    return p, 'RGB', a / 257                                     # Pillow reads the high byte: within 1


CASES = [case_16bit_png, case_16bit_png_dark, case_16bit_tiff, case_int32_8bit_values, case_int32_16bit_values,
         case_int32_other_range, case_float_unit, case_float_other_range, case_la, case_rgba, case_palette_transparent,
         case_cmyk, case_one_bit, case_grey8, case_48bit_png]


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.__name__[5:])
def test_every_mode_matches_its_reference(tmp_path, case):
    path, mode, ref = case(tmp_path)
    with Image.open(path) as im: assert im.mode == mode, f"{path.name} opened as {im.mode}"
    got = np.asarray(load_image(path)).astype(np.float64)
    assert got.shape == (H, W, 3)
    assert np.abs(got - ref).max() <= 1, f"{mode}: largest difference {np.abs(got - ref).max():.2f}"
    assert abs(got.mean() - ref.mean()) <= 1
    grey = np.asarray(load_image(path, 'L')).astype(np.float64)
    assert grey.shape == (H, W) and abs(grey.mean() - np.asarray(Image.fromarray(np.round(ref).astype(np.uint8)).convert('L')).mean()) <= 1
    assert eight_bit_rule(mode)


def test_16bit_png_is_not_white_in_any_reader(tmp_path):
    "The bug this fixes: a 16-bit PNG read as almost white (mean 254) by every reader."
    from emonb.crops import _decode
    from emonb.expclip import read_rgb
    from emonb.sources import read_image
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    p = tmp_path/'x.png'; Image.fromarray(arr.astype(np.uint16)).save(p)
    with Image.open(p) as im: assert np.asarray(im.convert('RGB')).mean() > 250      # what Pillow alone does
    expected = (arr.astype(np.uint16) / 257).mean()
    for name, im in [('load_image', load_image(p)), ('read_rgb', read_rgb(p)), ('predict.read_image', read_image(p)), ('crops', _decode(str(p), p.read_bytes())),
                     ('image_to_8bit', image_to_8bit(Image.open(p)))]:
        a = np.asarray(im)
        assert im.mode == 'RGB' and abs(a.mean() - expected) <= 1, f"{name}: mean {a.mean():.1f}, expected {expected:.1f}"


def test_byte_orders_and_bad_modes():
    big = Image.frombytes('I;16B', (W, H), RAMP16.astype('>u2').tobytes())
    assert np.array_equal(np.asarray(image_to_8bit(big, 'L')), np.round(RAMP16 / 257).astype(np.uint8))
    with pytest.raises(ValueError, match="'RGB' or 'L'"): image_to_8bit(big, 'RGBA')
    with pytest.raises(ValueError, match='La'): image_to_8bit(Image.new('La', (2, 2)))
    rgba = Image.new('RGBA', (1, 1), (200, 100, 50, 128))
    assert np.asarray(image_to_8bit(rgba))[0, 0].tolist() == [100, 50, 25]                          # on black
    assert np.asarray(image_to_8bit(rgba, transparency='ignore'))[0, 0].tolist() == [200, 100, 50]  # dropped, as Pillow's convert


def test_predict_on_a_16bit_png_equals_predict_on_its_8bit_reference(tmp_path):
    "End to end: the shipped model gives a 16-bit PNG the probabilities of the same picture stored in 8 bits."
    from emonb.predict import predict
    yy, xx = np.mgrid[:96, :96]
    ref8 = (127 + 120 * np.sin(xx / 9.) * np.cos(yy / 13.)).astype(np.uint16)
    Image.fromarray(ref8 * 257).save(tmp_path/'deep.png')       # 16-bit: value * 257 is exact
    Image.fromarray(ref8.astype(np.uint8)).save(tmp_path/'ref.png')
    with Image.open(tmp_path/'deep.png') as im: assert im.mode.startswith('I')
    p = predict([tmp_path/'deep.png', tmp_path/'ref.png'], detector='whole', progress=False)
    classes = ['anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral']
    assert np.abs(p[classes].iloc[0].to_numpy() - p[classes].iloc[1].to_numpy()).max() < 1e-6
