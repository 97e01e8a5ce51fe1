#!/usr/bin/env python
"""Input-pipeline throughput: the JPEG-folder clip loader vs the memory-mapped frame cache (emonb.cache), in frames/s and MB/s.

Prints numbers; asserts nothing. Writes a synthetic DFEW-layout dataset (emonb.synth, frames of --frame-size px,
clips of 8-40 frames), carves a validation split, and times the training DataLoader of
  jpeg   emonb.data.clip_dataloaders: each worker lists the frame folder, decodes T JPEGs, crops, flips, resizes
  cache  emonb.cache.cached_clip_dataloaders over emonb.cache.build_clip_cache (built once, timed separately):
         each worker copies T uint8 frames out of the memory-mapped array
each measured twice: `workers` = the batches as the workers deliver them (uint8, no after_batch), and `loader` = the
batches after the transfer to --device and after_batch (float conversion, crop/flip, normalisation) there.
With --gpu it also measures what a DFER-CLIP training step (emonb.dferclip.DFERCLIP on a random-weight ViT-B/32,
bf16 autocast, SGD with the paper's three learning rates) consumes: frames/s on device-resident random clips, and
frames/s of the same step fed by each loader.

    python scripts/bench_pipeline.py --workers 2                       # CPU: loaders only
    python scripts/bench_pipeline.py --gpu                             # GPU machine: 16 workers, + the training step
    python scripts/bench_pipeline.py --gpu --device cpu --small        # CPU smoke test of the --gpu path
"""
from __future__ import annotations
import argparse, json, os, shutil, tempfile, time
from pathlib import Path
import torch
import torch.nn.functional as F


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def synthetic_dfew(root: Path, clips: int, frame_size: int, seed: int = 0):
    "A DFEW-layout dataset of `clips` training clips with frames of `frame_size` px (reused if `root` already has one)."
    from emonb.synth import SyntheticWorld, LAYOUTS
    from emonb.data import read_dfew, split_validation
    marker = root/'bench.json'
    want = dict(clips=clips, frame_size=frame_size, seed=seed)
    if not (marker.exists() and json.loads(marker.read_text()) == want):
        if root.exists(): shutil.rmtree(root)
        root.mkdir(parents=True)
        t = time.perf_counter()
        # the DFEW writer of emonb.synth, called directly for its clip_size (write_dataset renders 64-px clips)
        LAYOUTS['dfew'](SyntheticWorld(seed=seed), root, {'train': clips}, clip_size=frame_size)
        marker.write_text(json.dumps(want))
        print(f"wrote {clips} clips of {frame_size}px frames in {time.perf_counter() - t:.1f} s", flush=True)
    return split_validation(read_dfew(root, fold=1), 0.1, seed=0)


def dferclip_step(device, model_name: str, bs: int, n_frames: int):
    "A DFER-CLIP training step (model, step(x, y)) with random weights, bf16 autocast on a GPU."
    from emonb.core import label_set
    from emonb.encoders import ClipEncoder
    from emonb.dferclip import DFERCLIP, dferclip_texts, dferclip_splitter, DFERCLIP_LRS
    torch.manual_seed(0)
    clip = ClipEncoder.from_pretrained(model_name, device=str(device))
    model = DFERCLIP(clip, dferclip_texts(label_set('dfew')), n_frames=n_frames).to(device).train()
    opt = torch.optim.SGD([dict(params=g, lr=lr) for g, lr in zip(dferclip_splitter(model), DFERCLIP_LRS.values())],
                          momentum=0.9, weight_decay=1e-4)
    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss
    return clip, step


