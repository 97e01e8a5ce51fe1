#!/usr/bin/env python
"""Training-step throughput and peak memory of emonb's methods: the official recipe (fp32) vs emonb's defaults.

Prints numbers; asserts nothing. Run on a GPU (CPU works with --small, for a smoke test):
    python scripts/bench_methods.py                      # DFER-CLIP (ViT-B/32, 48 clips x 16 frames) + Exp-CLIP projection epoch
    python scripts/bench_methods.py --small --device cpu # seconds, proves the script runs
Weights are random (throughput does not depend on them), so nothing needs downloading.

DFER-CLIP variants, each a full training step (forward, cross-entropy, backward, SGD step with the paper's three
learning rates) of `emonb.dferclip.DFERCLIP` on random clips:
  fp32           the official code's precision
  bf16           torch.autocast(bfloat16) (emonb's default on a GPU; attention is PyTorch's fused SDPA in both)
  bf16+compile   the same step with the model compiled by torch.compile
Exp-CLIP: one epoch of `emonb.expclip.train_projection` (fastai Learner, batch 512, symmetric InfoNCE) over N cached
(CLIP, teacher) embedding pairs (default 49,000 pairs of 768-d CLIP / 2048-d Flan-T5 encoder embeddings).
"""
from __future__ import annotations
import argparse, json, time
import numpy as np
import torch
import torch.nn.functional as F


from emonb.benchmarks import time_step


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def bench_dferclip(variant: str, device, bs: int, n_frames: int, model_name: str, steps: int, warmup: int) -> dict:
    from emonb.core import label_set
    from emonb.encoders import ClipEncoder
    from emonb.dferclip import DFERCLIP, dferclip_texts, dferclip_splitter, DFERCLIP_LRS
    torch.manual_seed(0)
    clip = ClipEncoder.from_pretrained(model_name, device=str(device))
    labels = label_set('dfew')
    model = DFERCLIP(clip, dferclip_texts(labels), n_frames=n_frames).to(device).train()
    groups = dferclip_splitter(model)
    opt = torch.optim.SGD([dict(params=g, lr=lr) for g, lr in zip(groups, DFERCLIP_LRS.values())], momentum=0.9, weight_decay=1e-4)
    size = clip.image_size
    x = torch.randn(bs, n_frames, 3, size, size, device=device)
    y = torch.randint(0, len(labels), (bs,), device=device)
    bf16 = variant.startswith('bf16')
    fwd = torch.compile(model) if 'compile' in variant else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss

    r = time_step(step, device, steps, warmup); dt, peak = r['ms_per_step'] / 1e3, r['peak_gib']
    del model, opt, x, fwd
    if device.type == 'cuda': torch.cuda.empty_cache()
    return dict(variant=variant, ms_per_step=1e3 * dt, clips_per_s=bs / dt, frames_per_s=bs * n_frames / dt,
                peak_gib=peak, loss=r['loss'])


def bench_expclip(device, n: int, d_clip: int, d_teacher: int, epochs: int) -> dict:
    from emonb.expclip import train_projection, EXPCLIP_RECIPE
    from dataclasses import replace
    rng = np.random.default_rng(0)
    e_I = rng.standard_normal((n, d_clip), dtype=np.float32)
    e_G = rng.standard_normal((n, d_teacher), dtype=np.float32)
    times = []
    from fastai.callback.core import Callback
    class EpochTimer(Callback):
        order = 100
        def before_epoch(self): _sync(device); self.t = time.perf_counter()
        def after_epoch(self): _sync(device); times.append(time.perf_counter() - self.t)
    config = replace(EXPCLIP_RECIPE, epochs=epochs, checkpoint=False)
    t = time.perf_counter()
    train_projection(e_I, e_G, config=config, device=device, path='/tmp/bench_expclip', cbs=[EpochTimer()])
    return dict(pairs=n, d_clip=d_clip, d_teacher=d_teacher, epochs=epochs, first_epoch_s=times[0],
                later_epoch_s=float(np.median(times[1:])) if len(times) > 1 else None, total_s=time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model', help='open_clip config (default ViT-B-32; --small: emonb-tiny-vit)')
    p.add_argument('--bs', type=int, help='clips per batch (default 48; --small: 4)')
    p.add_argument('--frames', type=int, help='frames per clip (default 16; --small: 4)')
    p.add_argument('--steps', type=int, help='timed steps (default 10; --small: 2)')
    p.add_argument('--warmup', type=int, help='untimed steps first (default 3; --small: 1)')
    p.add_argument('--variants', default='fp32,bf16,bf16+compile')
    p.add_argument('--expclip-pairs', type=int, help='cached embedding pairs (default 49,000; --small: 4,096)')
    p.add_argument('--skip', default='', help='comma-separated: dferclip, expclip')
    p.add_argument('--small', action='store_true', help='tiny sizes for a CPU smoke test (options given explicitly still apply)')
    p.add_argument('--json', help='also write the results to this file')
    a = p.parse_args(argv)
    device = torch.device(a.device)
    sizes = (dict(model='emonb-tiny-vit', bs=4, frames=4, steps=2, warmup=1, expclip_pairs=4096) if a.small else
             dict(model='ViT-B-32', bs=48, frames=16, steps=10, warmup=3, expclip_pairs=49_000))
    for k, v in sizes.items():
        if getattr(a, k) is None: setattr(a, k, v)
    if device.type == 'cuda': torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
    out = dict(device=torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu', torch=torch.__version__)
    skip = set(s.strip() for s in a.skip.split(',') if s.strip())
    if 'dferclip' not in skip:
        rows = []
        for v in a.variants.split(','):
            try: r = bench_dferclip(v, device, a.bs, a.frames, a.model, a.steps, a.warmup)
            except Exception as e: r = dict(variant=v, error=f'{type(e).__name__}: {e}'[:300])
            rows.append(r); print(f"DFER-CLIP {a.model} {a.bs}x{a.frames} {v:<13}", {k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != 'variant'}, flush=True)
        base = next((r for r in rows if r['variant'] == 'fp32' and 'error' not in r), None)
        if base:
            for r in rows:
                if 'error' not in r: r['speedup_vs_fp32'] = r['frames_per_s'] / base['frames_per_s']
            print('speed-up over the fp32 recipe:', {r['variant']: round(r['speedup_vs_fp32'], 2) for r in rows if 'error' not in r})
        out['dferclip'] = dict(model=a.model, bs=a.bs, frames=a.frames, rows=rows)
    if 'expclip' not in skip:
        r = bench_expclip(device, a.expclip_pairs, 768, 2048, epochs=3)
        print('Exp-CLIP projection epoch:', {k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
        out['expclip'] = r
    if a.json:
        from emonb.core import atomic_write_json
        atomic_write_json(a.json, out)
    return out


if __name__ == '__main__': main()
