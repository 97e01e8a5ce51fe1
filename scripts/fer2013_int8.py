"""Add the int8 calibration to emonb's shipped FER2013 model (emonb.bundles.add_int8_calibration): a stratified sample of
FER2013 Training images, the model's own training data. The bundle's tensors stay as they are; its header gains the
scales and zero points, so that `predict(..., precision='int8')` / `emonb predict --precision int8` run in int8.

    python scripts/fer2013_int8.py --root ../shared/data/fer2013/fer2013-train-publictest.tar.gz --n 1024 --overwrite
"""
import argparse, json
from emonb.data import read_fer2013, split_validation
from emonb.bundles import add_int8_calibration
from emonb.predict import default_model_path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--root', required=True, help='the FER2013 archive or its extracted folder')
p.add_argument('--n', type=int, default=1024, help='calibration images (stratified by class, seed 0)')
p.add_argument('--weights', default=None, help='the bundle to calibrate (default: the shipped model inside the package)')
p.add_argument('--overwrite', action='store_true', help='replace a calibration the bundle already has')
a = p.parse_args()
df = read_fer2013(a.root, test_split='PublicTest')
train = df[df.split == 'train']   # the rows the model was trained on (its validation rows and PublicTest stay unseen)
sample = split_validation(train, valid_pct=a.n / len(train), seed=0).query("split == 'val'")
calib = add_int8_calibration(a.weights or default_model_path(), list(sample.path), overwrite=a.overwrite,
                             source=f"FER2013 Training: {len(sample)} images, stratified by class (seed 0)")
print(json.dumps({k: v for k, v in calib.items() if k != 'activations'}, indent=1))
