"""Step 1 of the paper (sections 3.2, 4.1, 4.3-4.4): fuse several pretrained face models into one embedding.

  1. detect and align every face once (MTCNN, 5 landmarks, similarity transform to a canonical crop);
  2. run every teacher on every face and cache its embedding h_i (sharded, memory-mapped, resumable);
  3. train the fusion operator G on the cached h_i (autoencoder; PCA, VAE, DAE, concat to compare);
  4. report each teacher's reconstruction error (Table 5) and write h_G for every face (for distill.py).

  python fuse.py                                  # embedded real faces from installed packages
  python fuse.py --data /faces --cache feats/     # your own unlabelled faces (any folder tree)
  torchrun --nproc_per_node 4 fuse.py --data /faces --cache feats/   # several GPUs: shards split by rank

The three scripts name one thing one way: --data (images), --cache (the feature cache this script
writes and the others read), --run-dir (logs, tables, checkpoints), --student (distill.py's result).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

from common import fusion
from common.align import CROP_SIZE, DETECT_SIZE
from common.cache import CacheMismatch, FeatureCache, write_json, write_missed
from common.extract import Options
from common.extract import extract as engine_extract
from common.fusion import Standardised
from common.images import list_images
from common.runs import dist_info, get_logger, make_run_dir, pick_device, run_main
from common.teachers import DEFAULT_TEACHERS, REGISTRY, build_teachers, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and cache")
    g.add_argument("--data", type=Path, help="folder of unlabelled face images (any tree). "
                   "Default: the embedded real faces, gathered from installed packages into data/demo_faces")
    g.add_argument("--cache", "--out", dest="out", metavar="DIR", type=Path,
                   help="feature cache folder (default: feats/demo, or feats/ with --data); --out is the old spelling")
    g.add_argument("--run-dir", type=Path, help="run folder for logs, tables and plots (default: runs/fuse-TIME)")
    g.add_argument("--overwrite", action="store_true", help="delete an existing cache at --cache and rebuild it")
    g.add_argument("--shard-size", type=int, default=4096, help="faces per cache shard (resume granularity)")
    g.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage type of h_i")
    g = p.add_argument_group("teachers and faces")
    g.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS),
                   help="comma list of built-in teachers (see --list-teachers) and/or custom specs such as "
                        "onnx:/path/model.onnx:LAYER:SIZE, torchscript:/path/model.pt:SIZE, "
                        "torchvision:resnet18:/path/weights.pth:LAYER:SIZE")
    g.add_argument("--teachers-config", type=Path, help="JSON file of extra custom teachers (added to --teachers)")
    g.add_argument("--list-teachers", action="store_true", help="print the teacher registry and exit")
    g.add_argument("--align", default="mtcnn", choices=["mtcnn", "none"],
                   help="mtcnn: detect and align each face; none: images already are face crops")
    g.add_argument("--min-face-prob", type=float, default=0.9, help="detector confidence below which no face counts")
    g.add_argument("--batch", type=int, default=32, help="images per batch (detection, alignment, teachers)")
    g.add_argument("--workers", type=int, default=0,
                   help="loader processes reading and decoding images (detection runs batched in the main process)")
    g.add_argument("--detect-size", type=int, default=DETECT_SIZE,
                   help="longer side of the downscaled copy MTCNN searches (landmarks are mapped back to full "
                        "resolution); smaller is faster but misses small faces")
    g.add_argument("--crop-size", type=int, default=CROP_SIZE,
                   help="side of the aligned crops kept in the cache's crop store, which distill.py and transfer.py "
                        f"read instead of the images ({CROP_SIZE}: 48 kB a face, 203 GB for 4.12 M faces; 0: none)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g = p.add_argument_group("fusion G")
    g.add_argument("--ops", default="ae,pca,vae,dae",
                   help=f"fusion operators to train and compare in the Table 5 report ({', '.join(fusion.OPERATORS)})")
    g.add_argument("--write", help="operator whose h_G is written into the cache for distill.py (default: first of --ops)")
    g.add_argument("--dim", default="",
                   help="width of h_G (default: mean teacher width, the paper's rule); a comma list a,b,c also "
                        "sweeps the widths with the first operator and plots error vs width (Figure 2); "
                        "the first width of the list is the one written")
    g.add_argument("--epochs", type=int, default=40, help="training epochs of the autoencoders")
    g.add_argument("--fusion-batch", type=int, default=256, help="batch size for training G")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for G")
    g.add_argument("--val-frac", type=float, default=0.1, help="fraction of faces held out from training G")
    g.add_argument("--val-max", type=int, default=20000,
                   help="at most this many held-out faces are scored (model selection and the Table 5 report)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of training")
    g.add_argument("--extract-only", action="store_true", help="stop after the feature cache is complete")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- faces
def extract(args, cache: FeatureCache, teachers, device, rank, world, log) -> None:
    """Detect, align and run every teacher on this rank's unfinished shards (common.extract)."""
    opts = Options(align=args.align, min_face_prob=args.min_face_prob, batch=args.batch, workers=args.workers,
                   detect_size=args.detect_size)
    engine_extract(cache, teachers, device, opts, rank, world, log)


