"Model bundles are checked when read (tensor checksum, finite weights) and never written with NaN/inf; `predict`'s output CSV is checked before any work (issue 15, items 2, 9 and 11)."
import json, re, warnings
import pytest, torch
import safetensors.torch
from PIL import Image

import emonb.bundles as eb
import emonb.predict as ep
from emonb.cli import main
from emonb.methods import METHODS, method_spec, registered_methods, input_spec
from emonb.bundles import BUNDLE_KEY, CHECKSUM_KEY, BundleChecksumWarning, save_bundle, load_bundle, bundle_header, verify_bundle, add_bundle_checksum
from emonb.predict import predict, default_model_path

pytestmark = pytest.mark.usefixtures('one_thread')
ARCH = dict(c_in=1, n_out=7, widen=0.5)   # the quickstart classifier: tiny, 48x48 grey


def _model(seed=0):
    torch.manual_seed(seed)
    m = method_spec('quickstart').build(**ARCH).eval()
    for p in m.parameters(): p.data.normal_(0, 0.05)
    return m


def _save(model, path, **kw):
    return save_bundle(model, path, 'quickstart', 'fer2013', ARCH, input_spec(48, 'L', 'none'), **kw)


def _data_span(path, name):
    "(start, end) of tensor `name`'s bytes in a safetensors file: 8 bytes of header length (little-endian), the JSON header, the data."
    raw = path.read_bytes(); n = int.from_bytes(raw[:8], 'little')
    a, b = json.loads(raw[8:8 + n])[name]['data_offsets']
    return 8 + n + a, 8 + n + b


def _first_weight(path):
    return next(k for k in safetensors.torch.load_file(str(path)) if k.endswith('weight'))


@pytest.fixture
def bundle(tmp_path):
    return _save(_model(), tmp_path/'m.safetensors')


@pytest.fixture
def face(tmp_path):
    p = tmp_path/'face.png'; Image.new('L', (48, 48), 128).save(p)
    return p


def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path, bundle, face, capsys):
    name = _first_weight(bundle)
    s, e = _data_span(bundle, name)
    raw = bytearray(bundle.read_bytes()); raw[(s + e) // 2] ^= 0x01
    bad = tmp_path/'flipped.safetensors'; bad.write_bytes(bytes(raw))
    assert safetensors.torch.load_file(str(bad))[name].isfinite().all()      # still a valid file with finite values...
    assert bundle_header(bad)['method'] == 'quickstart'
    with pytest.raises(ValueError, match=re.escape(f"bundle {bad} is corrupt: tensor checksum mismatch")): load_bundle(bad)   # ...refused
    # where the user meets it: one line, no traceback, exit status 2
    assert main(['predict', str(face), '--out', str(tmp_path/'p.csv'), '--method', 'bundle', '--weights', str(bad),
                 '--detector', 'whole', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert 'is corrupt: tensor checksum mismatch' in err and 'Traceback' not in err and not (tmp_path/'p.csv').exists()
    assert load_bundle(bundle).method == 'quickstart' and verify_bundle(bundle)['checksum'] == 'verified'


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path, bundle):
    m = _model()
    name = _first_weight(bundle)
    with torch.no_grad(): m.state_dict()[name].view(-1)[:3] = float('nan')
    with pytest.raises(ValueError, match=rf"non-finite weights \(NaN or inf\) in 1 tensor\(s\): {name} \(3 values\)"):
        _save(m, tmp_path/'nan.safetensors')
    assert not (tmp_path/'nan.safetensors').exists()
    # a file holding inf (written without save_bundle, with a correct checksum): load names the file and the tensor
    sd = {k: v.clone() for k, v in safetensors.torch.load_file(str(bundle)).items()}; sd[name].view(-1)[0] = float('inf')
    inf = tmp_path/'inf.safetensors'
    inf.write_bytes(safetensors.torch.save(sd, metadata=eb._bundle_metadata(sd, json.dumps(bundle_header(bundle)))))
    with pytest.raises(ValueError, match=re.escape(f"bundle {inf} holds non-finite weights") + rf".* {name} \(1 value\)"): load_bundle(inf)


def test_a_bundle_without_checksum_still_loads_with_one_warning(tmp_path, bundle):
    old = tmp_path/'old.safetensors'   # as save_bundle wrote it before the checksum
    old.write_bytes(safetensors.torch.save(safetensors.torch.load_file(str(bundle)), metadata={'format': 'pt', BUNDLE_KEY: json.dumps(bundle_header(bundle))}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        b_old = load_bundle(old); load_bundle(old)
    assert [x.category for x in w] == [BundleChecksumWarning] and str(old) in str(w[0].message)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad(): assert torch.equal(b_old.model(x), load_bundle(bundle).model(x))
    assert verify_bundle(old)['checksum'] == 'absent'
    data = old.read_bytes()[_data_span(old, _first_weight(old))[0]:]
    add_bundle_checksum(old)
    assert verify_bundle(old)['checksum'] == 'verified' and old.read_bytes()[_data_span(old, _first_weight(old))[0]:] == data


def test_the_shipped_model_carries_a_checksum():
    assert verify_bundle(default_model_path())['checksum'] == 'verified'


@pytest.fixture
def no_model(monkeypatch):
    "Fail the test if predict gets as far as making a predictor."
    def refuse(*a, **k): raise AssertionError('a model was loaded before the output was checked')
    monkeypatch.setattr(ep, 'make_predictor', refuse)


def test_output_checked_before_any_model_runs(tmp_path, face, no_model, capsys):
    out_dir = tmp_path/'out'; out_dir.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{out_dir} is a folder, not a file")):
        predict(face, save_csv=out_dir, overwrite=True, detector=None, progress=False)
    # the CLI: `emonb predict --out DIR --overwrite` is one line and exit 2, not an IsADirectoryError after the work
    assert main(['predict', str(face), '--out', str(out_dir), '--overwrite', '--detector', 'whole', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert 'is a folder, not a file' in err and 'Traceback' not in err
    (tmp_path/'p.csv').write_text('kept')
    with pytest.raises(FileExistsError, match='overwrite=True'): predict(face, save_csv=tmp_path/'p.csv', detector=None, progress=False)
    assert (tmp_path/'p.csv').read_text() == 'kept'
    with pytest.raises(ValueError, match='cannot be created'):
        predict(face, save_csv=tmp_path/'p.csv'/'x.csv', overwrite=True, detector=None, progress=False)


def test_missing_parent_folders_are_created(tmp_path, bundle, face):
    out = tmp_path/'a'/'b'/'pred.csv'
    df = predict(face, save_csv=out, method='bundle', weights=bundle, detector=None, progress=False)
    assert out.is_file() and out.with_suffix('.json').is_file() and len(df) == 1
