"The shipped real-face model and face detector: from a wheel installed into a bare folder, with no repository or shared data beside it, `emonb predict` labels the four smiling faces of the group photo happiness."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

from emonb.crops import shared_data_dir, YUNET_FILE
from emonb.predict import FER2013_MODEL, default_model_path
from emonb.bundles import bundle_header

ROOT = Path(__file__).resolve().parents[1]
from conftest import install_into_bare_folder
D = shared_data_dir()
SMILING = [0, 2, 3, 4]   # faces of multiface.jpg, left to right, that smile (the other two do not)


def test_shipped_files_are_in_the_package():
    h = bundle_header(default_model_path())
    assert (h['method'], h['labels']['name'], h['input']['mode'], h['input']['size']) == ('classifier', 'fer2013', 'L', 48)
    assert default_model_path().stat().st_size <= 25e6
    assert (ROOT/'emonb'/'weights'/YUNET_FILE).is_file() and (ROOT/'emonb'/'weights'/'LICENSE-yunet.txt').is_file()
    assert h['info']['war'] > 0.5, h['info']['war']   # the PublicTest WAR of the run it came from
    assert h['int8']['agreement'] > 0.95 and 'FER2013 Training' in h['int8']['source']   # scripts/fer2013_int8.py


@pytest.mark.skipif(D is None, reason='the shared data folder with the real photos is absent')
def test_fresh_install_predicts_the_smiling_faces(tmp_path):
    site, work = install_into_bare_folder(tmp_path), tmp_path/'work'
    for f in (FER2013_MODEL, YUNET_FILE, 'LICENSE-yunet.txt'): assert (site/'emonb'/'weights'/f).is_file(), f
    work.mkdir(); photo = work/'multiface.jpg'; shutil.copy(D/'images'/'multiface.jpg', photo)   # no shared/ beside it
    env = {k: v for k, v in os.environ.items() if k not in ('EMONB_SHARED_DATA', 'PYTHONPATH')}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE='1', YOLO_OFFLINE='1', EMONB_HOME=str(tmp_path/'home'))
    cli = 'import sys; from emonb.cli import main; sys.exit(main(sys.argv[1:]))'      # what the `emonb` console script runs
    r = subprocess.run([sys.executable, '-c', cli, 'predict', str(photo), '--out', str(work/'pred.csv'), '--no-progress'],
                       capture_output=True, text=True, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'emonb_fer2013' in r.stdout and 'yunet' in r.stdout, r.stdout
    import pandas as pd
    df = pd.read_csv(work/'pred.csv')
    assert len(df) == 6 and (df.status == 'face').all()
    assert df.x0.is_monotonic_increasing
    assert df.top.iloc[SMILING].tolist() == ['happiness'] * 4, df[['face', 'top', 'top_prob']]
    summary = json.loads((work/'pred.json').read_text())
    assert str(site) in summary['predictor']['weights']   # the installed copy, not the repository's
    # int8 on the CPU from the installed copy: the same faces, the same top classes
    r8 = subprocess.run([sys.executable, '-c', cli, 'predict', str(photo), '--out', str(work/'pred8.csv'), '--no-progress',
                         '--precision', 'int8', '--device', 'cpu'], capture_output=True, text=True, env=env, cwd=work)
    assert r8.returncode == 0, r8.stderr[-3000:]
    assert '(int8)' in r8.stdout, r8.stdout
    assert pd.read_csv(work/'pred8.csv').top.tolist() == df.top.tolist()


def test_cross_dataset_eval_of_ckplus_style_folders(tmp_path):
    "CK+-style folders (contempt, no neutral) evaluated with the FER2013 model from the CLI: --missing zero scores contempt as never predicted and reports the shared classes too."
    import numpy as np
    from PIL import Image
    from emonb.cli import main
    root = tmp_path/'ck'
    rng = np.random.default_rng(0)
    for n in ('anger', 'contempt', 'disgust', 'fear', 'happy', 'sadness', 'surprise'):
        (root/n).mkdir(parents=True)
        for j in range(2): Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root/n/f'{j}.png')
    args = ['eval', '--dataset', 'folders', '--root', str(root), '--method', 'default', '--no-progress']
    assert main(args + ['--out', str(tmp_path/'r0')]) == 2          # contempt: the model cannot predict it
    assert main(args + ['--out', str(tmp_path/'r1'), '--missing', 'zero']) == 0
    m = json.loads((tmp_path/'r1'/'metrics.json').read_text())
    assert m['n'] == 14 and m['run']['dropped_model_classes'] == ['neutral'] and m['run']['missing_test_classes'] == ['contempt']
    sh = m['run']['shared_classes']
    assert sh['n'] == 12 and 'contempt' not in sh['classes'] and len(sh['classes']) == 6
    assert abs(m['war'] - sh['war'] * 12 / 14) < 1e-9   # the same predictions; contempt's 2 rows count as errors over all classes
    # int8 on the CPU: the same report, its precision recorded
    assert main(args + ['--out', str(tmp_path/'r8'), '--missing', 'zero', '--precision', 'int8', '--device', 'cpu']) == 0
    m8 = json.loads((tmp_path/'r8'/'metrics.json').read_text())
    assert m8['run']['precision'] == 'int8' and m['run']['precision'] == 'fp32' and m8['n'] == 14
    # mirror averaging: recorded, and the same rows scored
    assert main(args + ['--out', str(tmp_path/'rf'), '--missing', 'zero', '--hflip', '--device', 'cpu']) == 0
    mf = json.loads((tmp_path/'rf'/'metrics.json').read_text())
    assert mf['run']['hflip'] is True and m['run']['hflip'] is False and mf['n'] == 14
