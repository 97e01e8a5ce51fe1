"""Train emonb's FER2013 expression classifier on the small-image fast path (emonb.cache.small_image_dataloaders) and bundle it.

    python scripts/fer2013_classifier.py --root ../shared/data/fer2013/fer2013-train-publictest.tar.gz --preset cpu --out runs/fer2013_cpu

Tests once on PublicTest; selection on a stratified 10% of Training. Presets: `cpu` (2 cores, ~25 min) and `gpu` (the
reference CIFAR-style ResNet-18 recipe of ../shared/data/README.md)."""
import argparse, json, time
import torch
from emonb.data import read_fer2013
from emonb.train import FER2013_PRESETS, train_fer2013

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--root', required=True, help='the FER2013 archive or its extracted folder')
p.add_argument('--out', required=True)
p.add_argument('--preset', default='cpu', choices=sorted(FER2013_PRESETS))
p.add_argument('--test-split', default='PublicTest')
p.add_argument('--epochs', type=int); p.add_argument('--n-train', type=int); p.add_argument('--threads', type=int)
p.add_argument('--method', default='classifier', choices=['classifier', 'kefer'])
p.add_argument('--tau', type=float, help="KEFER's temperature (default: the paper's, see emonb.kefer.train_kefer)")
p.add_argument('--overwrite', action='store_true')
a = p.parse_args()
df = read_fer2013(a.root, test_split=a.test_split)
t0 = time.time()
learn, m = train_fer2013(df, a.out, preset=a.preset, method=a.method, epochs=a.epochs, n_train=a.n_train, threads=a.threads,
                         overwrite=a.overwrite,
                         **({} if a.tau is None else dict(tau=a.tau)))
print(json.dumps(dict(war=m['war'], uar=m['uar'], seconds=round(time.time() - t0)), indent=1))
