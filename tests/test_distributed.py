"""Data-parallel training in two CPU processes (gloo), launched as a user would: `torchrun ... emonb train ...`.

Every method trains through `emonb.learner.fit`, which goes data-parallel by itself under a multi-process launch.
These tests train on the synthetic world in one process and in two, and check that the two processes agree,
that the result is the single process's within noise, and that rank 0 alone writes checkpoints and reports."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch

from emonb.synth import SyntheticWorld, write_dataset

EMONB = str(Path(sys.executable).parent / 'emonb')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


def _emonb(args, out, nproc=1, timeout=900):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), EMONB] if nproc > 1
           else [sys.executable, EMONB]) + list(args) + ['--out', str(out), '--no-progress']
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _metrics(out):
    return json.loads((Path(out) / 'report' / 'metrics.json').read_text())


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('world')
    write_dataset(SyntheticWorld(seed=31), root / 'faces', 'rafdb', {'train': 420, 'test': 210})
    write_dataset(SyntheticWorld(seed=32), root / 'scenes', 'caer_s', {'train': 210, 'val': 70, 'test': 140})
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_kefer_two_processes_match_one(world):
    """KEFER on the world CLIP: 2 processes at batch 16 each train like 1 process at batch 32."""
    args = ['train', 'kefer', '--dataset', 'rafdb', '--root', str(world / 'faces'), '--backbone', 'clip',
            '--text-encoder', 'clip', '--epochs', '3', '--lr', '1e-4', '--size', '64', '--seed', '0']
    _emonb(args + ['--bs', '32'], world / 'one')
    stdout = _emonb(args + ['--bs', '16'], world / 'two', nproc=2)
    one, two = _metrics(world / 'one'), _metrics(world / 'two')
    assert stdout.count('test WAR') == 1                       # only rank 0 reports
    assert two['n'] == one['n'] == 210
    assert two['war'] > 2 / 7 and one['war'] > 2 / 7            # both learn (chance 1/7)
    assert abs(two['war'] - one['war']) < 0.08, (one['war'], two['war'])   # the same within noise
    ck = sorted(p.name for p in (world / 'two' / 'models' / 'checkpoints').iterdir())
    assert ck == sorted(p.name for p in (world / 'one' / 'models' / 'checkpoints').iterdir())
    assert not any(n.endswith('.tmp') or n.startswith('.') for n in ck)     # no half-written files
    state = torch.load(world / 'two' / 'models' / 'checkpoints' / 'best.pth', weights_only=False)
    assert not any(k.startswith('module.') for k in state['model'])        # the plain model's weights
    # the best epoch, chosen on gathered validation metrics, is the one the report says
    assert two['run']['best_epoch'] == state['epoch']


@pytest.mark.parametrize('method, extra', [
    ('cocoer', ['--size', '32', '--lr', '3e-4']),
    ('mlper', ['--lr', '1e-2']),
])
def test_scene_methods_train_in_two_processes(world, method, extra):
    """The multi-level methods train data-parallel as well (smoke runs of one epoch)."""
    out = world / f'{method}-two'
    kw = ['--epochs', '1', '--bs', '16', '--seed', '0'] + extra
    stdout = _emonb(['train', method, '--dataset', 'world', '--root', str(world / 'scenes')] + kw, out, nproc=2)
    assert stdout.count('test WAR') == 1
    m = _metrics(out)
    assert m['n'] == 140 and 0 <= m['war'] <= 1
    state = torch.load(out / 'models' / 'checkpoints' / 'last.pth', weights_only=False)
    assert not any(k.startswith('module.') for k in state['model'])
