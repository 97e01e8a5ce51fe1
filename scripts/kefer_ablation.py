"""KEFER vs the classifier on the FER2013 fast path: which part of KEFER's supervision helps, at a small CPU budget.

    python scripts/kefer_ablation.py --root ../shared/data/fer2013/fer2013-train-publictest.tar.gz \
        --out runs/kefer_ablation --json benchmarks/kefer_ablation-cpu-<date>.json

Every run: the CPU preset's network (half-width ResNet-18, small stem), the same stratified `--n-train` training images,
the same `--max-steps` (one-cycle schedule compressed to them), seed 0, selection on the same validation split, tested once
on PublicTest with hflip averaging. Rows: the cross-entropy classifier; KEFER as emonb trains it (MiniLM prototypes,
L_s + L_t + L_c); KEFER with one loss term removed at a time; a softer temperature; and the same loss with random
prototypes instead of the text encoder's (does the text knowledge itself help?). One seed per row: differences under about
one point are within run-to-run noise. The JSON is rewritten (atomically) after every run, so a stopped sweep keeps its rows."""
import argparse, json, platform, time
from pathlib import Path
import torch
from emonb.core import atomic_write_json
from emonb.data import read_fer2013
from emonb.train import train_fer2013

ROWS = {   # name: (method, train_fer2013 keyword arguments, what it tests)
    'classifier': ('classifier', {}, 'cross-entropy head on the same network (reference)'),
    'kefer': ('kefer', {}, "KEFER, emonb variant: MiniLM prototypes, L_s + L_t + L_c, tau 0.01"),
    'kefer_Ls_only': ('kefer', dict(lambdas=(1., 0., 0.)), 'only L_s: a cosine classifier against the text prototypes'),
    'kefer_no_Lt': ('kefer', dict(lambdas=(1., 0., 1.)), 'without the emotional-to-neutral transformation loss L_t'),
    'kefer_no_Lc': ('kefer', dict(lambdas=(1., 1., 0.)), 'without the self-contrast loss L_c'),
    'kefer_tau_0.05': ('kefer', dict(tau=0.05), 'softer temperature (0.05 instead of 0.01)'),
    'kefer_random_prototypes': ('kefer', dict(prototypes='random'), 'the same loss with random unit prototypes (no text knowledge)'),
}

def random_prototypes(n: int, dim: int = 384, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--root', required=True, help='the FER2013 archive or its extracted folder')
p.add_argument('--out', required=True, help='folder for the runs (one subfolder per row)')
p.add_argument('--json', required=True, help='results file (rewritten after every run)')
p.add_argument('--n-train', type=int, default=8000)
p.add_argument('--max-steps', type=int, default=500)
p.add_argument('--threads', type=int, default=1)
p.add_argument('--rows', default=','.join(ROWS), help='comma-separated subset of: ' + ', '.join(ROWS))
a = p.parse_args()
torch.set_num_threads(a.threads)
df = read_fer2013(a.root, test_split='PublicTest')
n_classes = df.label.nunique()
res = dict(split='PublicTest', n_train=a.n_train, max_steps=a.max_steps, threads=a.threads, seed=0, preset='cpu',
           cpu=platform.machine(), torch=torch.__version__, date=time.strftime('%Y-%m-%d'), rows={})
if Path(a.json).is_file(): res['rows'] = json.loads(Path(a.json).read_text()).get('rows', {})
for name in a.rows.split(','):
    method, kw, what = ROWS[name]
    if name in res['rows']: continue   # already measured (a resumed sweep)
    kw = dict(kw)
    if kw.get('prototypes') == 'random': kw['prototypes'] = random_prototypes(n_classes)
    t0 = time.time()
    _, m = train_fer2013(df, Path(a.out)/name, preset='cpu', method=method, n_train=a.n_train, max_steps=a.max_steps,
                         progress=False, bundle=False, overwrite=True, **kw)
    res['rows'][name] = dict(method=method, what=what, war=round(float(m['war']), 4), uar=round(float(m['uar']), 4),
                             seconds=round(time.time() - t0))
    atomic_write_json(a.json, res)
    print(f"{name:24s} WAR {m['war']:.2%}  UAR {m['uar']:.2%}  ({time.time() - t0:.0f} s)", flush=True)
