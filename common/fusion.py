"""Fusion operators G (paper section 3.2): from the standardised concatenation of all h_i to h_G, and back.

Every operator is a module with encode (x -> h_G) and decode (h_G -> x~), all in standardised units:
  ae      the paper's autoencoder: 3 linear layers whose widths shrink geometrically from the input
          width to h_G (5488 -> 3136 -> 1792 -> 1024 in the paper), and the mirror decoder; MSE on all h_i
  vae     same layers, the encoder also gives a log-variance; h_G is the mean
  dae     same as ae, trained on inputs with a fraction of dimensions zeroed (masking noise)
  pca     linear projection on the top principal axes, fitted from a streamed covariance
  concat  no reduction: h_G is the standardised concatenation itself
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

OPERATORS = ("ae", "pca", "vae", "dae", "concat")


def layer_widths(d_in: int, d_out: int, layers: int = 3) -> list[int]:
    """Geometric steps from d_in to d_out: the paper's 5488 -> 3136 -> 1792 -> 1024 has ratio 0.571 at each."""
    r = (d_out / d_in) ** (1 / layers)
    return [d_in] + [round(d_in * r ** i) for i in range(1, layers)] + [d_out]


def mlp(widths: list[int]) -> nn.Sequential:
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class AutoEncoder(nn.Module):
    def __init__(self, d_in: int, d_out: int, kind: str = "ae", mask: float = 0.2, beta: float = 1e-3):
        super().__init__()
        self.kind, self.mask, self.beta = kind, mask, beta
        w = layer_widths(d_in, d_out)
        enc = list(w)
        if kind == "vae":
            enc[-1] = 2 * d_out  # mean and log-variance
        self.encoder = mlp(enc)
        self.decoder = mlp(w[::-1])
        self.d_out = d_out

    def encode(self, x):
        h = self.encoder(x)
        return h[:, : self.d_out] if self.kind == "vae" else h

    def decode(self, h):
        return self.decoder(h)

    def loss(self, x):
        """Training loss on a batch of standardised rows."""
        if self.kind == "dae":
            keep = torch.rand_like(x) >= self.mask
            return F.mse_loss(self.decoder(self.encoder(x * keep)), x)
        if self.kind == "vae":
            mu, logvar = self.encoder(x).chunk(2, dim=1)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            kl = -0.5 * torch.mean(1 + logvar - mu ** 2 - logvar.exp())
            return F.mse_loss(self.decoder(z), x) + self.beta * kl
        return F.mse_loss(self.decoder(self.encoder(x)), x)


class PCA(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.register_buffer("components", torch.zeros(d_in, d_out))
        self.d_out = d_out

    def fit(self, batches) -> None:
        """Top eigenvectors of the covariance, accumulated in float64 batch by batch (data is already centred)."""
        cov, n = None, 0
        for x in batches:
            x = x.double()
            cov = x.T @ x if cov is None else cov + x.T @ x
            n += len(x)
        vals, vecs = torch.linalg.eigh(cov / max(n - 1, 1))
        top = vecs[:, torch.argsort(vals, descending=True)[: self.d_out]]
        self.components.copy_(top.float())

    def encode(self, x):
        return x @ self.components

    def decode(self, h):
        return h @ self.components.T


class Concat(nn.Module):
    def __init__(self, d_in: int, d_out: int | None = None):
        super().__init__()
        self.d_out = d_in

    def encode(self, x):
        return x

    def decode(self, h):
        return h


def build(op: str, d_in: int, d_out: int) -> nn.Module:
    if op in ("ae", "vae", "dae"):
        return AutoEncoder(d_in, d_out, kind=op)
    if op == "pca":
        return PCA(d_in, d_out)
    if op == "concat":
        return Concat(d_in)
    raise ValueError(f"unknown fusion operator {op!r}: choose from {', '.join(OPERATORS)}")


def save(model: nn.Module, op: str, d_in: int, d_out: int, path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not state:  # safetensors refuses an empty file; concat has no parameters
        state = {"_empty": torch.zeros(1)}
    meta = {"config": json.dumps({"op": op, "d_in": d_in, "d_out": d_out})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".part")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load(path) -> tuple[nn.Module, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    model = build(cfg["op"], cfg["d_in"], cfg["d_out"])
    state = load_file(str(path))
    state.pop("_empty", None)
    model.load_state_dict(state)
    return model.eval(), cfg


def nrmse_per_block(x_hat: np.ndarray, x: np.ndarray, mean: np.ndarray, slices: dict) -> dict[str, float]:
    """Normalised RMSE of each teacher's block, in the teacher's own units.

    RMSE divided by the RMS deviation of that block from its mean: 0 is perfect, 1 is no better than
    always answering the mean (the paper quotes 1.4 for random uniform guesses).
    """
    out = {}
    for name, sl in slices.items():
        err = np.sum((x_hat[:, sl] - x[:, sl]) ** 2)
        spread = np.sum((x[:, sl] - mean[sl]) ** 2)
        out[name] = float(math.sqrt(err / max(spread, 1e-12)))
    return out


def table5(columns: dict[str, dict[str, float]]) -> str:
    """Markdown in the layout of the paper's Table 5: a row per teacher plus the average, a column per method."""
    from tabulate import tabulate

    names = list(next(iter(columns.values())))
    rows = [[n] + [columns[c][n] for c in columns] for n in names]
    rows.append(["Average"] + [float(np.mean([columns[c][n] for n in names])) for c in columns])
    return tabulate(rows, headers=["h_i"] + list(columns), tablefmt="github", floatfmt=".3f")


class Standardised:
    """Rows of the cache as float32 tensors in standardised units ((h - mean) / std, per dimension)."""

    def __init__(self, cache, device):
        self.features = cache.features
        mean, std = cache.stats()
        self.mean, self.std = mean, std
        self.t_mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.t_std = torch.tensor(std, dtype=torch.float32, device=device)
        self.device = device

    def __call__(self, rows) -> torch.Tensor:
        x = torch.from_numpy(self.features.take(rows)).to(self.device).float()
        return (x - self.t_mean) / self.t_std

    def batches(self, rows, size, rng=None):
        rows = rng.permutation(rows) if rng is not None else rows
        for i in range(0, len(rows), size):
            yield self(rows[i:i + size])
