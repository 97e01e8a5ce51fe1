"""A researcher's CLIP checkpoint, end to end: `emonb train METHOD --clip-model NAME --clip-weights FILE` with a file in
OpenAI's layouts (a TorchScript archive as OpenAI distributes it, and a plain float16 state dict) runs the method's
official variant by default, builds the QuickGELU network, and says both in its report and on the console.

The files hold random weights in the layout of emonb's tiny CLIP config (`emonb.testing.TINY_OPENAI_ARCH`), so the
runs are CPU-sized; notebook 05 checks the same loading path against a written-out OpenAI CLIP at ViT-B/32 size."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import numpy as np
import torch

from emonb.synth import SyntheticWorld, write_dataset
from emonb.testing import openai_layout_files, TINY_OPENAI_ARCH

EMONB = str(Path(sys.executable).parent / 'emonb')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


def _emonb(args, timeout=900):
    r = subprocess.run([sys.executable, EMONB] + list(args), capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, f"emonb {' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('openai')
    _, plain, archive = openai_layout_files(root / 'clip', **TINY_OPENAI_ARCH)
    write_dataset(SyntheticWorld(seed=41), root / 'faces', 'rafdb', {'train': 70, 'test': 35})
    write_dataset(SyntheticWorld(seed=42), root / 'clips', 'dfew', {'train': 21, 'test': 7})
    write_dataset(SyntheticWorld(seed=43), root / 'scenes', 'caer_s', {'train': 42, 'val': 14, 'test': 14})
    yield dict(root=root, plain=plain, archive=archive)
    shutil.rmtree(root, ignore_errors=True)


RUNS = {
    'kefer': ['--dataset', 'rafdb', 'faces', '--backbone', 'clip', '--text-encoder', 'clip', '--lr', '1e-4', '--size', '64'],
    'dferclip': ['--dataset', 'dfew', 'clips', '--n-frames', '4', '--size', '64'],
    'cocoer': ['--dataset', 'world', 'scenes', '--size', '32', '--lr', '3e-4'],
}


@pytest.mark.parametrize('method', list(RUNS))
def test_train_with_an_openai_archive_runs_the_official_variant(data, method):
    a = RUNS[method]
    out = data['root'] / f'{method}-run'
    stdout = _emonb(['train', method, a[0], a[1], '--root', str(data['root'] / a[2]), *a[3:], '--epochs', '1', '--bs', '8',
                     '--clip-model', 'emonb-tiny-vit', '--clip-weights', str(data['archive']), '--out', str(out), '--no-progress'])
    run = json.loads((out / 'report' / 'metrics.json').read_text())['run']
    assert run['variant'] == 'official'
    assert run['clip_checkpoint'] == dict(name='emonb-tiny-vit-quickgelu', activation='quickgelu', weights=str(data['archive']),
                                          weights_format='torchscript'), run['clip_checkpoint']
    assert 'variant official' in stdout and 'CLIP emonb-tiny-vit-quickgelu (quickgelu)' in stdout, stdout
    # the bundle the run wrote rebuilds the QuickGELU network
    from emonb.bundles import load_bundle
    b = load_bundle(out / 'model.safetensors')
    clips = [m for m in b.model.modules() if type(m).__name__ == 'ClipEncoder']
    assert clips and all(c.activation == 'quickgelu' for c in clips)


def test_plain_state_dict_and_the_gelu_switch(data):
    """A plain state dict is OpenAI's QuickGELU by default; --clip-activation gelu builds the GELU network (LAION-style
    weights), --variant picks emonb's own variant, and both are recorded."""
    out = data['root'] / 'kefer-gelu'
    a = RUNS['kefer']
    _emonb(['train', 'kefer', a[0], a[1], '--root', str(data['root'] / a[2]), *a[3:], '--epochs', '1', '--bs', '8',
            '--clip-model', 'emonb-tiny-vit', '--clip-weights', str(data['plain']), '--clip-activation', 'gelu',
            '--variant', 'emonb', '--out', str(out), '--no-progress'])
    run = json.loads((out / 'report' / 'metrics.json').read_text())['run']
    assert run['variant'] == 'emonb'
    assert (run['clip_checkpoint']['name'], run['clip_checkpoint']['activation'], run['clip_checkpoint']['weights_format']) == \
        ('emonb-tiny-vit', 'gelu', 'state_dict')


