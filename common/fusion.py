"""Fusion operators G (paper section 3.2): from the standardised concatenation of all h_i to h_G, and back.

Every operator is a module with encode (x -> h_G) and decode (h_G -> x~), all in standardised units:
  ae      autoencoder, MSE on all h_i. Layout "residual" (default): a linear path initialised from the
          PCA fit plus a non-linear residual (one hidden layer each way, width following the corpus size,
          dropout, masking noise) whose output layers start at zero, so training starts from PCA and
          early stopping on validation faces can only keep it or improve on it. Layout "paper": 3 linear
          layers whose widths shrink geometrically to h_G (5488 -> 3136 -> 1792 -> 1024), mirrored.
  vae     same layouts, the encoder also gives a log-variance; h_G is the mean
  dae     same layouts, trained on inputs with a fraction of dimensions zeroed (masking noise)
  pca     linear projection on the top principal axes, fitted from a streamed covariance
  concat  no reduction: h_G is the standardised concatenation itself
Every operator carries a per-dimension loss weight (`weight`, all ones by default); block_weights gives
each teacher's block the same total weight, and PCA then fits the weighted covariance, which is the
best linear operator for that weighted loss.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.checkpoint import StateError, load_state, save_state
from common.files import atomic_file, atomic_write
from common.images import PATH_ERRORS
from common.progress import counted

log = logging.getLogger(__name__)
OPERATORS = ("ae", "pca", "vae", "dae", "concat")
FIT_FORMAT = 1  # names the fits' folder, with this file's code and torch's version (_CODE)


def code_version(source: str | bytes, torch_version: str) -> str:
    """What names a fit's code: this file's syntax tree without its docstrings (comments are not in it), so that
    a reworded comment or docstring, or a line broken anew, keeps every fit (the file's bytes did not: each
    upgrade refitted and deleted hours of G at 4.12 M faces), while any change of code starts them anew; with
    torch's release, not its build (`+cpu`, `+cu130`: a cache moves between a CPU box and a GPU box). The tree
    is written out here, its empty fields left out, not by ast.dump, whose text differs from one Python to the
    next (3.12 added type_params=[]): two boxes sharing a cache would refit, and sweep, each other's fits."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]

    def shape(x):
        if isinstance(x, ast.AST):
            return [type(x).__name__] + [[k, shape(v)] for k, v in ast.iter_fields(x)
                                         if v is not None and not (isinstance(v, list) and not v)]
        return [shape(v) for v in x] if isinstance(x, list) else repr(x)

    return hashlib.sha1((json.dumps(shape(tree)) + torch_version.split("+")[0]).encode()).hexdigest()[:16]


_CODE = code_version(Path(__file__).read_bytes(), torch.__version__)
LAYOUTS = ("residual", "paper")
AUTOENCODERS = ("ae", "vae", "dae")  # the operators --ae-layout shapes


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


def hidden_width(n_train: int, d_in: int, d_out: int) -> int:
    """Hidden width of the residual layout: an eighth of the training faces, in steps of 32, between 64 and
    the paper's first hidden width (3136 for 5488 -> 1024), so that a small corpus gets a small network."""
    cap = layer_widths(d_in, d_out)[1]
    return int(max(64, min(cap, 32 * round(n_train / 8 / 32))))


def weighted_mse(x_hat, x, weight):
    return torch.mean(weight * (x_hat - x) ** 2)


def block_weights(widths: list[int]) -> torch.Tensor:
    """Per-dimension loss weight that gives each teacher's block the same total (mean weight 1)."""
    d_in = sum(widths)
    return torch.cat([torch.full((w,), d_in / (len(widths) * w)) for w in widths])


def kl_term(mu, logvar):
    return -0.5 * torch.mean(1 + logvar - mu ** 2 - logvar.exp())


def mask_noise(x, p):
    """Masking noise with inverted scaling: dimensions zeroed with probability p, the rest scaled by 1/(1-p)."""
    return x * (torch.rand_like(x) >= p) / (1 - p) if p > 0 else x


class AutoEncoder(nn.Module):
    """The paper's layout: geometric widths, ReLU, mirrored decoder, random initialisation."""

    def __init__(self, d_in: int, d_out: int, kind: str = "ae", mask: float = 0.2, beta: float = 1e-3):
        super().__init__()
        self.kind, self.mask, self.beta = kind, mask, beta
        self.register_buffer("weight", torch.ones(d_in))
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
            return weighted_mse(self.decoder(self.encoder(x * keep)), x, self.weight)
        if self.kind == "vae":
            mu, logvar = self.encoder(x).chunk(2, dim=1)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return weighted_mse(self.decoder(z), x, self.weight) + self.beta * kl_term(mu, logvar)
        return weighted_mse(self.decoder(self.encoder(x)), x, self.weight)


