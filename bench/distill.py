"""Student training throughput: distill.py's training step against a plain PyTorch loop.

Both train the same network (torchvision's ResNet-18 code at the same width, plus the linear projection
to h_G) with AdamW on the same synthetic uint8 face batches at the same size, copied from (pinned) host
memory each step as the loader's batches are; images/s counts forward + backward + optimizer step.
  ours   distill.train_step: channels-last and bf16/fp16 autocast on a GPU, the fused cosine loss of
         kernels (Triton on a GPU, PyTorch fallback on the CPU), normalisation inside the model
  plain  the textbook loop: float32 NCHW, x / 255 normalised outside, 1 - F.cosine_similarity
At width 1 the plain network is torchvision.models.resnet18 itself.

  python bench/distill.py                   # default student (width 0.42) and full width, size 112
  python bench/distill.py --widths 0.42 --batch 256 --steps 50    # on a GPU
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distill  # noqa: E402
from common import precision  # noqa: E402
from common.runs import COUNT, POSITIVE_INT, HelpFormatter, pick_device, run_main  # noqa: E402
from common.student import WIDTH, ScaledResNet18, build_student, n_params  # noqa: E402
from kernels import cosine_distill_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--widths", default=f"{WIDTH},1.0", help="comma list of ResNet-18 width multipliers to compare")
    p.add_argument("--size", type=POSITIVE_INT, default=112, help="input side (distill.py's default)")
    p.add_argument("--batch", type=COUNT, default=0, help="images per step (default: 32 on the CPU, 256 on a GPU)")
    p.add_argument("--out-dim", type=POSITIVE_INT, default=1024, help="width of h_G (the paper's 1024)")
    p.add_argument("--steps", type=POSITIVE_INT, default=4, help="timed steps per round")
    p.add_argument("--warmup", type=COUNT, default=3, help="untimed steps first (allocator, cuDNN autotuning)")
    p.add_argument("--rounds", type=POSITIVE_INT, default=6,
                   help="timed rounds per variant, alternating; the best counts")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda ...")
    p.add_argument("--amp", default="auto", choices=precision.CHOICES, help="as distill.py --amp")
    return p.parse_args(argv)


def plain_model(width, out_dim):
    if width == 1.0:
        import torchvision

        return torchvision.models.resnet18(num_classes=out_dim)
    net = ScaledResNet18(width)
    net.fc = nn.Linear(net.out_features, out_dim)
    return net


def timed(step, batches, warmup, steps, device):
    for i in range(warmup):
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = torch.zeros(())
    for i in range(steps):
        loss = step(*batches[i % len(batches)])
    float(loss)  # waits for the last step
    return time.perf_counter() - t


def main(argv=None):
    args = parse_args(argv)
    try:
        widths = [float(w) for w in args.widths.split(",")]
    except ValueError:
        widths = [0.0]
    if not all(w > 0 for w in widths):
        raise SystemExit(f"error: --widths {args.widths}: a comma list of width multipliers above 0 (e.g. 0.42,1.0)")
    device = pick_device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"
    batches = [(torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, generator=g),
                torch.randn(batch, args.out_dim, generator=g)) for _ in range(2)]
    if pin:
        batches = [(x.pin_memory(), t.pin_memory()) for x, t in batches]
    amp_dtype, scaler = precision.amp_policy(args.amp, device)
    channels_last = device.type == "cuda"
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    rows = []
    for width in widths:
        torch.manual_seed(0)
        ours = build_student("resnet18w", width, args.out_dim).to(device)
        if channels_last:
            ours.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        loss_fn = cosine_distill_loss
        step_ours = lambda x, t: distill.train_step(ours, x, t, loss_fn, opt, amp_dtype, scaler, channels_last)

        torch.manual_seed(0)
        plain = plain_model(width, args.out_dim).to(device)
        opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4)

        def step_plain(x, t):
            x = (x.to(device).float() / 255 - mean) / std
            loss = (1 - F.cosine_similarity(plain(x), t.to(device), dim=1)).mean()
            opt_p.zero_grad()
            loss.backward()
            opt_p.step()
            return loss.detach()

        variants = (("plain PyTorch loop", step_plain, plain), ("distill.train_step", step_ours, ours))
        for _, step, _ in variants:
            timed(step, batches, args.warmup, 0, device)
        # Rounds alternate the two, and the best round counts: on a shared machine, load from other
        # processes comes and goes, and would otherwise favour whichever variant ran in a quiet moment.
        times = [[], []]
        for _ in range(args.rounds):
            for k, (_, step, _) in enumerate(variants):
                times[k].append(timed(step, batches, 0, args.steps, device))
        best = [min(t) for t in times]
        for (name, _, net), secs in zip(variants, best):
            rows.append([name, f"{width:g}", f"{n_params(net) / 1e6:.2f} M", batch * args.steps / secs,
                         1000 * secs / args.steps, f"{best[0] / secs:.2f}x"])
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"Student training step, {where}; batch {batch}, size {args.size}, h_G {args.out_dim}, "
          f"amp {amp_dtype}, channels-last {channels_last}; torch {torch.__version__}\n")
    print(tabulate(rows, headers=["training step", "width", "params", "img/s", "ms/step", "vs plain"],
                   tablefmt="github", floatfmt=("", ".2f", "", ".1f", ".1f", "")))


if __name__ == "__main__":
    run_main(main)
