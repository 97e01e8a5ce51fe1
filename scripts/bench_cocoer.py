#!/usr/bin/env python
"""Cost of one CocoER training step with and without the workspace (emonb.cocoer), batch 64 by default.

Prints milliseconds per step (forward, L_emo, backward, Adam) with the same weights and batch for
  none         no workspace (the global head sees the raw level logits)
  closed_form  the batched closed-form workspace (emonb's default)
  per_sample   the reference loop: per sample, autograd through each prediction layer, G to the CPU, QP there
               (the official code's pattern; run for --per-sample-steps steps only)
and the overhead of each against `none`. It never asserts: the target (closed form <= +10%, the official
per-sample implementation about 150x) is for the reader to compare.

    python scripts/bench_cocoer.py --device cuda              # the paper-sized model: ResNet-50 windows at 224 px, d = 256, CLIP-RN50
    python scripts/bench_cocoer.py --cpu-demo --threads 1     # the notebook's CPU-sized model (COCOER_CPU, 32/32/64-px windows)

The CLIP of the V-I module and the backbones have random weights: the cost does not depend on them.
"""
import argparse, json, platform, time
import torch
from emonb.cocoer import CocoER, CocoerLoss, random_batch, benchmark_cocoer_step, COCOER_CPU, COCOER_CPU_SIZE

def build(args, device):
    from emonb.encoders import ClipEncoder
    if args.clip == 'world':
        from emonb.synth_clip import world_clip_encoder
        clip = world_clip_encoder(device=device)
    else: clip = ClipEncoder.from_pretrained(args.clip, device=device)
    labels, multi_label = ('emotic', True) if args.dataset == 'emotic' else ('caer_s', False)
    kw = dict(COCOER_CPU) if args.cpu_demo else dict(arch=args.arch, dim=args.dim, heads=args.heads, ffn_dim=4 * args.dim)
    torch.manual_seed(0)
    model = CocoER(clip, labels, multi_label, variant=args.variant, **kw).to(device)
    size = COCOER_CPU_SIZE if args.cpu_demo else args.size
    batch = random_batch(args.bs, size, model.n_classes, multi_label, device=device)
    return model, CocoerLoss(multi_label, variant=args.variant), batch, kw, size

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--bs', type=int, default=64, help='batch size (default 64)')
    p.add_argument('--size', type=int, default=224, help='window size in pixels (all three windows)')
    p.add_argument('--arch', default='resnet50', help='timm backbone of each level')
    p.add_argument('--dim', type=int, default=256, help='d (the FFN is 4d)')
    p.add_argument('--heads', type=int, default=None, help='attention heads (default: the variant\'s; paper 3, code 4)')
    p.add_argument('--clip', default='RN50', help="open_clip config of the V-I module's CLIP (random weights), or 'world' for the synthetic world's CLIP")
    p.add_argument('--dataset', choices=['emotic', 'caer_s'], default='emotic', help='26 classes multi-label, or 7 classes single-label')
    p.add_argument('--variant', choices=('official', 'paper', 'emonb'), default='emonb',
                   help="emonb.cocoer variant (default emonb, as the recorded H200 numbers); the per-sample reference exists for paper/emonb only")
    p.add_argument('--cpu-demo', action='store_true', help='the notebook CPU-sized model and 32/32/64-px windows')
    p.add_argument('--steps', type=int, default=20, help='timed steps per mode')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    p.add_argument('--per-sample-steps', type=int, default=3, help='timed steps of the per-sample reference (0: skip it)')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default=None, help='default: bf16 on CUDA, fp32 on CPU')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--json', default=None, help='also write the results to this file')
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda': torch.backends.cudnn.benchmark = True
    precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    model, loss, batch, kw, size = build(args, device)
    modes = [(None, args.steps, args.warmup), ('closed_form', args.steps, args.warmup)]
    if args.per_sample_steps > 0 and args.variant != 'official': modes.append(('per_sample', args.per_sample_steps, 1))
    res = {}
    for mode, steps, warmup in modes:
        model.workspace = mode
        t0 = time.time()
        res[str(mode).lower()] = benchmark_cocoer_step(model, loss, batch, steps=steps, warmup=warmup, precision=precision)
        print(f"{str(mode).lower():>12}: {res[str(mode).lower()]:9.1f} ms/step  ({steps} steps, {time.time() - t0:.0f} s)", flush=True)
    base = res['none']
    print(f"\nbatch {args.bs}, windows {size}, {args.dataset}, {precision}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == 'cuda' else f" ({torch.get_num_threads()} threads)"))
    for k, v in res.items():
        if k != 'none': print(f"{k:>12}: {v / base:7.2f}x the step without workspace ({100 * (v / base - 1):+.1f}%)")
    if args.json:
        info = dict(ms_per_step=res, batch=args.bs, size=size, model=kw, dataset=args.dataset, precision=precision, device=str(device),
                    gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None, torch=torch.__version__,
                    python=platform.python_version(), threads=torch.get_num_threads(), variant=args.variant, official=args.variant == 'official')
        with open(args.json, 'w') as f: json.dump(info, f, indent=2)
    return res

if __name__ == '__main__': main()