def consume(step, batches, steps: int, warmup: int, device) -> dict:
    "frames/s of `step` over `steps` batches drawn from the iterator factory `batches` (after `warmup`)."
    it = batches()
    def nxt():
        nonlocal it
        try: return next(it)
        except StopIteration: it = batches(); return next(it)
    plain = lambda b: tuple(t.as_subclass(torch.Tensor) for t in b)   # fastai's tensor types off, as fastai's Learner does
    for _ in range(warmup): step(*plain(nxt()))
    _sync(device); t, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = plain(nxt()); step(x, y); n += x.shape[0] * x.shape[1]
    _sync(device); dt = time.perf_counter() - t
    return dict(frames_per_s=n / dt, ms_per_step=1e3 * dt / steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--workers', type=int, default=16, help='DataLoader worker processes (default 16)')
    p.add_argument('--batch', type=int, default=8, help='clips per batch (DFER-CLIP trains with 48)')
    p.add_argument('--n-frames', type=int, default=16, help='frames per clip (TSN segments)')
    p.add_argument('--size', type=int, default=None, help='frame size served (default 112; with --gpu the CLIP\'s input size)')
    p.add_argument('--frame-size', type=int, default=224, help='size of the JPEG frames on disk (DFEW: 224)')
    p.add_argument('--clips', type=int, default=96, help='training clips to write')
    p.add_argument('--batches', type=int, default=30, help='batches timed per loader')
    p.add_argument('--warmup', type=int, default=3, help='batches before the clock starts (workers start)')
    p.add_argument('--root', help='folder for the dataset and the cache (kept; default a temporary folder, removed)')
    p.add_argument('--gpu', action='store_true', help='also measure a DFER-CLIP ViT-B/32 training step')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model', default='ViT-B-32'); p.add_argument('--steps', type=int, default=10)
    p.add_argument('--threads', type=int, help='torch threads of the main process (torch.set_num_threads)')
    p.add_argument('--small', action='store_true', help='tiny sizes (smoke test of every path, e.g. --gpu --device cpu)')
    p.add_argument('--json', help='also write the results to this file')
    a = p.parse_args(argv)
    if a.small: a.model, a.clips, a.frame_size, a.n_frames, a.batch, a.batches, a.steps, a.warmup = 'emonb-tiny-vit', 12, 64, 4, 2, 4, 2, 1
    from emonb.data import clip_dataloaders
    from emonb.cache import build_clip_cache, cached_clip_dataloaders, loader_throughput
    device = torch.device(a.device)
    if a.threads: torch.set_num_threads(a.threads)
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix='emonb-bench-'))
    out = dict(device=torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu', cpus=os.cpu_count(), torch=torch.__version__,
               load_average=os.getloadavg()[0], threads=torch.get_num_threads(),
               workers=a.workers, batch=a.batch, n_frames=a.n_frames, frame_size=a.frame_size)
    try:
        df = synthetic_dfew(root/'dfew', a.clips, a.frame_size)
        clip, step = dferclip_step(device, a.model, a.batch, a.n_frames) if a.gpu else (None, None)
        size = a.size or (clip.image_size if clip is not None else 112)
        out.update(size=size, clips=int((df.split == 'train').sum()), frames_on_disk=int(df.n_frames.sum()))
        t = time.perf_counter()
        cache = build_clip_cache(df, root/f'cache-{size}', size=size, num_workers=a.workers)
        build_s = time.perf_counter() - t
        mb = (root/f'cache-{size}'/'frames.npy').stat().st_size / 1e6
        out['cache'] = dict(build_s=round(build_s, 2), frames=cache.manifest['n_frames'], mb=round(mb, 1),
                            build_frames_per_s=round(cache.manifest['n_frames'] / build_s, 1))
        print(f"cache: {cache.manifest['n_frames']} frames of {size}px, {mb:.0f} MB, built (or found) in {build_s:.1f} s "
              f"with {a.workers} workers", flush=True)
        kw = dict(n_frames=a.n_frames, bs=a.batch, num_workers=a.workers, device=device, persistent_workers=a.workers > 0)
        loaders = {'jpeg': lambda: clip_dataloaders(df, size=size, **kw),
                   'cache': lambda: cached_clip_dataloaders(df, cache, **kw)}
        rows = {}
        for name, make in loaders.items():
            dls = make()
            if clip is not None:
                from emonb.dferclip import _use_clip_stats
                _use_clip_stats(dls, clip.image_mean_std)
            r = {'workers': loader_throughput(dls.train, a.batches, a.warmup, raw=True),
                 'loader': loader_throughput(dls.train, a.batches, a.warmup)}
            if step is not None:
                r['train_step'] = consume(step, lambda: iter(dls.train), a.steps, a.warmup, device)
            rows[name] = r
            del dls
            for k, v in r.items():
                print(f"{name:>5} {k:<10} {v['frames_per_s']:9.0f} frames/s" + (f" {v['mb_per_s']:8.1f} MB/s" if 'mb_per_s' in v else
                      f" ({v['ms_per_step']:.0f} ms/step)"), flush=True)
        if step is not None:
            x = torch.randn(a.batch, a.n_frames, 3, size, size, device=device)
            y = torch.randint(0, 7, (a.batch,), device=device)
            rows['gpu_only'] = {'train_step': consume(step, lambda: iter([(x, y)] * 10 ** 6), a.steps, a.warmup, device)}
            print(f"model consumption (device-resident clips): {rows['gpu_only']['train_step']['frames_per_s']:.0f} frames/s "
                  f"({rows['gpu_only']['train_step']['ms_per_step']:.0f} ms/step)", flush=True)
        out['rows'] = rows
        sp = rows['cache']['workers']['frames_per_s'] / rows['jpeg']['workers']['frames_per_s']
        print(f"cache / jpeg (workers): {sp:.1f}x; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    finally:
        if not a.root: shutil.rmtree(root, ignore_errors=True)
    if a.json:
        from emonb.core import atomic_write_json
        atomic_write_json(a.json, out)
    return out


if __name__ == '__main__': main()