class ResidualAE(nn.Module):
    """x -> h_G = L x + r(x), h_G -> x~ = L' h_G + r'(h_G). L, L' start as the PCA fit (pca_init) and r, r'
    are one-hidden-layer networks whose last layer starts at zero: at step 0 this *is* PCA. Regularised by
    dropout, masking noise on the residual's input (dae: on the whole input) and weight decay on r, r'."""

    def __init__(self, d_in: int, d_out: int, hidden: int, kind: str = "ae", dropout: float = 0.1,
                 mask: float | None = None, beta: float = 1e-3):
        super().__init__()
        self.kind, self.beta, self.d_out = kind, beta, d_out
        self.mask = (0.2 if kind == "dae" else 0.1) if mask is None else mask
        self.register_buffer("weight", torch.ones(d_in))
        self.lin_enc = nn.Linear(d_in, d_out, bias=False)
        self.lin_dec = nn.Linear(d_out, d_in, bias=False)
        self.enc_hidden = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout))
        self.enc_out = nn.Linear(hidden, d_out)
        self.dec_res = nn.Sequential(nn.Linear(d_out, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_in))
        for last in (self.enc_out, self.dec_res[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if kind == "vae":  # log-variance head; starts near zero variance, i.e. near the deterministic PCA code
            self.enc_logvar = nn.Linear(hidden, d_out)
            nn.init.zeros_(self.enc_logvar.weight)
            nn.init.constant_(self.enc_logvar.bias, -6.0)

    @torch.no_grad()
    def pca_init(self, pca: "PCA") -> None:
        """Linear path = the PCA fit (with its weighting folded in), so training starts at PCA's error."""
        self.lin_enc.weight.copy_((pca.components * pca.scale[:, None]).T)
        self.lin_dec.weight.copy_(pca.components / pca.scale[:, None])

    def residual_params(self):
        return [p for n, p in self.named_parameters() if not n.startswith("lin_")]

    def _code(self, x, noisy: bool):
        hid = self.enc_hidden(mask_noise(x, self.mask) if noisy and self.kind != "dae" else x)
        mu = self.lin_enc(x) + self.enc_out(hid)
        return mu, hid

    def encode(self, x):
        return self._code(x, False)[0]

    def decode(self, h):
        return self.lin_dec(h) + self.dec_res(h)

    def loss(self, x):
        inp = mask_noise(x, self.mask) if self.kind == "dae" else x
        mu, hid = self._code(inp, True)
        if self.kind == "vae":
            logvar = self.enc_logvar(hid)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return weighted_mse(self.decode(z), x, self.weight) + self.beta * kl_term(mu, logvar)
        return weighted_mse(self.decode(mu), x, self.weight)


class PCA(nn.Module):
    """Projection on the top principal axes of the weighted rows x * sqrt(weight): the best linear
    operator of width d_out for the (weighted) mean squared reconstruction error."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.register_buffer("components", torch.zeros(d_in, d_out))
        self.register_buffer("weight", torch.ones(d_in))
        self.d_out = d_out

    @property
    def scale(self):
        return self.weight.sqrt()

    def fit(self, batches) -> None:
        """Top eigenvectors of the covariance, accumulated in float64 batch by batch (data is already centred)."""
        self.components.copy_(self.axes(batches)[:, : self.d_out].float())

    def axes(self, batches) -> torch.Tensor:
        """Every principal axis of the weighted rows, by decreasing variance: (d_in, d_in) float64."""
        cov, n = None, 0
        for x in batches:
            x = x.double() * self.scale.double()
            cov = x.T @ x if cov is None else cov.addmm_(x.T, x)
            n += len(x)
        vals, vecs = torch.linalg.eigh(cov / max(n - 1, 1))
        return vecs[:, torch.argsort(vals, descending=True)]

    def fit_like(self, data, rows, store: Path | None = None) -> None:
        """fit on data's rows, the axes computed once per (rows, weight) and kept on data: every operator,
        width and sweep of a run starts from the same PCA, and at 4.12 M faces each fit is a full pass over
        the cache (the two most recent kept: the plain and the teacher-balanced weights). store: a folder
        where the axes are also kept on disk, named by the cache's content, the units, rows and weight,
        for the next process (transfer.py's pca baseline, once per task and run otherwise)."""
        memo = data.__dict__.setdefault("_pca_axes", {})
        key = (_sha(np.asarray(rows, np.int64)), _sha(self.weight.detach().cpu().numpy()), str(self.weight.device))
        if key not in memo:
            while len(memo) >= 2:
                memo.pop(next(iter(memo)))
            path = None if store is None else Path(store) / f"pca-{_sha(data.fingerprint.encode(), *key[:2])[:24]}.npy"
            try:  # a file that cannot be read is computed again, like a missing one
                memo[key] = torch.from_numpy(np.load(path, allow_pickle=False)) if path and path.exists() else None
            except (OSError, ValueError) as e:
                log.warning(f"could not read the PCA axes in {path} ({e}); computing them again")
                memo[key] = None
            if memo[key] is None:
                # a pass over every training face's h_i (26 GB at 4.12 M faces): shown, not a frozen "G[pca]" bar
                n = math.ceil(len(rows) / 4096)
                memo[key] = self.axes(counted(data.batches(rows, 4096), "PCA axes", "batch", n))
                try:
                    if path is not None:
                        atomic_write(path, lambda f: np.save(f, memo[key].cpu().numpy()))
                except OSError as e:  # a full disk costs the next process this pass, not this run
                    log.warning(f"could not keep the PCA axes in {path} ({e})")
        self.components.copy_(memo[key][:, : self.d_out].float())

    def encode(self, x):
        return (x * self.scale) @ self.components

    def decode(self, h):
        return (h @ self.components.T) / self.scale


class Concat(nn.Module):
    def __init__(self, d_in: int, d_out: int | None = None):
        super().__init__()
        self.d_out = d_in

    def encode(self, x):
        return x

    def decode(self, h):
        return h


def build(op: str, d_in: int, d_out: int, layout: str = "paper", hidden: int = 0) -> nn.Module:
    """An untrained operator; the residual layout needs its hidden width (see hidden_width)."""
    if op in AUTOENCODERS:
        if layout == "residual":
            return ResidualAE(d_in, d_out, hidden or hidden_width(0, d_in, d_out), kind=op)
        if layout != "paper":
            raise ValueError(f"unknown autoencoder layout {layout!r}: choose from {', '.join(LAYOUTS)}")
        return AutoEncoder(d_in, d_out, kind=op)
    if op == "pca":
        return PCA(d_in, d_out)
    if op == "concat":
        return Concat(d_in)
    raise ValueError(f"unknown fusion operator {op!r}: choose from {', '.join(OPERATORS)}")


def config(model: nn.Module, op: str, d_in: int, d_out: int) -> dict:
    """What build needs to make this model again."""
    cfg = {"op": op, "d_in": d_in, "d_out": d_out}
    if isinstance(model, ResidualAE):
        cfg.update(layout="residual", hidden=model.enc_out.in_features)
    return cfg


def save(model: nn.Module, op: str, d_in: int, d_out: int, path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not state:  # safetensors refuses an empty file; concat has no parameters
        state = {"_empty": torch.zeros(1)}
    meta = {"config": json.dumps(config(model, op, d_in, d_out))}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load(path) -> tuple[nn.Module, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    make = lambda: build(cfg["op"], cfg["d_in"], cfg["d_out"], cfg.get("layout", "paper"), cfg.get("hidden", 0))  # noqa: E731
    with torch.device("meta"):  # shaped without memory first: a config the file's tensors do not fill is refused
        planned = {k: tuple(v.shape) for k, v in make().state_dict().items()}
    if any(held.get(k, shape) != shape for k, shape in planned.items()) or set(planned) - set(held) - {"weight"}:
        raise StateError(f"{path}: its tensors do not fit the G its config describes ({cfg}); fit G anew with "
                         f"fuse.py --refit")
    model = make()
    state = load_file(str(path))
    state.pop("_empty", None)
    state.setdefault("weight", model.state_dict().get("weight"))  # files written before the loss weights existed
    model.load_state_dict({k: v for k, v in state.items() if v is not None})
    return model.eval(), cfg


# ------------------------------------------------------------------------------------- protocol
def split_group(spec: str):
    """--split-group: what keeps faces together in G's split. "image": nothing (each image alone); "folder": the
    images of one subfolder of the data (a person, a video), images at its top each alone; "re:PATTERN": the
    part of the path PATTERN matches (its first group if it has one), images it does not match each alone.
    Returns the key function, or None for "image"."""
    if spec == "image":
        return None
    if spec == "folder":
        return lambda key: key.rsplit("/", 1)[0] + "/" if "/" in key else key
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as e:
            raise ValueError(f"--split-group {spec!r}: not a regular expression ({e})") from None

        def by_pattern(key):
            m = pattern.search(key)
            return key if m is None else "re:" + (m.group(1) if pattern.groups else m.group(0))
        return by_pattern
    raise ValueError(f"--split-group {spec!r}: expected image, folder or re:PATTERN")


def draws(keys, rows, seed: int, group=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(each row's number, its group's number or None) for three_way_split: seeded 64-bit hashes of its key (its
    image path) and of its group's key. The keys (a cache's PathArray or a list) are read in slices of 65,536
    rows: one path at a time cost ~2 s a million faces more than the hashing."""
    rows = np.asarray(rows, np.int64)
    u = np.empty(len(rows), np.uint64)
    g = None if group is None else np.empty(len(rows), np.uint64)

    def draw(key):  # a name that is not UTF-8 comes as lone surrogates (PATH_ERRORS): hashed as its own bytes
        return int.from_bytes(hashlib.blake2b(f"{seed}\t{key}".encode("utf-8", PATH_ERRORS), digest_size=8).digest(),
                              "little")
    for lo in range(0, len(rows), 1 << 16):
        part = rows[lo:lo + (1 << 16)]
        first = int(part.min())
        names = keys[first:int(part.max()) + 1]
        picked = [names[r - first] for r in part.tolist()]
        u[lo:lo + len(part)] = [draw(k) for k in picked]
        if group is not None:
            g[lo:lo + len(part)] = [draw(group(k)) for k in picked]
    return u, g


def first_seen_ids(labels) -> np.ndarray:
    """Each label's number in the order labels first appear (0 for the first one's, ...)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def held_out_size(n: int, frac: float, cap: int) -> int:
    """How many of n faces a held-out part (test, validation) of G's split takes: frac of them, 2 at least,
    cap at most."""
    return min(cap, max(2, int(round(n * frac))))


def three_way_split(keys: list[str], rows: np.ndarray, seed: int, val_frac: float, test_frac: float,
                    val_max: int, test_max: int, group=None, drawn=None) -> dict[str, np.ndarray]:
    """Train / validation / test rows of G. Each face draws a number from a seeded hash of its key (its
    image path), so the split depends on the faces alone: the same after a resume and for every operator;
    while the caps do not bind, a face also keeps its role when the corpus grows (once they do, the larger
    corpus's lowest numbers take the held-out places). Test is the faces with the lowest numbers, validation
    the next ones; each has at least 2 faces and at most *_max (the rest train G).
    group (split_group): faces of one group draw one number and keep one role, so that near-duplicates (the
    frames of one video, the photos of one person) are not on both sides; test and validation then end at a
    group's last face, which may take them past their size or cap by part of a group.
    drawn: draws(keys, rows, seed, group), when the caller has them already."""
    if min(val_max, test_max) < 2:
        raise ValueError(f"validation and test need at least 2 faces each (val_max {val_max}, test_max {test_max})")
    rows = np.asarray(rows)
    u, g = drawn if drawn is not None else draws(keys, rows, seed, group)
    n_test, n_val = held_out_size(len(rows), test_frac, test_max), held_out_size(len(rows), val_frac, val_max)
    if group is None:
        order = rows[np.argsort(u, kind="stable")]
        cut_test, cut_val = n_test, n_test + n_val
    else:
        by = np.lexsort((u, g))
        order, g = rows[by], g[by]
        ends = np.append(np.flatnonzero(g[1:] != g[:-1]) + 1, len(g))  # one past each group's last face
        cut_test = int(ends[np.searchsorted(ends, n_test)]) if n_test <= len(g) else len(g)
        cut_val = int(ends[np.searchsorted(ends, cut_test + n_val)]) if cut_test + n_val <= len(g) else len(g)
    if len(rows) < cut_val + 2:
        n_groups = 0 if group is None else len(np.unique(g))
        why = "" if group is None else f" of whole groups ({n_groups} group{'s' if n_groups != 1 else ''})"
        raise ValueError(f"{len(rows)} faces cannot be split into training, {n_val} validation and {n_test} test "
                         f"faces{why}")
    return {"train": np.sort(order[cut_val:]), "val": np.sort(order[cut_test:cut_val]),
            "test": np.sort(order[:cut_test])}


class Rows:
    """Standardised rows held in memory, with the batches interface that fit expects (tests, small corpora)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.fingerprint = _sha(x.detach().cpu().numpy())

    def __call__(self, rows):
        return self.x[torch.as_tensor(np.asarray(rows))]

    def batches(self, rows, size, rng=None):
        rows = rng.permutation(rows) if rng is not None else np.asarray(rows)
        for i in range(0, len(rows), size):
            yield self(rows[i:i + size])


@dataclass
class Recipe:
    """How an autoencoder is trained: by steps, warm-up then cosine schedule, early stopping on validation."""
    layout: str = "residual"
    steps: int = 1000
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05  # on the residual networks only: the linear path is the PCA fit
    eval_every: int = 50
    patience: int = 10  # evaluations without a better validation error before stopping
    seed: int = 0
    checkpoint_s: float = 300.0  # least seconds between two saves of a fit's state (at evaluations)


@torch.no_grad()
def val_loss(model, data, rows) -> float:
    """Mean weighted squared error of encode-decode on rows (standardised units, weights as in training)."""
    model.eval()
    total = sum(float((model.weight * (model.decode(model.encode(x)) - x) ** 2).sum())
                for x in data.batches(rows, 4096))
    return total / (len(rows) * len(model.weight))


def _sha(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fits_folder(root) -> Path:
    """This version's folder of fit states under root (a cache's fits/). A state written by another version of
    this module or of torch is never read again (its name holds _CODE), so prune_fits can remove it."""
    return Path(root) / f"v{FIT_FORMAT}-{_CODE}"


# What prune_fits may remove: names it writes, nothing else (root may be a link to a scratch disk, or hold a
# user's own files: removing every other entry there emptied the folder a `fits` link pointed to)
_FIT_NAMES = re.compile(r"v\d+-[0-9a-f]{16}|.+\.state\.safetensors|\..+\.tmp")


def prune_fits(root) -> int:
    """Remove from root what no fit can read any more: other versions' folders, loose files of the layout
    before versioned folders, and the temp file of a save a kill -9 cut off. Returns the bytes freed.
    (At the paper's widths a finished autoencoder keeps 210 MB, one cut off 830 MB: an update would
    otherwise leave them behind for good.)"""
    root, keep = Path(root), fits_folder(root)
    if not root.is_dir():
        return 0
    dead = [p for p in root.iterdir() if p != keep and _FIT_NAMES.fullmatch(p.name)] + list(keep.rglob(".*.tmp"))
    freed = 0
    for p in dead:
        tree = p.is_dir() and not p.is_symlink()
        freed += sum(f.lstat().st_size for f in (p.rglob("*") if tree else [p]) if not f.is_dir())
        shutil.rmtree(p) if tree else p.unlink()
    return freed


def fit_file(folder, op, d_in, d_out, data, train, val, recipe: Recipe, weight=None) -> Path:
    """Where the fit with exactly these inputs keeps its state: any change of faces, their units, the cache's
    content, the recipe, the loss weight, this module's source or torch's version gives another file. PCA and
    concat are not trained: the recipe is no part of their key."""
    w = np.ones(d_in, np.float32) if weight is None else np.asarray(weight, np.float32)
    recipe = ({k: v for k, v in vars(recipe).items() if k != "checkpoint_s"}  # how often it saves is no matter
              if op not in ("pca", "concat") else None)
    key = json.dumps({"format": FIT_FORMAT, "code": _CODE, "op": op, "d_in": d_in, "d_out": d_out, "recipe": recipe,
                      "data": data.fingerprint, "rows": _sha(np.asarray(train, np.int64), np.asarray(val, np.int64)),
                      "weight": _sha(w)}, sort_keys=True)
    return Path(folder) / f"{op}-{d_out}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.state.safetensors"


def fit(op: str, d_in: int, d_out: int, data, train, val, recipe: Recipe, weight=None, device="cpu", progress=None,
        checkpoint: Path | None = None):
    """Train one operator on the train rows; autoencoders keep the state of their best validation error.

    Returns (model in eval mode, info dict). The residual layout evaluates its starting point (the PCA fit)
    first, so the state kept is never worse than PCA on the validation faces.

    With a checkpoint file (fit_file), the training state is saved there at an evaluation when
    recipe.checkpoint_s have passed since the last save, and the result when done: a killed fit resumes
    from its last save (the same batches, noise and result as a run never killed), a finished one is
    loaded instead of trained again."""
    torch.manual_seed(recipe.seed)
    hidden = hidden_width(len(train), d_in, d_out)
    model = build(op, d_in, d_out, recipe.layout, hidden).to(device)
    if weight is not None and hasattr(model, "weight"):
        model.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
    info = {"op": op, "layout": recipe.layout if op in AUTOENCODERS else None, "n_train": len(train),
            "n_val": len(val)}
    if op == "concat":  # nothing fitted: the same for the same inputs, as a finished fit is
        return model.eval(), {**info, "loaded": True}
    saved = _load_fit(checkpoint)
    # the axes on disk beside the fits: a new autoencoder (another recipe or width) starts from them without
    # a pass over the cache (at 4.12 M faces, 45 GB and an eigendecomposition of 5488 x 5488)
    store = None if checkpoint is None else Path(checkpoint).parent / "pca"
    if saved is not None and saved["done"]:
        model.load_state_dict(saved["model"])
        return model.eval(), {**saved["info"], "loaded": True}
    if op == "pca":  # a pass over every training face: at 4.12 M, worth keeping like a trained operator
        model.fit_like(data, train, store)
        _save_fit(checkpoint, {"done": True, "model": model.state_dict(), "info": info})
        return model.eval(), info
    if isinstance(model, ResidualAE):
        if saved is None:  # a resumed fit has its linear path in its saved state
            pca = PCA(d_in, d_out).to(device)
            pca.weight.copy_(model.weight)
            pca.fit_like(data, train, store)
            model.pca_init(pca)
        groups = [{"params": [p for n, p in model.named_parameters() if n.startswith("lin_")], "weight_decay": 0.0},
                  {"params": model.residual_params(), "weight_decay": recipe.weight_decay}]
        info["hidden"] = hidden
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]  # the paper's plain Adam
    opt = torch.optim.AdamW(groups, lr=recipe.lr)
    warm = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps)))
    rng = np.random.default_rng(recipe.seed)
    snapshot = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}
    if saved is None:
        best, best_step, best_state, waited = val_loss(model, data, val), 0, snapshot(), 0
        if not math.isfinite(best):
            raise FloatingPointError(f"{op}: the validation error of the starting point is {best}: the "
                                     "validation faces' h_i hold inf or NaN")
        step, done_in_epoch = 0, 0
    else:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        best, best_step, waited, step, done_in_epoch = (saved[k] for k in ("best", "best_step", "waited", "step",
                                                                            "done_in_epoch"))
        best_state = {k: v.to(device) for k, v in saved["best_state"].items()}
        rng.bit_generator.state = saved["epoch_rng"]
        _restore_rng(saved["rng"], device)
        info["resumed_from_step"] = step
    last_save = time.monotonic()
    # Checked at each evaluation, not each step: reading the loss back would make the host wait for the
    # GPU at every step. A non-finite loss poisons the weights, so nothing it touched is ever kept.
    finite, checked = torch.ones((), dtype=torch.bool, device=device), step
    stop = False
    while not stop:
        epoch_rng = rng.bit_generator.state  # before the epoch's order is drawn, so a resume draws it again
        order = rng.permutation(train)
        for x in data.batches(order[done_in_epoch * recipe.batch:], recipe.batch):
            model.train()
            loss = model.loss(x)
            finite &= torch.isfinite(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step, done_in_epoch = step + 1, done_in_epoch + 1
            if progress:
                progress(step, best)
            if step % recipe.eval_every == 0 or step == recipe.steps:
                if not bool(finite):
                    raise FloatingPointError(f"{op}: the loss became inf or NaN between steps {checked + 1} and "
                                             f"{step}; lower --lr")
                checked = step
                v = val_loss(model, data, val)
                if not math.isfinite(v):  # else `v < best` is never true and step 0 is kept without a word
                    raise FloatingPointError(f"{op}: the validation error became {v} at step {step}; lower --lr")
                if v < best:
                    best, best_step, best_state, waited = v, step, snapshot(), 0
                else:
                    waited += 1
                if waited >= recipe.patience or step >= recipe.steps:
                    stop = True
                    break
                if checkpoint is not None and time.monotonic() - last_save >= recipe.checkpoint_s:
                    _save_fit(checkpoint, {"done": False, "model": model.state_dict(), "opt": opt.state_dict(),
                                            "sched": sched.state_dict(), "best": best, "best_step": best_step,
                                            "waited": waited, "step": step, "done_in_epoch": done_in_epoch,
                                            "best_state": best_state, "epoch_rng": epoch_rng, "rng": _rng_of(device)})
                    last_save = time.monotonic()
        else:
            done_in_epoch = 0
    model.load_state_dict(best_state)
    info.update(best_val_mse=best, best_step=best_step, steps_run=step)
    _save_fit(checkpoint, {"done": True, "model": best_state, "info": info})  # no optimizer state: done
    return model.eval(), info


def _rng_of(device) -> dict:
    """The generators a fit draws its noise from: torch's CPU one and, on a GPU, that GPU's (only it: the
    state then follows the fit to whichever GPU resumes it, and a CPU fit never initialises CUDA)."""
    device = torch.device(device)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng(rng: dict, device) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], torch.device(device))


def _load_fit(path):
    """A fit's saved state, or None. A damaged file (a disk error; a kill mid-write cannot leave one) is moved
    aside with a warning and the fit starts over, rather than stopping the run."""
    if path is None or not Path(path).exists():
        return None
    try:
        return load_state(path)
    except StateError as e:
        aside = Path(str(path) + ".damaged")
        os.replace(path, aside)
        log.warning(f"{e}; moved to {aside}, the fit starts over")
        return None


def _save_fit(path, state) -> None:
    """Save a fit's state; a failure (a full disk) costs the resume, not the training: warn and go on."""
    if path is None:
        return
    try:
        save_state(path, state)
    except OSError as e:
        log.warning(f"could not save the fit's state to {path} ({e}); training goes on without it")


def nrmse_per_block(x_hat: np.ndarray, x: np.ndarray, mean: np.ndarray, slices: dict) -> dict[str, float]:
    """Normalised RMSE of each teacher's block, in the teacher's own units.

    RMSE divided by the RMS deviation of that block from its mean: 0 is perfect, 1 is no better than
    always answering the mean (the paper quotes 1.4 for random uniform guesses).
    A teacher whose h_i are the same on every face (RMS spread under 1e-6) has no error to normalise: NaN,
    where dividing by a floor gave any number, 0.28 as readily as 5,000.
    """
    out = {}
    for name, sl in slices.items():
        err = np.sum((x_hat[:, sl] - x[:, sl]) ** 2)
        spread = np.sum((x[:, sl] - mean[sl]) ** 2)
        if spread <= 1e-12 * x[:, sl].size:
            out[name] = math.nan
        else:  # a NaN reconstruction (a diverged decoder) is an infinite error, not a constant teacher
            out[name] = float(math.sqrt(err / spread)) if np.isfinite(err) else math.inf
    return out


def average_nrmse(errors: dict[str, float]) -> float:
    """The mean over the teachers that have an error (not the constant ones, NaN)."""
    values = [v for v in errors.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def error_table(rows: list[list], headers: list[str]) -> str:
    """Markdown of error rows, NaN (a teacher constant on every test face: no error to normalise) as n/a."""
    from tabulate import tabulate

    cell = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return tabulate([[cell(v) for v in row] for row in rows], headers=headers, tablefmt="github", floatfmt=".3f",
                    missingval="n/a")


def table5(columns: dict[str, dict[str, float]]) -> str:
    """Markdown in the layout of the paper's Table 5: a row per teacher plus the average, a column per method."""
    names = list(next(iter(columns.values())))
    rows = [[n] + [columns[c][n] for c in columns] for n in names]
    rows.append(["Average"] + [average_nrmse(columns[c]) for c in columns])
    md = error_table(rows, ["h_i"] + list(columns))
    constant = [n for n in names if any(math.isnan(columns[c][n]) for c in columns)]
    if constant:
        them = "them" if len(constant) > 1 else "it"
        md += (f"\n\nn/a: {', '.join(constant)} gave the same h_i on every test face, so there is no error to "
               f"normalise; the average leaves {them} out.")
    return md


def column_sums(array, rows, chunk_values: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Sum and sum of squares per column over array's rows, streamed in float64 chunks of about chunk_values
    numbers: millions of rows never sit in memory."""
    rows = np.asarray(rows)
    step = max(1, chunk_values // max(1, array.shape[1]))
    s = ss = np.zeros(array.shape[1])
    for i in range(0, len(rows), step):
        x = array.take(rows[i:i + step]).astype(np.float64)
        s, ss = s + x.sum(0), ss + (x * x).sum(0)
    return s, ss


def column_stats(array, rows) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per column over array's rows (std floored at 1e-6, so a dead unit standardises to 0)."""
    if len(rows) == 0:
        raise ValueError("column statistics of no rows")
    return stats_of_sums(*column_sums(array, rows), len(rows))


def stats_of_sums(s, ss, n) -> tuple[np.ndarray, np.ndarray]:
    """column_stats from column_sums' answer over n rows."""
    mean = s / n
    return mean, np.maximum(np.sqrt(np.maximum(ss / n - mean ** 2, 0)), 1e-6)


def block_units(cache, rows) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) that put h_i in G's units, from the training faces `rows` alone: each dimension centred
    on its mean, each teacher's block divided by one number, the RMS of its dimensions' spreads.

    One number per teacher keeps each embedding's own geometry (its cosines and relative dimension scales),
    and G's mean squared error in these units is then each teacher's squared Table 5 error, weighted by its
    width. A std per dimension instead blows up where a unit (almost) never fires on the training faces:
    an unseen face's activation becomes thousands of standard deviations (on the demo's 147 training
    faces, PCA's validation NRMSE 0.284 per dimension vs 0.179 per teacher, at h_G width 536).

    When the rows are most of the faces found, their sums are the cache's totals (kept per shard) minus
    the other faces': at 4.12 M faces that reads the 40,000 held-out rows instead of 45 GB."""
    rows = np.sort(np.asarray(rows))
    if len(rows) == 0:
        raise ValueError("G's units from no faces")
    others = np.setdiff1d(np.flatnonzero(cache.found), rows)
    count, s, ss = cache.sums()
    if len(others) < len(rows) and count - len(others) == len(rows):
        o_s, o_ss = column_sums(cache.features, others)
        s, ss = s - o_s, ss - o_ss
    else:
        s, ss = column_sums(cache.features, rows)
    if not (np.isfinite(s).all() and np.isfinite(ss).all()):  # a cache extracted before such rows were dropped
        bad = [name for name, sl in cache.slices().items() if not np.isfinite(ss[sl]).all()]
        raise FloatingPointError(f"{cache.path}: teacher {', '.join(bad)} stored inf or NaN features for some "
                                 "faces: extract the cache again (--overwrite) and those faces are listed as missed")
    mean = s / len(rows)
    std = np.sqrt(np.maximum(ss / len(rows) - mean ** 2, 0))
    for sl in cache.slices().values():
        std[sl] = max(float(np.sqrt(np.mean(std[sl] ** 2))), 1e-6)
    return mean, std


class Standardised:
    """Rows of the cache as float32 tensors in G's units ((h - mean) / std).

    fuse.py passes the units of G's training faces (block_units): a validation or test face must not shape
    the units G is fitted and reported in. They are saved beside h_G (stats.npz), and whatever feeds h_i
    to that G later standardises with them (FeatureCache.input_stats). Without stats: the whole cache's
    mean and std per dimension."""

    def __init__(self, cache, device, stats: tuple[np.ndarray, np.ndarray] | None = None):
        self.features = cache.features
        mean, std = stats if stats is not None else cache.stats()
        self.mean, self.std = mean, std
        self.t_mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.t_std = torch.tensor(std, dtype=torch.float32, device=device)
        self.device = device
        # what a checkpointed fit of these rows must match (fit_file): the cache's content and these units,
        # rounded to float32 so that a float64 sum taken in another order still names the same fit
        self.fingerprint = f"{cache.manifest.get('content_hash')}-{_sha(np.float32(mean), np.float32(std))}"

    def __call__(self, rows) -> torch.Tensor:
        return self._on_device(self._read(rows))

    def _read(self, rows) -> torch.Tensor:
        x = torch.from_numpy(self.features.take(rows))
        # pinned on a GPU, so that the copy below overlaps the kernels (the host allocator keeps a pinned
        # block until its copy is done)
        return x.pin_memory() if torch.device(self.device).type == "cuda" else x

    def _on_device(self, x) -> torch.Tensor:
        # non-blocking: a blocking copy would make the host wait for every kernel queued before it
        x = x.to(self.device, non_blocking=True).float()
        return (x - self.t_mean) / self.t_std

    def batches(self, rows, size, rng=None, ahead: int = 2):
        """Batches of rows (shuffled by rng), read `ahead` batches in advance by a thread: at millions of faces
        a batch gathers rows from hundreds of memory-mapped shards (milliseconds on the host), which would
        otherwise leave the GPU idle at every step."""
        rows = rng.permutation(rows) if rng is not None else rows
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        with ThreadPoolExecutor(1) as reader:
            queued = deque(reader.submit(self._read, c) for c in chunks[:ahead])
            for i in range(len(chunks)):
                x = queued.popleft().result()
                if i + ahead < len(chunks):
                    queued.append(reader.submit(self._read, chunks[i + ahead]))
                yield self._on_device(x)
