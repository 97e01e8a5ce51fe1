#!/usr/bin/env python
"""Training-step throughput and peak memory of KEFER and MLPER: the official recipe (fp32) vs emonb's defaults.

Prints numbers; asserts nothing. Run on a GPU (CPU works with --small, for a smoke test):
    python scripts/bench_steps.py                                # KEFER ResNet-18 at 224 px + MLPER ViT-L/14, paper batch sizes
    python scripts/bench_steps.py --kefer-size 48 --kefer-stem cifar --skip mlper   # KEFER's FER2013 48-px recipe
    python scripts/bench_steps.py --small --device cpu           # seconds, proves the script runs
Weights are random (throughput does not depend on them), so nothing needs downloading.

Every variant times a full training step: forward, the method's loss, backward, SGD step with the paper's
hyper-parameters, on random device-resident inputs (the input pipeline is scripts/bench_pipeline.py's business).
  KEFER  emonb.kefer.KeferModel (a timm encoder, ResNet-18 by default, + the neutral transform F_n) with
         Float32Loss(KeferLoss) (L_s + L_t + L_c) against 7 random 384-d text prototypes (MiniLM's size);
         SGD lr 2e-3, momentum 0.9, wd 5e-4; batch 64.
  MLPER  emonb.mlper.MLPER over a CLIP ViT (ViT-L/14, the paper's) fed three 224-px crops (face, body, context) per
         sample, with MLPERLoss (L_cls + L_itm, hard negatives); SGD lr 2e-5, momentum 0.9, wd 1e-4; batch 16.
Variants (--kefer-variants / --mlper-variants):
  fp32              the official recipe's precision (TF32 off, as in bench_methods.py)
  bf16              torch.autocast(bfloat16), emonb's default on a GPU (fastai's to_bf16); attention is PyTorch's
                    fused SDPA in every variant
  bf16+cl           the same with model and inputs in channels-last memory format (CNNs)
  bf16+compile      bf16 with the model compiled by torch.compile (with +cl: bf16+cl+compile)
images/s counts the images the encoder sees: one per sample for KEFER, three crops per sample for MLPER.
"""
from __future__ import annotations
import argparse, time
import torch
import torch.nn.functional as F

KEFER_VARIANTS = 'fp32,bf16,bf16+cl,bf16+cl+compile'
MLPER_VARIANTS = 'fp32,bf16,bf16+compile'


from emonb.benchmarks import time_step


def _flags(variant: str) -> tuple:
    parts = set(variant.split('+'))
    bad = parts - {'fp32', 'bf16', 'cl', 'compile'}
    if bad or not parts & {'fp32', 'bf16'}: raise ValueError(f"unknown variant {variant!r}: use fp32 or bf16, optionally +cl and/or +compile")
    return 'bf16' in parts, 'cl' in parts, 'compile' in parts


def _step_fn(model, loss_fn, opt, inputs, y, device, bf16: bool, compile_: bool):
    fwd = torch.compile(model) if compile_ else model
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(*inputs)
        loss = loss_fn(out, y)          # both losses compute in float32 outside autocast
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss.detach()
    return step


def bench_kefer(variant: str, device, bs: int = 64, size: int = 224, arch: str = 'resnet18', stem: str = 'imagenet',
                steps: int = 10, warmup: int = 3, n_classes: int = 7, text_dim: int = 384) -> dict:
    "One KEFER training step (`variant`: fp32, bf16, +cl, +compile) on random images; ms, images/s, peak GiB."
    from emonb.kefer import KeferModel, Float32Loss, resnet_encoder
    from emonb.losses import KeferLoss
    bf16, cl, compile_ = _flags(variant)
    torch.manual_seed(0)
    protos = F.normalize(torch.randn(n_classes, text_dim), dim=-1)
    neutral = n_classes - 1
    model = KeferModel(resnet_encoder(arch, embed_dim=text_dim, stem=stem), protos, neutral).to(device).train()
    loss_fn = Float32Loss(KeferLoss(protos, neutral)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(bs, 3, size, size, device=device)
    if cl: model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (bs,), device=device)
    r = time_step(_step_fn(model, loss_fn, opt, (x,), y, device, bf16, compile_), device, steps, warmup)
    del model, opt, x
    if device.type == 'cuda': torch.cuda.empty_cache()
    return dict(variant=variant, **r, samples_per_s=bs / r['ms_per_step'] * 1e3, images_per_s=bs / r['ms_per_step'] * 1e3)


