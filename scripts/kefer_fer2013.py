#!/usr/bin/env python
"""Knowledge-enhanced FER vs. the same ResNet-18 with a plain classifier head, trained from scratch on the real FER2013.

A GPU job (about 26k training images per epoch). Each method writes `<out>/<method>/report/{metrics.json,predictions.csv,
confusion.png}` and checkpoints in `<out>/<method>/models/checkpoints/`; `<out>/summary.json` collects WAR / UAR.

Full run (the command the notebook nbs/10_kefer.ipynb reports):
    python scripts/kefer_fer2013.py --out runs/kefer-fer2013 --num-workers 12
On a machine without the text encoder's weights (e.g. a GPU box with no internet), compute the prototypes where the
encoder is, then carry the small file:
    python scripts/kefer_fer2013.py --save-prototypes kefer_protos.pt
    python scripts/kefer_fer2013.py --out runs/kefer-fer2013 --prototypes kefer_protos.pt
One method per call (each fits in a 10-minute slot on an H100 if the data loading keeps up):
    python scripts/kefer_fer2013.py --out runs/kefer-fer2013 --methods kefer --num-workers 12
Smoke test on a CPU (seconds, proves the script runs, says nothing about accuracy):
    python scripts/kefer_fer2013.py --out /tmp/kefer-smoke --per-class 10 --epochs 1 --bs 32 --stem imagenet --device cpu

Recipes (`--recipe`; every field can be overridden):
  reference  the recipe of the FER2013 reference numbers in ../shared/data/README.md (CIFAR-style ResNet-18 from scratch,
             SGD Nesterov, one-cycle, max lr 0.1, wd 5e-4, batch 256, 60 epochs, label smoothing 0.1 for the classifier,
             hflip test-time averaging): both methods get exactly this budget.
  paper      the paper's fine-tuning recipe (SGD lr 2e-3, momentum 0.9, wd 5e-4, warm-up cosine, 50 epochs, batch 64);
             it was written for encoders pretrained on MS-Celeb-1M and under-trains a network from scratch.
Protocols (`--protocol`):
  holdout    (default) validation = a stratified 10% of Training, the best validation epoch is kept, PublicTest is
             evaluated once as the test set.
  publictest train on all of Training, PublicTest is the validation set, and the *last* epoch is evaluated on it
             (no selection on it): the protocol of the reference numbers.
"""
from __future__ import annotations
import argparse, json, os, shlex, sys, time
from pathlib import Path
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get('EMONB_SHARED_DATA', ROOT.parent/'shared'/'data'))/'fer2013'/'fer2013-train-publictest.tar.gz'
RECIPES = {
    'reference': dict(epochs=60, lr=0.1, bs=256, schedule='one_cycle', wd=5e-4, nesterov=True, warmup_epochs=0.,
                      label_smoothing=0.1, stem='cifar'),
    'paper': dict(epochs=50, lr=2e-3, bs=64, schedule='warmup_cosine', wd=5e-4, nesterov=False, warmup_epochs=None,
                  label_smoothing=0., stem='imagenet'),
}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 2)[2])
    p.add_argument('--data', default=str(DEFAULT_DATA), help='FER2013 image archive or extracted folder')
    p.add_argument('--out', help='output folder (must be new or empty unless --overwrite)')
    p.add_argument('--prototypes', help='load the class prototypes from this file (written by --save-prototypes) instead of running the text encoder')
    p.add_argument('--save-prototypes', help='compute the class prototypes with the text encoder, save them to this file and exit')
    p.add_argument('--methods', default='kefer,classifier', help='comma-separated: kefer, classifier')
    p.add_argument('--recipe', choices=sorted(RECIPES), default='reference')
    p.add_argument('--protocol', choices=['holdout', 'publictest'], default='holdout')
    p.add_argument('--valid-pct', type=float, default=0.1, help='holdout: fraction of Training used for validation')
    p.add_argument('--epochs', type=int); p.add_argument('--lr', type=float); p.add_argument('--bs', type=int)
    p.add_argument('--wd', type=float); p.add_argument('--schedule'); p.add_argument('--warmup-epochs', type=float)
    p.add_argument('--nesterov', action=argparse.BooleanOptionalAction, default=None)
    p.add_argument('--label-smoothing', type=float, help='classifier only')
    p.add_argument('--stem', choices=['cifar', 'imagenet'], help='ResNet-18 stem (cifar: 3x3 stride 1, no max-pool)')
    p.add_argument('--size', type=int, default=48)
    p.add_argument('--augment', default='kefer', help='emonb.data augmentation preset')
    p.add_argument('--hflip-tta', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--variant', choices=('official', 'paper', 'emonb'), default='emonb',
                   help="emonb.kefer variant (default emonb: what the recorded numbers used; see 10_kefer's variant table)")
    p.add_argument('--tau', type=float, default=None, help='temperature (default: the variant\'s)'); p.add_argument('--gamma', type=float, default=2.)
    p.add_argument('--lambdas', default='1,1,1', help='lambda_s,lambda_t,lambda_c')
    p.add_argument('--all-pairs', action=argparse.BooleanOptionalAction, default=None, help="L_c over all anchor/sample pairs (default: the variant's; official: yes)")
    p.add_argument('--text-encoder', default=None, help='Hugging Face text encoder folder (default: all-MiniLM-L6-v2)')
    p.add_argument('--template', default=None, help='prompt template with [CLS] (default: the paper\'s)')
    p.add_argument('--per-class', type=int, default=None, help='use at most this many training images per class (smoke tests)')
    p.add_argument('--max-test', type=int, default=None, help='evaluate on a random subset of this many test images (smoke tests)')
    p.add_argument('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'])
    p.add_argument('--device', default=None, help='cuda / cpu (default: cuda if available)')
    p.add_argument('--num-workers', type=int, default=8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--overwrite', action='store_true')
    return p.parse_args(argv)

def build_table(fer: pd.DataFrame, protocol: str, valid_pct: float, per_class, seed: int, max_test=None) -> pd.DataFrame:
    "train / val / test rows of FER2013 for `protocol` (the reader marks PublicTest as 'val')."
    from emonb.data import split_validation
    train, public = fer[fer.split == 'train'], fer[fer.split == 'val']
    if per_class: train = train.sample(frac=1, random_state=seed).groupby('label').head(per_class)
    if max_test: public = public.sample(n=min(max_test, len(public)), random_state=seed)
    if protocol == 'holdout':
        t = split_validation(train.reset_index(drop=True), valid_pct, seed=seed)
        df = pd.concat([t, public.assign(split='test')], ignore_index=True)
    else:
        df = pd.concat([train, public, public.assign(split='test')], ignore_index=True)
    df.attrs = dict(fer.attrs)
    return df

def save_prototypes(path, text_encoder=None, template=None, variant='emonb'):
    "Compute the FER2013 class prototypes once with the text encoder and save them with what made them."
    import torch, io
    from emonb.core import label_set, atomic_write_bytes
    from emonb.encoders import HFTextEncoder
    from emonb.prompts import KEFER_DEFAULT
    from emonb.kefer import text_prototypes
    labels = label_set('fer2013')
    enc = HFTextEncoder(text_encoder)
    protos = text_prototypes(labels, enc, template or KEFER_DEFAULT, variant=variant)
    buf = io.BytesIO()
    torch.save(dict(prototypes=protos, labels=list(labels.names), template=template or KEFER_DEFAULT,
                    text_encoder=str(text_encoder or 'all-MiniLM-L6-v2')), buf)
    atomic_write_bytes(path, buf.getvalue())
    print(f"saved {tuple(protos.shape)} prototypes of {list(labels.names)} to {path}")

def load_prototypes(path, labels, template=None):
    "Prototypes saved by `save_prototypes`, checked against the dataset's classes (and template, when given)."
    import torch
    from emonb.core import label_set
    labels = label_set(labels)
    d = torch.load(path, map_location='cpu')
    if list(d['labels']) != list(labels.names):
        raise ValueError(f"{path}: prototypes are for classes {d['labels']}, the data has {list(labels.names)}")
    if template and template != d['template']:
        raise ValueError(f"{path}: prototypes were made with template {d['template']!r}, not {template!r}")
    print(f"prototypes from {path}: {d['text_encoder']}, template {d['template']!r}")
    return d['prototypes']

def main(argv=None):
    a = parse_args(argv)
    import torch
    from emonb.core import prepare_output_dir, atomic_write_json
    from emonb.data import read_fer2013, class_counts
    from emonb.encoders import HFTextEncoder
    from emonb.prompts import KEFER_DEFAULT
    from emonb.kefer import kefer_config, train_kefer, train_classifier, text_prototypes
    methods = [m.strip() for m in a.methods.split(',') if m.strip()]
    bad = [m for m in methods if m not in ('kefer', 'classifier')]
    if bad: sys.exit(f"unknown method(s) {bad}: use kefer and/or classifier")
    r = dict(RECIPES[a.recipe])
    for k in ('epochs', 'lr', 'bs', 'wd', 'schedule', 'warmup_epochs', 'nesterov', 'label_smoothing', 'stem'):
        v = getattr(a, k)
        if v is not None: r[k] = v
    if a.save_prototypes:
        save_prototypes(a.save_prototypes, a.text_encoder, a.template, a.variant)
        return None
    if not a.out: sys.exit('--out is required (unless --save-prototypes)')
    out = prepare_output_dir(a.out, overwrite=a.overwrite)
    command = 'python ' + ' '.join(shlex.quote(x) for x in [str(Path(__file__).relative_to(ROOT)) if Path(__file__).is_relative_to(ROOT) else __file__] + sys.argv[1:])
    device = a.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    fer = read_fer2013(a.data)
    df = build_table(fer, a.protocol, a.valid_pct, a.per_class, a.seed, a.max_test)
    print(f"FER2013 from {a.data}: {df.split.value_counts().to_dict()} ({a.protocol} protocol), device {device}")
    print(class_counts(df).to_string())
    cfg_kw = dict(epochs=r['epochs'], lr=r['lr'], wd=r['wd'], schedule=r['schedule'], nesterov=r['nesterov'], seed=a.seed,
                  precision=a.precision, monitor='war')
    if r['warmup_epochs'] is not None: cfg_kw['warmup_epochs'] = r['warmup_epochs']
    config = kefer_config(a.variant, **cfg_kw)
    common = dict(arch='resnet18', stem=r['stem'], size=a.size, bs=r['bs'], config=config, augment=a.augment,
                  normalize='imagenet', select='best' if a.protocol == 'holdout' else 'last', hflip_tta=a.hflip_tta,
                  num_workers=a.num_workers, progress=True, device=device, variant=a.variant, run=dict(command=command, recipe=a.recipe, protocol=a.protocol))
    summary = dict(command=command, recipe=r, protocol=a.protocol, variant=a.variant, device=device,
                   gpu=torch.cuda.get_device_name(0) if device.startswith('cuda') else None, results={})
    for m in methods:
        t0 = time.time()
        if m == 'kefer':
            protos = (load_prototypes(a.prototypes, fer.attrs['label_set'], a.template) if a.prototypes else
                      text_prototypes(fer.attrs['label_set'], HFTextEncoder(a.text_encoder), a.template or KEFER_DEFAULT, variant=a.variant))
            _, met = train_kefer(df, out/m, prototypes=protos, tau=a.tau, gamma=a.gamma, all_pairs=a.all_pairs,
                                 lambdas=tuple(float(x) for x in a.lambdas.split(',')), **common)
        else:
            _, met = train_classifier(df, out/m, label_smoothing=r['label_smoothing'], **common)
        summary['results'][m] = dict(war=met['war'], uar=met['uar'], n_test=met['n'], best_epoch=met['run']['best_epoch'],
                                     seconds=round(time.time() - t0, 1), report=str(out/m/'report'))
        print(f"{m}: WAR {met['war']:.2%}  UAR {met['uar']:.2%}  (n={met['n']}, {time.time() - t0:.0f} s)", flush=True)
    atomic_write_json(out/'summary.json', summary)
    print('\n'.join(f"{m:<11} WAR {v['war']:.2%}  UAR {v['uar']:.2%}" for m, v in summary['results'].items()))
    print(f"command: {command}")
    return summary

if __name__ == '__main__': main()