def report_missed(cache: FeatureCache, run: Path, log) -> None:
    """List every image without a usable face (paper section 4.1 counts them; transfer.py applies the rule)."""
    n_noface, n_bad = write_missed(cache, run / "missed_faces.tsv")
    log.info(f"faces: {len(cache.images) - n_noface - n_bad} aligned, {n_noface} images with no face, "
             f"{n_bad} unreadable (listed in {run / 'missed_faces.tsv'})")


# --------------------------------------------------------------------------------------------- fusion
def train_operator(op, d_in, d_out, data: Standardised, train, val, args, log):
    """Fit one operator; autoencoders keep the weights of their best held-out epoch."""
    torch.manual_seed(args.seed)
    model = fusion.build(op, d_in, d_out).to(data.device)
    if op == "pca":
        model.fit(data.batches(train, 4096))
    elif op != "concat":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        rng = np.random.default_rng(args.seed)
        best, best_state = float("inf"), None
        for epoch in tqdm(range(args.epochs), desc=f"G[{op} {d_out}]", unit="epoch", disable=None, leave=False):
            model.train()
            for x in data.batches(train, args.fusion_batch, rng):
                loss = model.loss(x)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{op}: loss became {loss.item()} at epoch {epoch}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            val_loss = evaluate_mse(model, data, val)
            if val_loss < best:
                best, best_state = val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        log.info(f"G[{op}, {d_out}]: best held-out MSE {best:.4f} (standardised units)")
    return model.eval()


@torch.no_grad()
def reconstruct(model, data: Standardised, rows) -> np.ndarray:
    """Reconstructed h_i of the given rows, back in the teachers' own units."""
    model.eval()
    out = [model.decode(model.encode(x)).cpu().numpy() for x in data.batches(rows, 4096)]
    return np.concatenate(out) * data.std + data.mean


@torch.no_grad()
def evaluate_mse(model, data, rows) -> float:
    model.eval()
    total = sum(float(((model.decode(model.encode(x)) - x) ** 2).sum()) for x in data.batches(rows, 4096))
    return total / (len(rows) * data.features.shape[1])


def write_hG(cache: FeatureCache, name: str, model, op, d_in, d_out, data: Standardised, val, args) -> None:
    """h_G of every face, shard by shard, plus G itself (its decoder serves distill.py's one-step variant).

    Written into a new folder that replaces emb/<name> in one atomic switch at the end: a rerun killed
    midway leaves the previous h_G whole, and distill.py never reads a half-written one."""
    found = cache.found
    with cache.new_embedding(name) as folder, torch.no_grad():
        fusion.save(model, op, d_in, d_out, folder / "G.safetensors")
        for k in tqdm(range(cache.n_shards), desc=f"write h_G[{name}]", unit="shard", disable=None, leave=False):
            lo, hi = int(cache.bounds[k]), int(cache.bounds[k + 1])
            rows = np.arange(lo, hi)
            h = np.zeros((hi - lo, model.d_out), np.float32)
            ok = found[lo:hi]
            if ok.any():
                h[ok] = np.concatenate([model.encode(x).cpu().numpy() for x in data.batches(rows[ok], 4096)])
            cache.write_embedding_shard(name, k, h, folder)
        np.save(folder / "val_rows.npy", np.asarray(val))
        cache.write_embedding_meta(name, {"op": op, "dim": int(model.d_out), "d_in": d_in, "teachers": cache.teachers,
                                          "val_frac": args.val_frac, "seed": args.seed, "model": "G.safetensors",
                                          "content_hash": cache.manifest.get("content_hash")}, folder)