def test_mismatched_checkpoint_is_one_clear_line(data):
    r = subprocess.run([sys.executable, EMONB, 'train', 'dferclip', '--dataset', 'dfew', '--root', str(data['root'] / 'clips'),
                        '--clip-model', 'ViT-B-32', '--clip-weights', str(data['archive']), '--out', str(data['root'] / 'bad')],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert 'Traceback' not in r.stderr and "does not hold the weights of CLIP 'ViT-B-32-quickgelu'" in err[-1], r.stderr[-2000:]
    assert 'emonb-tiny-vit' in err[-1]                      # it names the config the file fits


def test_expclip_with_an_openai_archive(data, monkeypatch):
    """Exp-CLIP needs a teacher (BLIP-2 + Flan-T5 weights on the command line, which this machine lacks): the same
    loading path through `train`, with a stand-in teacher that maps each image to a fixed random vector."""
    monkeypatch.setenv('EMONB_HOME', str(data['root'] / 'home'))       # the teacher's and the CLIP's feature caches
    from emonb.train import train, load_clip, read_training_table
    from emonb.expclip import FunctionTeacher
    clip = load_clip('emonb-tiny-vit', data['archive'])
    assert (clip.name, clip.activation) == ('emonb-tiny-vit-quickgelu', 'quickgelu')
    g = torch.Generator().manual_seed(0)
    R = torch.randn(8 * 8 * 3, 32, generator=g)               # a fixed random map of 8x8 thumbnails: deterministic targets
    from PIL import Image
    thumb = lambda im: (im if isinstance(im, Image.Image) else Image.open(im)).convert('RGB').resize((8, 8))   # items are paths
    pixels = lambda ims: torch.stack([torch.from_numpy(np.asarray(thumb(im), dtype=np.float32).flatten() / 255) for im in ims])
    teacher = FunctionTeacher(lambda ims: pixels(ims) @ R, dim=32, name='thumbnail-projection', fingerprint='thumb8-seed0')
    faces = read_training_table('rafdb', data['root'] / 'faces')
    _, m = train('expclip', faces, data['root'] / 'expclip-run', clip=clip, teacher=teacher, epochs=1, bs=16, progress=False)
    assert m['run']['variant'] == 'official'
    assert m['run']['clip_checkpoint']['weights_format'] == 'torchscript'
    reports = list((data['root'] / 'expclip-run' / 'report').rglob('metrics.json'))
    assert reports and all(json.loads(f.read_text())['run']['variant'] == 'official' for f in reports)


def test_zeroshot_with_an_openai_archive_and_the_gelu_switch(data):
    """`emonb zeroshot` (and `eval`, `predict`) load a CLIP file the same way: QuickGELU for OpenAI's archive, recorded in the
    report; `--clip-activation gelu` gives the GELU network and other numbers."""
    faces = str(data['root'] / 'faces')
    runs = {}
    for act in (None, 'gelu'):
        out = data['root'] / f'zeroshot-{act}'
        _emonb(['zeroshot', '--dataset', 'rafdb', '--root', faces, '--clip-model', 'emonb-tiny-vit', '--weights', str(data['plain']),
                '--out', str(out), '--no-progress'] + (['--clip-activation', act] if act else []))
        runs[act] = json.loads((out / 'metrics.json').read_text())
    assert runs[None]['run']['clip']['activation'] == 'quickgelu' and runs['gelu']['run']['clip']['activation'] == 'gelu'
    assert runs[None]['run']['clip']['weights_format'] == 'state_dict'
    import pandas as pd
    p = [pd.read_csv(data['root'] / f'zeroshot-{act}' / 'predictions.csv') for act in (None, 'gelu')]
    prob = [c for c in p[0].columns if c.startswith('p_')]
    assert len(prob) == 7
    assert (p[0][prob].to_numpy(float) != p[1][prob].to_numpy(float)).any()      # another network, other probabilities
