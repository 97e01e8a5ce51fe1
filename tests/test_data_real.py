"The dataset readers on the real inputs we have: the FER2013 archive and DFER-CLIP's split files (../shared/data)."
import os
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from emonb.core import label_set
from emonb.data import (read_fer2013, read_dfer_clip_splits, extract_archive, class_counts, split_validation,
                        image_dataloaders, split_dataloader, load_image, DFER_CLIP_SPLIT_FILES, problem_report)

SHARED = Path(os.environ.get('EMONB_SHARED_DATA', Path(__file__).resolve().parents[2]/'shared'/'data'))
FER = SHARED/'fer2013'/'fer2013-train-publictest.tar.gz'
SPLITS = SHARED/'splits'/'dfer-clip-splits.tar.gz'
needs_fer = pytest.mark.skipif(not FER.exists(), reason=f"real FER2013 archive not found at {FER} (set EMONB_SHARED_DATA)")
needs_splits = pytest.mark.skipif(not SPLITS.exists(), reason=f"DFER-CLIP split files not found at {SPLITS}")

@pytest.fixture(scope='module')
def fer():
    return read_fer2013(FER)

@needs_fer
def test_fer2013_counts(fer):
    c = class_counts(fer)
    assert c.sum().to_dict() == {'train': 28709, 'val': 3589}
    assert c['train'].to_dict() == {'anger': 3995, 'disgust': 436, 'fear': 4097, 'happiness': 7215, 'sadness': 4830,
                                    'surprise': 3171, 'neutral': 4965}
    assert c['val'].to_dict() == {'anger': 467, 'disgust': 56, 'fear': 496, 'happiness': 895, 'sadness': 653,
                                  'surprise': 415, 'neutral': 607}
    assert fer.subset.isin(['Training', 'PublicTest']).all() and len(problem_report(fer)) == 0

@needs_fer
def test_fer2013_images_load_and_batch(fer):
    im = load_image(fer.path[0])
    assert im.size == (48, 48) and im.mode == 'RGB'
    small = fer.groupby(['split', 'label']).head(6).reset_index(drop=True)      # 6 per class per split
    t = split_validation(small[small.split == 'train'], 0.25, seed=0)
    t = pd.concat([t, small[small.split == 'val'].assign(split='test')], ignore_index=True); t.attrs = fer.attrs
    dls = image_dataloaders(t, size=48, bs=8, normalize='imagenet')
    xb, yb = dls.one_batch()
    assert xb.shape == (8, 3, 48, 48)
    assert list(dls.vocab) == list(label_set('fer2013').names)
    xt, yt = split_dataloader(dls, t).one_batch()
    assert xt.shape[1:] == (3, 48, 48)

@needs_splits
@pytest.mark.parametrize('dataset', ['dfew', 'mafw', 'ferv39k'])
def test_every_split_file_parses_with_its_size(dataset):
    df = read_dfer_clip_splits(SPLITS, dataset)
    folder = extract_archive(SPLITS)/'dfer-clip'
    folds = [None] if dataset == 'ferv39k' else [1, 2, 3, 4, 5]
    n_classes = len(label_set(dataset))
    for fold in folds:
        for split in ('train', 'test'):
            f = folder/DFER_CLIP_SPLIT_FILES[dataset].format(fold=fold, split=split)
            lines = [l for l in f.read_text().splitlines() if l.strip()]
            part = df[(df.split == split) & ((df.fold == fold) if fold else df.fold.isna())]
            assert len(part) == len(lines), f.name
            assert part.label.nunique() == n_classes
            assert (part.n_frames > 0).all()
    assert len(problem_report(df)) == 0

@needs_splits
def test_reroot_keeps_ferv39k_structure():
    df = read_dfer_clip_splits(SPLITS, 'ferv39k', reroot='/data/ferv39k')
    assert df.path.str.startswith('/data/ferv39k/').all()
    assert df.path.str.count('/').min() >= 4   # scene/Class/clip kept below the new root
