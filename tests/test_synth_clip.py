"emonb.synth_clip: the packaged world CLIP checkpoint ships in the wheel, loads offline, embeds, and classifies zero-shot above chance."
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

import emonb
from emonb.core import label_set
from emonb.synth_clip import (WORLD_CLIP, FACE_PROMPT, world_clip_path, world_clip_info, load_world_clip, world_clip_encoder,
                             world_eval_set, encode_images, encode_texts, zero_shot_accuracy, face_caption)

ROOT = Path(__file__).resolve().parent.parent
from conftest import install_into_bare_folder


@pytest.fixture(scope='module')
def world_clip():
    return load_world_clip()


def test_checkpoint_is_package_data():
    p = world_clip_path()
    assert p.name == 'world_clip.safetensors' and p.parent == Path(emonb.__file__).parent / 'weights'
    assert p.exists(), f"{p} is missing: run the slow cell of nbs/05a_synth_clip.ipynb"
    assert p.stat().st_size < 15e6
    info = world_clip_info()
    assert info['config'] == WORLD_CLIP and info['dtype'] == 'float16'
    assert {'recipe', 'n_pairs', 'eval', 'date', 'seconds'} <= set(info)
    assert info['eval']['face_zero_shot_accuracy'] > 3 / 7


def test_loads_from_an_installed_wheel(tmp_path):
    "Build the wheel, install it into a bare folder, and load the checkpoint from there via importlib.resources."
    site = install_into_bare_folder(tmp_path)
    assert (site / 'emonb' / 'weights' / 'world_clip.safetensors').exists()
    assert (site / 'emonb' / 'model_configs' / 'emonb-world-clip.json').exists()
    code = ("import emonb, emonb.synth_clip as W, torch; m, pre, tok = W.load_world_clip(); "
            "t = m.encode_text(tok(['a happy face']), normalize=True); "
            "print(emonb.__file__); print(W.world_clip_path()); print(tuple(t.shape), round(float(t.norm()), 4))")
    env = {**os.environ, 'PYTHONPATH': str(site), 'HF_HUB_OFFLINE': '1'}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    file, path, emb = r.stdout.strip().splitlines()
    assert file.startswith(str(site)) and path.startswith(str(site))  # the installed copy, not the repository
    assert emb == '(1, 64) 1.0'


def test_embeddings_normalised(world_clip):
    model, preprocess, tokenizer = world_clip
    ims, y, scenes = world_eval_set(14)
    img = encode_images(model, preprocess, ims)
    txt = encode_texts(model, tokenizer, [face_caption(s, np.random.default_rng(0)) for s in scenes])
    for e in (img, txt):
        assert e.shape == (14, 64)
        assert torch.allclose(e.norm(dim=1), torch.ones(14), atol=1e-4)
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_zero_shot_above_chance(world_clip):
    model, preprocess, tokenizer = world_clip
    ims, y, _ = world_eval_set(140, seed=77)  # 20 faces per class, from a world no test or training used
    acc, scores = zero_shot_accuracy(model, tokenizer, encode_images(model, preprocess, ims), y,
                                     [FACE_PROMPT.format(c) for c in label_set('basic7').names])
    assert scores.shape == (140, 7)
    assert acc > 2.5 / 7, acc


def test_clip_encoder_wraps_the_same_model(world_clip):
    model, preprocess, tokenizer = world_clip
    enc = world_clip_encoder()
    assert enc.embed_dim == 64 and enc.name == WORLD_CLIP
    ims, _, _ = world_eval_set(3)
    x = torch.stack([preprocess(im) for im in ims])
    assert torch.allclose(enc.encode_image(x), encode_images(model, preprocess, ims), atol=1e-5)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='pretraining cell'):
        load_world_clip(path=tmp_path / 'nope.safetensors')