def fit_and_report(cache: FeatureCache, args, device, run: Path, log) -> None:
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in ops:
        if op not in fusion.OPERATORS:
            raise SystemExit(f"--ops: unknown operator {op!r} (choose from {', '.join(fusion.OPERATORS)})")
    write = args.write or ops[0]
    if write not in ops:
        ops.append(write)
    d_in = cache.dim
    mean_width = round(d_in / len(cache.teachers))
    dims = [int(d) for d in args.dim.split(",") if d.strip()] or [mean_width]
    rows = np.flatnonzero(cache.found)
    if len(rows) < 10:
        raise SystemExit(f"only {len(rows)} faces were found in {cache.data_root}: too few to train G")
    rows = np.random.default_rng(args.seed).permutation(rows)
    n_val = max(2, int(round(len(rows) * args.val_frac)))
    # Only a bounded sample of the held-out faces is scored, so that millions of faces fit in memory.
    val, train = np.sort(rows[:min(n_val, args.val_max)]), np.sort(rows[n_val:])
    log.info(f"G: {len(train)} training faces, {len(val)} held out; input {d_in}, h_G {dims[0]} "
             f"(mean teacher width {mean_width}); layers {fusion.layer_widths(d_in, dims[0])}")
    data = Standardised(cache, device)
    x_val = cache.features.take(val).astype(np.float64)
    slices = cache.slices()

    table, models = {}, {}
    for op in ops:
        models[op] = train_operator(op, d_in, dims[0], data, train, val, args, log)
        table[op] = fusion.nrmse_per_block(reconstruct(models[op], data, val), x_val, data.mean, slices)
    md = fusion.table5({op.upper(): table[op] for op in ops})
    (run / "table5.md").write_text(
        f"Reconstruction normalised RMSE on {len(val)} held-out faces (h_G width {dims[0]}), as in Table 5\n\n{md}\n")
    write_json(run / "table5.json", {"dim": dims[0], "n_val": len(val), "nrmse": table})
    log.info("\n" + md)

    if len(dims) > 1:
        sweep_dims(cache, ops[0], dims, data, train, val, x_val, slices, args, run, log)
    if not args.extract_only:
        write_hG(cache, write, models[write], write, d_in, dims[0], data, val, args)
        log.info(f"h_G ({write}, width {models[write].d_out}) written to {cache.path / 'emb' / write}")


def sweep_dims(cache, op, dims, data, train, val, x_val, slices, args, run, log) -> None:
    """Figure 2: reconstruction error against the width of h_G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    dims = sorted(dims)
    for d in dims:
        model = train_operator(op, cache.dim, d, data, train, val, args, log)
        err = fusion.nrmse_per_block(reconstruct(model, data, val), x_val, data.mean, slices)
        results.append({"dim": d, **err, "average": float(np.mean(list(err.values())))})
    write_json(run / "dim_sweep.json", results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in list(slices) + ["average"]:
        ax.plot(dims, [r[name] for r in results], marker="o", lw=2.5 if name == "average" else 1, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("width of h_G")
    ax.set_ylabel("held-out normalised RMSE")
    ax.set_title(f"Reconstruction error of G ({op}) vs h_G width")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "dim_sweep.png", dpi=120)
    log.info(f"width sweep {dims}: average NRMSE {[round(r['average'], 3) for r in results]} -> {run / 'dim_sweep.png'}")


def list_teachers() -> None:
    rows = [[s.name, s.role, s.dim, s.input_size, s.runtime + (f" (CPU: {s.reference})" if s.reference else ""), s.pip,
             s.name in DEFAULT_TEACHERS] for s in REGISTRY.values()]
    print(tabulate(rows, headers=["teacher", "role", "width", "input", "runtime", "weights from", "default"]))


def main(argv=None):
    args = parse_args(argv)
    if args.list_teachers:
        return list_teachers()
    rank, world = dist_info()
    device = pick_device(args.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)  # else every rank's NCCL context lands on GPU 0
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.data is None:
        from common.demo import build_demo_faces

        args.data = build_demo_faces() if rank == 0 else Path("data/demo_faces")
        if world > 1:
            dist.barrier()
        args.out = args.out or Path("feats/demo")
    args.out = args.out or Path("feats")
    images = list_images(args.data)
    if not images:
        raise SystemExit(f"no images (jpg, png, bmp, tif, webp, ppm) under {args.data}")
    run = make_run_dir(args.run_dir, "fuse", args) if rank == 0 else None
    log = get_logger(run, f"fuse{rank}")
    names = [n.strip() for n in args.teachers.split(",") if n.strip()]
    extra = load_config(args.teachers_config) if args.teachers_config else []
    teachers = build_teachers(names + extra, device)
    log.info("teachers: " + ", ".join(f"{t.name} ({t.dim})" for t in teachers) + f" on {device}; {len(images)} images")
    if args.overwrite and rank == 0 and args.out.exists():
        shutil.rmtree(args.out)
    if world > 1:
        dist.barrier()
    try:
        if rank == 0:
            cache = FeatureCache.create_or_resume(args.out, args.data, images, teachers, args.shard_size,
                                                  args.dtype, args.align, args.min_face_prob, args.crop_size)
        if world > 1:
            dist.barrier()
        if rank != 0:
            cache = FeatureCache.create_or_resume(args.out, args.data, images, teachers, args.shard_size,
                                                  args.dtype, args.align, args.min_face_prob, args.crop_size)
    except CacheMismatch as e:
        raise SystemExit(f"error: {e}")
    extract(args, cache, teachers, device, rank, world, log)
    if world > 1:
        dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        return
    cache.finalize()
    report_missed(cache, run, log)
    log.info(f"feature cache complete: {cache.path} ({len(images)} images x {cache.dim} dims, {cache.dtype})")
    if not args.extract_only:
        fit_and_report(cache, args, device, run, log)
    if world > 1:
        dist.destroy_process_group()
    log.info(f"run folder: {run}")


if __name__ == "__main__":
    run_main(main)
