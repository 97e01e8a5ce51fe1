"The knowledge-enhanced FER method on the real FER2013 (../shared/data) with a timm ResNet-18 from scratch and the real MiniLM: a short CPU run that must clearly learn."
import os, json, sys, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get('EMONB_SHARED_DATA', ROOT.parent/'shared'/'data'))
FER = SHARED/'fer2013'/'fer2013-train-publictest.tar.gz'
needs_fer = pytest.mark.skipif(not FER.exists(), reason=f"real FER2013 archive not found at {FER} (set EMONB_SHARED_DATA)")

@pytest.fixture(scope='module')
def small():
    from emonb.data import read_fer2013
    from emonb.kefer import fer2013_subset
    return fer2013_subset(read_fer2013(FER), per_class=300, n_val=500, n_test=1000, seed=0)

@needs_fer
def test_kefer_learns_on_real_fer2013(small, tmp_path):
    """2,100 training faces, 15 epochs of a ResNet-18 from scratch (a few CPU minutes): WAR above the majority class, UAR well
    above chance. emonb's variant: from scratch at this budget the official variant (face-embedding head, all-pairs L_c)
    learns less (measured: 29.1% WAR on these 1,000 faces, against 36.1% for emonb's; nbs/experiments/kefer_experiments.ipynb)."""
    from emonb.kefer import train_kefer, kefer_config
    test = small[small.split == 'test']
    majority = test.label.value_counts(normalize=True).max()          # happiness, ~25%
    learn, m = train_kefer(small, tmp_path/'kefer', config=kefer_config('emonb', epochs=15, lr=0.05), size=48, bs=64, progress=False,
                           variant='emonb')
    assert m['n'] == len(test) == 1000
    assert m['war'] > majority + 0.05, f"WAR {m['war']:.3f} not clearly above the majority rate {majority:.3f}"
    assert m['uar'] > 0.25, f"UAR {m['uar']:.3f} not clearly above chance (1/7)"
    saved = json.loads((tmp_path/'kefer'/'report'/'metrics.json').read_text())
    assert saved['run']['method'] == 'kefer' and 'minilm' in saved['run']['text_encoder'].lower() and saved['run']['variant'] == 'emonb'
    assert saved['run']['visual_encoder'] == 'resnet18' and saved['run']['n_train'] == 2100
    assert learn.model.prototypes.shape == (7, 384)

@needs_fer
def test_script_smoke(tmp_path):
    "scripts/kefer_fer2013.py end to end on a tiny slice (seconds): both methods, a summary with WAR / UAR."
    r = subprocess.run([sys.executable, str(ROOT/'scripts'/'kefer_fer2013.py'), '--data', str(FER), '--out', str(tmp_path/'run'),
                        '--per-class', '8', '--epochs', '1', '--bs', '16', '--stem', 'imagenet', '--device', 'cpu',
                        '--num-workers', '0', '--no-hflip-tta', '--max-test', '200'], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path/'run'/'summary.json').read_text())
    assert set(s['results']) == {'kefer', 'classifier'}
    assert all(0 <= v['war'] <= 1 and v['n_test'] == 200 for v in s['results'].values())
    assert 'WAR' in r.stdout and 'command: python scripts/kefer_fer2013.py' in r.stdout
