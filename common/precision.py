"""Mixed precision for training on a GPU: which autocast dtype `--amp` means on this device; and
full float32 math where results must match other runtimes (no_tf32).

bfloat16 needs sm_80 (Ampere) or newer in hardware; older GPUs (V100, T4, P100) emulate it slowly or
not at all, so there "auto" takes float16 with a GradScaler (float16's narrow range needs loss scaling).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

CHOICES = ("auto", "bf16", "fp16", "off")
HELP = ("mixed precision on a GPU: auto = bf16 on sm_80+ (A100, H100), fp16 with loss scaling on older "
        "GPUs; off = float32; ignored on the CPU")


def amp_policy(choice: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None for float32, GradScaler or None) for --amp `choice` on `device`."""
    if choice not in CHOICES:
        raise ValueError(f"--amp {choice!r}: expected one of {CHOICES}")
    device = torch.device(device)
    if device.type != "cuda" or choice == "off":
        return None, None
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    if choice == "bf16" and not native_bf16:
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(f"--amp bf16 needs a GPU of compute capability 8.0 or newer (this one is {cap}); "
                         f"use --amp auto or fp16")
    if choice == "bf16" or (choice == "auto" and native_bf16):
        return torch.bfloat16, None
    return torch.float16, LossScaler("cuda")


class LossScaler(torch.amp.GradScaler):
    """float16's GradScaler, which skips a step whose gradients hold inf or NaN and halves its scale: a few
    skips while the scale settles are normal, but a run whose steps all overflow trained nothing and said
    nothing. SKIPS_IN_A_ROW of them stop it. `taken` counts the optimizer steps it let through."""

    SKIPS_IN_A_ROW = 50  # the scale halves at each: 2^-50 of where it stood, far past any scale that trains

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken = self.in_a_row = 0

    def state_dict(self):  # the run of skips goes on across a resume
        state = super().state_dict()
        return {**state, "skipped_in_a_row": self.in_a_row} if state else state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.in_a_row = int(state.get("skipped_in_a_row", 0))

    def step(self, optimizer, *args, **kwargs):
        if optimizer.defaults.get("fused"):  # its step runs, and skips inside, whatever the gradients: not countable
            raise ValueError("LossScaler counts the steps an optimizer takes: give it an optimizer that is not fused")
        stepped = []  # before an unfused optimizer's step GradScaler reads on the host whether to take it: no wait
        hook = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
        try:
            out = super().step(optimizer, *args, **kwargs)
        finally:
            hook.remove()
        self.taken += bool(stepped)
        self.in_a_row = 0 if stepped else self.in_a_row + 1
        if self.in_a_row >= self.SKIPS_IN_A_ROW:
            raise FloatingPointError(
                f"{self.in_a_row} float16 steps in a row had inf or NaN gradients and were skipped (loss scale "
                f"{self.get_scale():.3g}): nothing is being learned; lower --lr, or use --amp bf16 (on sm_80 and "
                f"newer) or --amp off")
        return out


def backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Zero the gradients, backpropagate `loss` (scaled when a GradScaler is given) and step."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@contextmanager
def no_tf32():
    """Full float32 inside for cuDNN convolutions and cuBLAS matmuls (TF32 is on by default for cuDNN on
    Ampere and newer, and for matmuls after set_float32_matmul_precision("high")); the settings put back
    after. It uses torch's per-operator fp32_precision flags, not the legacy allow_tf32 ones: reading a
    legacy flag raises once a user has set the two kinds differently, and setting one leaves the other.
    The flags are global, not per thread: whoever runs threads inside must hold it for all of them."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