def bench_mlper(variant: str, device, bs: int = 16, model_name: str = 'ViT-L-14', size: int = None, steps: int = 10,
                warmup: int = 3, labels: str = 'caer_s') -> dict:
    "One MLPER training step (`variant`: fp32, bf16, +cl, +compile) on three random crops per sample; ms, images/s, peak GiB."
    import warnings
    from emonb.encoders import ClipEncoder
    from emonb.mlper import MLPER, MLPERLoss, mlper_texts, mlper_param_groups
    bf16, cl, compile_ = _flags(variant)
    torch.manual_seed(0)
    clip = ClipEncoder.from_pretrained(model_name, device=str(device))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                     # long composite sentences are truncated (MLPER reports them)
        model = MLPER(clip, mlper_texts(labels)).to(device).train()
    groups = mlper_param_groups(model)
    opt = torch.optim.SGD([dict(params=g) for g in groups.values() if g], lr=2e-5, momentum=0.9, weight_decay=1e-4)
    size = size or clip.image_size
    x = torch.randn(bs, 3, 3, size, size, device=device)   # (B, levels, C, H, W): face, body, context crops
    if cl: model = model.to(memory_format=torch.channels_last)
    y = torch.randint(0, model.n_classes, (bs,), device=device)
    r = time_step(_step_fn(model, MLPERLoss(model), opt, (x,), y, device, bf16, compile_), device, steps, warmup)
    del model, opt, x, clip
    if device.type == 'cuda': torch.cuda.empty_cache()
    return dict(variant=variant, **r, samples_per_s=bs / r['ms_per_step'] * 1e3, images_per_s=3 * bs / r['ms_per_step'] * 1e3)


def _rows(name: str, fn, variants: str, **kw) -> list:
    rows = []
    for v in variants.split(','):
        try: r = fn(v, **kw)
        except Exception as e: r = dict(variant=v, error=f'{type(e).__name__}: {e}'[:300])
        rows.append(r)
        print(f"{name} {v:<16}", {k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != 'variant'}, flush=True)
    base = next((r for r in rows if r['variant'] == 'fp32' and 'error' not in r), None)
    if base:
        for r in rows:
            if 'error' not in r: r['speedup_vs_fp32'] = r['images_per_s'] / base['images_per_s']
        print(f'{name} speed-up over the fp32 recipe:', {r['variant']: round(r['speedup_vs_fp32'], 2) for r in rows if 'error' not in r}, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--steps', type=int, help='timed steps (default 10; --small: 2)')
    p.add_argument('--warmup', type=int, help='untimed steps first (default 3; --small: 1)')
    p.add_argument('--kefer-arch', default='resnet18', help='timm encoder of KEFER (default resnet18)')
    p.add_argument('--kefer-size', type=int, help='image size (default 224; the FER2013 recipe: 48; --small: 32)')
    p.add_argument('--kefer-stem', choices=['imagenet', 'cifar'], default='imagenet', help='ResNet stem (cifar: the 48-px recipe)')
    p.add_argument('--kefer-bs', type=int, help='batch size (default 64, the paper\'s; --small: 4)')
    p.add_argument('--kefer-variants', default=KEFER_VARIANTS)
    p.add_argument('--mlper-model', help='open_clip config of the CLIP, random weights (default ViT-L-14, the paper\'s; '
                   'ablations: ViT-B-16, ViT-B-32; --small: emonb-tiny-vit)')
    p.add_argument('--mlper-bs', type=int, help='samples per batch, 3 crops each (default 16; --small: 2)')
    p.add_argument('--mlper-variants', default=MLPER_VARIANTS)
    p.add_argument('--skip', default='', help='comma-separated: kefer, mlper')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--small', action='store_true', help='tiny sizes for a CPU smoke test (ResNet-18 at 32 px, batch 4; '
                   'emonb-tiny-vit, batch 2); options given explicitly still apply')
    p.add_argument('--json', help='also write the results to this file')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    sizes = (dict(kefer_size=32, kefer_bs=4, mlper_model='emonb-tiny-vit', mlper_bs=2, steps=2, warmup=1) if a.small else
             dict(kefer_size=224, kefer_bs=64, mlper_model='ViT-L-14', mlper_bs=16, steps=10, warmup=3))
    for k, v in sizes.items():
        if getattr(a, k) is None: setattr(a, k, v)
    device = torch.device(a.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False; torch.backends.cudnn.benchmark = True
    out = dict(device=torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu', torch=torch.__version__)
    skip = set(s.strip() for s in a.skip.split(',') if s.strip())
    if 'kefer' not in skip:
        rows = _rows(f'KEFER {a.kefer_arch} {a.kefer_size}px bs {a.kefer_bs}', bench_kefer, a.kefer_variants, device=device,
                     bs=a.kefer_bs, size=a.kefer_size, arch=a.kefer_arch, stem=a.kefer_stem, steps=a.steps, warmup=a.warmup)
        out['kefer'] = dict(model=a.kefer_arch, size=a.kefer_size, stem=a.kefer_stem, bs=a.kefer_bs, rows=rows)
    if 'mlper' not in skip:
        rows = _rows(f'MLPER {a.mlper_model} bs {a.mlper_bs}x3 crops', bench_mlper, a.mlper_variants, device=device,
                     bs=a.mlper_bs, model_name=a.mlper_model, steps=a.steps, warmup=a.warmup)
        out['mlper'] = dict(model=a.mlper_model, bs=a.mlper_bs, crops=3, rows=rows)
    if a.json:
        from emonb.core import atomic_write_json
        atomic_write_json(a.json, out)
    return out


if __name__ == '__main__': main()
