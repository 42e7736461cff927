"""PyTorch fallback for the fused kernels: same arguments, same numerical conventions as triton_impl."""
from __future__ import annotations

import torch


@torch.no_grad()  # as the kernel: a cache write, never part of a graph
def fuse_features(features, mean, std, out):
    col = 0
    for x in features:
        width = x.shape[1]
        m = mean[col:col + width].to(x.device, torch.float32)
        s = std[col:col + width].to(x.device, torch.float32)
        # Promotion against the float32 statistics gives float32 arithmetic (as in the kernel) with a
        # single temporary, even for half-precision inputs; float64 ones are brought down to it first, and
        # float8 ones up (torch does not promote float8 with other types).
        x = x if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.float()
        out[:, col:col + width].copy_(torch.sub(x, m).div_(s))
        col += width
    return out


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cosine_forward(student, target, eps):
    """Per-row loss 1 - cos and the statistics the backward needs, stats = (|s|, |t|, s.t) as (3, B)."""
    acc = _acc_dtype(student, target)
    s, t = student.to(acc), target.to(acc)
    # (s * t).sum, not linalg.vecdot: autocast runs vecdot in half precision, where a fp16 dot of large rows
    # overflows (a loss of -inf for a caller inside autocast); mul and sum keep float32 as the kernel does
    stats = torch.stack([torch.linalg.vector_norm(s, dim=1), torch.linalg.vector_norm(t, dim=1), (s * t).sum(1)])
    ns, nt, dot = stats
    # + 0 * (ns + nt): NaN where a norm overflowed (as the kernel)
    return 1 - (dot / (ns.clamp_min(eps) * nt.clamp_min(eps)) + 0 * (ns + nt)), stats


def cosine_backward(student, target, stats, grad_loss, scale, eps):
    """d loss / d student for loss_i = 1 - s_i.t_i / (max(|s_i|, eps) max(|t_i|, eps)).

    grad_loss is the 0-d or (B,) upstream gradient, multiplied by `scale` (1/B for a mean).
    Rows with |s_i| <= eps get a zero gradient: their direction, all a cosine depends on, is undefined.
    """
    acc = stats.dtype
    ns, nt, dot = stats
    ns_c, nt_c = ns.clamp_min(eps), nt.clamp_min(eps)
    cos = dot / (ns_c * nt_c) + 0 * (ns + nt)
    g = grad_loss.to(acc) * scale
    live = ns > eps
    coef_s = torch.where(live, g * cos / (ns_c * ns_c), 0.0)
    coef_t = torch.where(live, -g / (ns_c * nt_c), 0.0)
    grad = coef_s[:, None] * student.to(acc) + coef_t[:, None] * target.to(acc)
    return grad.to(student.dtype)
