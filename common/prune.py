"""ETL-style task-aware filter pruning: keep the convolution filters that tell most about a task's label.

ETL (John, Dua, Balasubramanian, Jawahar, VISAPP 2022) and its predecessor "Low-Cost Transfer Learning
of Face Tasks" (arXiv 1901.02675) transfer a pretrained face network to a new face task by keeping
only the filters whose responses carry information about the new task's label, which gives a much
smaller network that is then fine-tuned. What is implemented here:

1. Score (training images of the task only, at most `max_images` of them, no augmentation): every
   convolution filter's response (after its batch norm when it has one) is averaged over space as the
   next layer sees it: after the ReLU (or ReLU6) when one follows directly, as it is otherwise (a batch
   norm that feeds a skip connection or a linear bottleneck passes its negative values on, and they
   carry information: a filter equal to minus the label would score 0 after a ReLU); the score of a
   filter is the mutual information, in bits, between that scalar and the label, estimated by a
   plug-in histogram (8 equal-count bins of the response; classes as they are, a regression target in
   8 equal-count bins, a multi-label task as the mean over its attributes).
2. Cut, layer by layer: every group of coupled filters keeps its best max(1, round((1 - ratio) * n))
   filters. A group is what must be removed together for the network to stay well formed: a filter, the
   batch norm after it and the input channels of the layers it feeds; for a residual network, every
   filter writing into the same channel of a skip connection (torch-pruning's dependency graph finds the
   groups in any PyTorch network). A shared channel scores the best of the filters writing into it.
3. Remove physically: a new, smaller network (fewer output channels in the convolutions and batch
   norms, fewer input channels in the layers after them), which the caller fine-tunes. Before that, it
   is checked to compute what the unpruned network computes with the removed filters silenced.

Where this differs from the paper: the text we had (its abstract) says ETL keeps only "cross-task aware
filters" of a transferred VGGFace, not how it scores or cuts them; here the score is the mutual information
of the pooled response (a classifier-free measure of "how much a filter tells about the label"), the cut is
a fixed fraction of every layer (so that no layer vanishes and the ratio means the same on any network), the
networks are residual (the student) or any PyTorch teacher, and pruning is done once.

A pruned network is saved with its module shapes in the safetensors metadata (`shapes`), which
`apply_shapes` uses to rebuild it from the unpruned architecture before loading the weights.
"""
from __future__ import annotations

import io
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import atomic_write, write_json, write_text
from .precision import no_tf32

BINS = 8
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CannotPrune(RuntimeError):
    """A network or a ratio ETL cannot prune; the scripts end on its one-line message (the methods already
    run are in report.json)."""


# ------------------------------------------------------------------------------------------ groups
def dependency_graph(model: nn.Module, example):
    """torch-pruning's dependency graph of `model` and its prunable groups of coupled convolution filters.

    A filter whose output is permuted or transposed before the next layer (MTCNN's ONet flattens in
    (W, H, C) order) stays whole: the tracer would map its channels to the wrong inputs downstream.
    """
    import torch_pruning as tp

    model.eval()
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    ignored = [m for m, node in dg.module2node.items() if isinstance(m, _CONV) and _reaches_permute(node)]
    groups = [g for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=[*_CONV])
              if any(_is_out(dg, dep) and isinstance(dep.target.module, _CONV) for dep, _ in g)]
    return dg, groups


def _reaches_permute(node) -> bool:
    stack, seen = list(node.outputs), set()
    while stack:
        n = stack.pop()
        if id(n) in seen or isinstance(n.module, (*_CONV, nn.Linear)):
            continue
        seen.add(id(n))
        fn = type(getattr(n, "grad_fn", None)).__name__
        if "Permute" in fn or "Transpose" in fn:
            return True
        stack.extend(n.outputs)
    return False


def _is_out(dg, dep) -> bool:
    return dg.is_out_channel_pruning_fn(dep.handler)


def _members(dg, group) -> list[tuple[nn.Module, list[int], list[int]]]:
    """(module whose output channels are the group's filters, local channel indices, group indices).

    The batch norms when the group has some (their output is the normalised response), else the convolutions.
    """
    items = [(dep.target.module, list(idxs), list(item.root_idxs))
             for item in group for dep, idxs in [(item.dep, item.idxs)] if _is_out(dg, dep)]
    bns = [i for i in items if isinstance(i[0], _BN)]
    return bns or [i for i in items if isinstance(i[0], _CONV)]


# ------------------------------------------------------------------------------------------- score
def mutual_information(x: np.ndarray, labels: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Plug-in mutual information (bits) between each column of x (N, C) and discrete labels (N,).

    Columns are cut into `bins` equal-count bins (ties fall together, so a constant column scores 0).
    The plug-in estimate is biased upwards by about (occupied bins - 1)(classes - 1) / (2 N ln 2) bits, so a
    column whose ties leave bins empty (a rectified filter that is mostly 0) starts lower than one that fills
    all of them; on the demo's distilled student every pooled filter filled all 8 bins, where the bias is the
    same for every filter and the ranking fair.
    """
    x = np.asarray(x, np.float64)
    n, c = x.shape
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    k = int(y.max()) + 1 if n else 1
    cuts = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # (bins - 1, C)
    b = (x[None] > cuts[:, None, :]).sum(0)  # (N, C) bin of each response
    flat = (np.arange(c)[None, :] * bins + b) * k + y[:, None]
    p = np.bincount(flat.ravel(), minlength=c * bins * k).reshape(c, bins, k) / max(n, 1)
    px, py = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (px * py)), 0.0)
    return terms.sum((1, 2))


def label_columns(y: np.ndarray, kind: str, bins: int = BINS) -> list[np.ndarray]:
    """The discrete label(s) a filter is scored against: classes, binned regression targets, attributes."""
    y = np.asarray(y)
    if kind == "regression":
        cuts = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
        return [np.searchsorted(cuts, y, side="right")]
    if kind == "multilabel":
        return [y[:, j] > 0.5 for j in range(y.shape[1])]
    return [y.astype(np.int64)]


def rectified(dg, module) -> bool:
    """True when every consumer of module's output is a ReLU or ReLU6 (which cut its negative values)."""
    outs = dg.module2node[module].outputs
    return bool(outs) and all(type(getattr(o, "grad_fn", None)).__name__.startswith(("ReluBackward", "HardtanhBackward"))
                              for o in outs)


@torch.no_grad()
def filter_responses(model: nn.Module, modules, batches, max_images: int, rectified_modules=()):
    """Spatial means of each module's output over the batches' images (of relu(output) for the modules in
    rectified_modules), and their labels."""
    feats = {m: [] for m in modules}
    rectified_modules = set(rectified_modules)

    def hook(m, _inp, out):
        out = out.float()
        if m in rectified_modules:
            out = out.clamp_min(0)
        feats[m].append((out.flatten(2).mean(2) if out.ndim > 2 else out).cpu())

    handles = [m.register_forward_hook(hook) for m in modules]
    ys, n = [], 0
    try:
        model.eval()
        for x, y in batches:
            take = min(len(x), max_images - n)
            model(x[:take])
            ys.append(y[:take].cpu())
            n += take
            if n >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
    if not n:
        raise ValueError("no training images to score the filters on")
    return {m: torch.cat(v).numpy() for m, v in feats.items()}, torch.cat(ys).numpy()


def score_groups(model, example, batches, kind: str, max_images: int = 2000):
    """(dependency graph, groups, one score array per group): how much each group's filters tell about the label."""
    dg, groups = dependency_graph(model, example)
    members = [_members(dg, g) for g in groups]
    modules = list({m: None for ms in members for m, _, _ in ms})
    resp, y = filter_responses(model, modules, batches, max_images, [m for m in modules if rectified(dg, m)])
    cols = label_columns(y, kind)
    mi = {m: np.mean([mutual_information(resp[m], c) for c in cols], 0) for m in modules}
    scores = []
    for g, ms in zip(groups, members):
        s = np.full(len(g[0].idxs), -np.inf)
        for m, local, root in ms:
            s[root] = np.maximum(s[root], mi[m][local])
        scores.append(s)
    return dg, groups, scores


# ------------------------------------------------------------------------------------------- prune
def keep_count(n: int, ratio: float) -> int:
    return max(1, int(round((1 - ratio) * n)))


def prune(model: nn.Module, dg, groups, scores, ratio: float) -> dict[str, list[int]]:
    """Remove, in place, the lowest-scoring (1 - keep) filters of every group; returns the output channels
    removed from each module (by module name), in the unpruned numbering."""
    names = {m: n for n, m in model.named_modules()}
    removed: dict[str, list[int]] = {}
    plans = []
    for g, s in zip(groups, scores):
        n = len(s)
        # stable order: equal scores keep the lower channel index
        drop = sorted(np.argsort(-s, kind="stable")[keep_count(n, ratio):].tolist())
        if drop:
            root = g[0].dep.target.module
            plans.append((root, g[0].dep.handler, drop))
    for root, handler, drop in plans:
        group = dg.get_pruning_group(root, handler, drop)
        for item in group:
            if _is_out(dg, item.dep) and item.dep.target.module in names:
                removed.setdefault(names[item.dep.target.module], []).extend(int(i) for i in item.idxs)
        group.prune()
    return {k: sorted(v) for k, v in removed.items()}


def shapes(model: nn.Module) -> dict[str, dict]:
    """Every convolution, batch norm, linear and PReLU layer's sizes: what apply_shapes needs."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _CONV):
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, _BN):
            out[name] = {"features": m.num_features}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.PReLU):
            out[name] = {"features": m.num_parameters}
    return out


def apply_shapes(model: nn.Module, sizes: dict[str, dict]) -> nn.Module:
    """Resize the layers of an unpruned network to `sizes` (from shapes()), ready for load_state_dict."""
    mods = dict(model.named_modules())
    for name, s in sizes.items():
        m = mods.get(name)
        if m is None:
            raise ValueError(f"pruned layer {name!r} is not in {type(model).__name__}: another architecture")

        def new(attr, *shape):
            old = getattr(m, attr)
            if old is None:
                return
            t = torch.empty(*shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(m, attr, nn.Parameter(t, requires_grad=old.requires_grad))
            else:
                setattr(m, attr, t)

        if isinstance(m, _CONV):
            m.in_channels, m.out_channels, m.groups = s["in"], s["out"], s["groups"]
            new("weight", s["out"], s["in"] // s["groups"], *m.kernel_size)
            new("bias", s["out"])
        elif isinstance(m, _BN):
            m.num_features = s["features"]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                new(attr, s["features"])
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = s["in"], s["out"]
            new("weight", s["out"], s["in"])
            new("bias", s["out"])
        elif isinstance(m, nn.PReLU):
            m.num_parameters = s["features"]
            new("weight", s["features"])
    return model


def zero_removed(model: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    """The unpruned network with the removed filters silenced (weights, biases and batch-norm affine set to 0).

    Its removed channels are exactly 0 wherever ReLU-like activations follow, so it computes what the
    pruned network computes: the reference the tests compare against.
    """
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, idxs in removed.items():
            m = mods[name]
            for attr in ("weight", "bias"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor) and not isinstance(m, nn.PReLU):
                    t[idxs] = 0
    return model


# ------------------------------------------------------------------------------------ measurements
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, example) -> int:
    """Floating-point operations of one forward pass on `example` (a multiply-add counts 2), by PyTorch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def latency_ms(model: nn.Module, example, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time (ms) of a forward pass on `example`, on the example's device."""
    model.eval()
    cuda = example.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(example.device)
            t = time.perf_counter()
            model(example)
            if cuda:
                torch.cuda.synchronize(example.device)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def example_pixels(batch: int, size: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Random 0..255 pixels from a private generator: measuring must not move the training's random stream."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).to(device=device, dtype=dtype)


def export_onnx(model: nn.Module, path: Path, example) -> Path:
    """ONNX of the whole pruned model (input 'pixels', dynamic batch), written atomically."""
    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        # The TorchScript-based exporter needs no onnxscript and handles plain CNNs exactly.
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["pixels"], output_names=["out"],
                          dynamic_axes={"pixels": {0: "n"}, "out": {0: "n"}}, opset_version=17)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))
    return Path(path)


def measure(model: nn.Module, make_input, device, repeats: int = 10) -> dict:
    """Parameters, MFLOPs, and median latency at batch 1 and 64 on the CPU (and on `device` when a GPU).

    The CPU runs one thread: a multi-threaded timing on a machine that other jobs share measures the
    other jobs (here 2 threads made the same batch 10x slower and 5x more variable than 1 thread).
    """
    import copy

    cpu = copy.deepcopy(model).cpu().eval()
    out = {"params": count_params(cpu), "mflops": flops(cpu, make_input(1, "cpu")) / 1e6, "cpu_threads": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in (1, 64):
            out[f"cpu_ms_b{b}"] = latency_ms(cpu, make_input(b, "cpu"), repeats if b == 1 else max(3, repeats // 2))
    finally:
        torch.set_num_threads(threads)
    gpu = copy.deepcopy(model).to(device).eval() if torch.device(device).type == "cuda" else None
    for b in (1, 64):
        out[f"gpu_ms_b{b}"] = latency_ms(gpu, make_input(b, device), repeats * 5) if gpu is not None else None
    return out


# ----------------------------------------------------------------------------------------- choice
def choose(entries: dict, higher_is_better: bool, keep: float) -> tuple[float, str]:
    """(ratio, why): the most pruned ratio whose validation score keeps `keep` of the unpruned one's (ratio 0).

    entries: {ratio: {"val": score or None}}. For a lower-is-better metric, keeping 99.5 % means at most
    1 / 0.995 of the error. Without a validation split nothing is chosen on test: the most pruned ratio
    is reported.
    """
    base = entries.get(0.0, {}).get("val")
    if base is None:
        return max(entries), ("no validation score (no validation split, or none of its faces found): the most "
                              "pruned ratio is shown (nothing is chosen on test)")
    if higher_is_better and base <= 0:  # every ratio "keeps 99.5 %" of nothing: the most pruned one won
        return 0.0, "the unpruned validation score is 0, of which no share can be kept: ratio 0 is kept"
    ok = [r for r, e in entries.items() if e.get("val") is not None
          and (e["val"] >= keep * base if higher_is_better else e["val"] <= base / keep)]
    pick = max(ok) if ok else 0.0
    return pick, f"the most pruned ratio keeping {keep:.1%} of the unpruned validation score"


def rule_line(picks: list[tuple[str, str]]) -> str:
    """etl.md's line on the choice, from each split's (ratio, rule) of choose: with several splits (leave-one-
    out), each one's own pick, not the first split's alone."""
    rules = list(dict.fromkeys(r for _, r in picks))
    if len(picks) == 1:
        return f"{rules[0]}: {picks[0][0]}"
    if len(rules) == 1:
        return f"{rules[0]}, on each split's own validation faces: {', '.join(p for p, _ in picks)}"
    return "; ".join(f"split {i}: {r}: {p}" for i, (p, r) in enumerate(picks))  # some without a validation score


# ------------------------------------------------------------------------------------------ report
def report_table(rows: list[dict], metric: str, higher_is_better: bool,
                 base_name: str = "student") -> tuple[list, list]:
    """Headers and rows of the size / speed / accuracy table; `rows` hold ratio, measures, value (test) and val
    (the validation score the choice read, None: not measured). Ratio 0 is the base fine-tuned whole: finetune
    for the student, P-CNN's for a teacher base."""
    zero = "finetune (0)" if base_name == "student" else f"pcnn {base_name} (0)"
    base = next((r for r in rows if r["ratio"] == 0.0), None)
    # the backbone's apart: only its filters are cut, and at high ratios the head's MLP is most of "params"
    headers = ["ratio", "params", "params kept", "backbone params", "MFLOPs", "file MB", "CPU ms b1", "CPU ms b64",
               "GPU ms b1", "GPU ms b64", f"{metric} (val)", f"{metric} (test)", "test kept"]
    table = []
    for r in sorted(rows, key=lambda r: r["ratio"]):
        kept = None
        if base and base["value"]:
            kept = r["value"] / base["value"] if higher_is_better else (base["value"] / r["value"] if r["value"] else None)

        def fmt(v, f="{:.1f}"):
            return "not measured" if v is None else f.format(v)

        table.append([(zero if r["ratio"] == 0 else f"{r['ratio']:g}") + (" *" if r.get("chosen") else ""),
                      f"{r['params']:,}", fmt(r["params"] / base["params"] if base else None, "{:.1%}"),
                      fmt(r.get("backbone_params"), "{:,}"), fmt(r["mflops"], "{:.2f}"), fmt(r["file_mb"], "{:.3f}"),
                      fmt(r["cpu_ms_b1"], "{:.2f}"),
                      fmt(r["cpu_ms_b64"]), fmt(r["gpu_ms_b1"], "{:.2f}"), fmt(r["gpu_ms_b64"], "{:.2f}"),
                      fmt(r.get("val"), "{:.4f}"), f"{r['value']:.4f}", "n/a" if kept is None else f"{kept:.1%}"])
    return headers, table


def plot(tasks_rows: dict[str, list[dict]], path: Path, higher: dict[str, bool]) -> Path:
    """Metric kept (vs ratio 0) against the share of parameters and of CPU batch-1 time removed, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for task, rows in tasks_rows.items():
        rows = sorted(rows, key=lambda r: r["ratio"])
        base = rows[0]
        kept = [(r["value"] / base["value"] if higher[task] else base["value"] / r["value"])
                if r["value"] and base["value"] else float("nan") for r in rows]
        for ax, key in zip(axes, ("params", "cpu_ms_b1")):
            x = [100 * (1 - r[key] / base[key]) for r in rows]
            ax.plot(x, [100 * k for k in kept], "o-", label=task)
            for xi, ki, r in zip(x, kept, rows):
                ax.annotate(f"{r['ratio']:g}", (xi, 100 * ki), fontsize=7, xytext=(2, 2), textcoords="offset points")
    axes[0].set_xlabel("parameters removed (%)")
    axes[1].set_xlabel("CPU batch-1 latency removed (%)")
    axes[0].set_ylabel("task score kept vs ratio 0 (%; for an error, ratio 0's / this one's)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ETL: task score kept vs size / time removed (labels: pruning ratio)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- ETL in transfer.py
def etl_prune(backbone: nn.Module, example, batches, kind: str, ratio: float, max_images: int = 2000) -> dict:
    """Score `backbone`'s filters on the (training) batches and prune it in place at `ratio`; ratio 0 is a no-op."""
    if not ratio:
        return {}
    if not 0 < ratio < 1:
        raise ValueError(f"a pruning ratio is a fraction of filters removed, in [0, 1): got {ratio}")
    import copy

    def cannot(e):
        # e.g. teachers ported from ONNX keep per-channel constants outside any layer the tracer knows
        return CannotPrune(f"ETL cannot prune this {type(backbone).__name__} ({type(e).__name__}: {e}); networks "
                            f"made of standard PyTorch layers (the student, onet, mobilenet_v2, torchvision models) "
                            f"can be pruned")

    try:
        dg, groups, scores = score_groups(backbone, example, batches, kind, max_images)
    except IndexError as e:  # a channel index past its group's width: the graph misread the network (age's port)
        raise cannot(e) from e
    reference = copy.deepcopy(backbone)
    before = count_params(backbone)
    try:
        removed = prune(backbone, dg, groups, scores, ratio)
        # float32 convolutions for the check below: with cuDNN's TF32 the two networks' different channel
        # counts can pick algorithms that differ by more than its tolerance, a false alarm on a GPU
        with torch.no_grad(), no_tf32():
            a = backbone.eval()(example)
    except (RuntimeError, IndexError, ValueError) as e:
        raise cannot(e) from e
    # Nothing cut is no pruned model: reported as one, it would pass the unpruned network off as the ratio's
    # (a TFLite port's convolutions are bare tensors, which the dependency graph does not see as layers).
    if count_params(backbone) == before:
        raise CannotPrune(f"pruning {type(backbone).__name__} at ratio {ratio:g} removed no parameter: it has no "
                           f"convolution layer the dependency graph can cut, or every layer is too narrow for "
                           f"this ratio to remove one of its filters (each keeps max(1, round((1 - ratio) * n)))")
    # A network the tracer misreads (channels reordered by an op it does not know) would be cut wrongly
    # without an error: check the pruned network against the silenced one before anything trains it.
    with torch.no_grad(), no_tf32():
        b = zero_removed(reference, removed).eval()(example)
    if a.shape != b.shape:  # the output layer itself was pruned (mobilenet_v2's last 1x1 convolution)
        b = b[:, _kept_outputs(removed, a.shape[1], b.shape[1])]
    if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3 * float(b.abs().max())):
        raise CannotPrune(f"pruning {type(backbone).__name__} changed what its kept filters compute "
                          f"(max difference {float((a - b).abs().max()):.3g}): its graph has a channel "
                          f"reordering the dependency tracer does not follow")
    return removed


def _kept_outputs(removed: dict[str, list[int]], pruned: int, full: int) -> list[int]:
    """The output channels a pruned network kept, when its last layer was cut from `full` to `pruned`: the
    complement of what the layers of that width lost (a layer and its batch norm lose the same channels)."""
    cuts = {tuple(idx) for idx in removed.values() if idx and len(idx) == full - pruned and max(idx) < full}
    if len(cuts) != 1:
        raise CannotPrune(f"the pruned network's output has {pruned} of {full} channels and no single layer's cut "
                          f"explains it: the pruned network cannot be checked against the unpruned one")
    return sorted(set(range(full)) - set(next(iter(cuts))))


def save_pruned(path: Path, backbone: nn.Module, head: nn.Module | None, config: dict) -> Path:
    """safetensors of a pruned network (+ its task head as head.*) with every layer's shape in the metadata.

    A student is written as save_student writes it (tensors student.*), so load_student, `distill.py
    embed` and transfer.py's --student read it; a teacher (any object with `teacher` and `net`) as
    teacher.* with its registry name, for load_pruned_teacher.
    """
    from safetensors.torch import save

    from common.student import Student, save_student

    head_t = {f"head.{k}": v.detach().cpu().contiguous() for k, v in (head.state_dict() if head else {}).items()}
    if isinstance(backbone, Student):
        save_student(backbone, path, {**config, "pruned": shapes(backbone)}, head_t)
        return Path(path)
    net = backbone.net
    state = {f"teacher.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"config": json.dumps({**config, "teacher": backbone.teacher.name, "pruned": shapes(net)})}
    atomic_write(Path(path), lambda f: f.write(save({**state, **head_t}, metadata=meta)))
    return Path(path)


def load_pruned_teacher(path, device="cpu"):
    """(teacher whose module is the pruned one, config) from a file save_pruned wrote for a teacher."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from common.teachers import build_teachers

    with safe_open(str(path), "pt") as f:
        cfg = json.loads((f.metadata() or {}).get("config", "{}"))
    if "teacher" not in cfg:
        raise ValueError(f"{path} is not a pruned teacher (no teacher name in its metadata)")
    teacher = build_teachers([f"{cfg['teacher']}@torch"], device)[0]  # a port as its PyTorch module
    apply_shapes(teacher.module, cfg["pruned"])
    tensors = load_file(str(path))
    teacher.module.load_state_dict({k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")})
    teacher.module.eval().to(device)
    teacher.dim = int(teacher(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])
    return teacher, cfg


class _Preprocessed(nn.Module):
    """A teacher's network and pooling from its preprocessed input on: what an ONNX export can trace."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.net = teacher, teacher.module

    def forward(self, x):
        return self.teacher.pool(self.teacher.forward(x))


def finish(model: nn.Sequential, out_dir: Path, make_input, device, config: dict, log=None) -> dict:
    """Save (safetensors), export (ONNX) and measure one fine-tuned ETL model, once per output folder.

    Returns the stats written to out_dir/stats.json; a second call (the next split of a leave-one-out
    protocol) finds them and keeps the first split's model.
    """
    out_dir = Path(out_dir)
    if (out_dir / "stats.json").exists():
        return json.loads((out_dir / "stats.json").read_text())
    model.eval()
    path = save_pruned(out_dir / "model.safetensors", model[0], model[1], config)
    stats = {"ratio": config["etl"]["ratio"], "model": path.name, "file_mb": path.stat().st_size / 1e6,
             "backbone_params": count_params(model[0])}
    try:
        net, example = model.cpu(), make_input(2, "cpu")
        if hasattr(model[0], "teacher"):  # the crop box and resize stay outside: the ONNX takes what they give
            teacher = model[0].teacher
            net, example = nn.Sequential(_Preprocessed(teacher), model[1]), teacher.preprocess(example.to(torch.uint8))
            stats["onnx_input"] = f"{teacher.name}'s preprocessed input {tuple(example.shape[1:])}"
        onnx = export_onnx(net, out_dir / "model.onnx", example)
        stats.update(onnx=onnx.name, onnx_mb=onnx.stat().st_size / 1e6)
    except Exception as e:  # an exotic teacher layer the exporter lacks: the table says so
        stats.update(onnx=None, onnx_error=f"{type(e).__name__}: {e}")
        if log:
            log.info(f"ETL {out_dir.name}: no ONNX export ({stats['onnx_error']})")
    model.to(device)
    stats.update(measure(model, make_input, device))
    write_json(out_dir / "stats.json", stats)
    return stats


def etl_report(results: list[dict], run: Path, log=None, higher: dict | None = None, base: str = "student") -> str:
    """run/etl.md, etl.json and etl.png: every ratio's size, speed and metric beside ratio 0 (the base, `student`
    or a teacher's name, fine-tuned unpruned)."""
    from tabulate import tabulate

    parts, all_rows = [], {}
    for r in results:
        res = r["results"].get("etl")
        if not res or "chosen" not in res:  # not run, or not available for this task
            continue
        rows = []
        chosen = res.get("chosen_per_split") or [res["chosen"]]  # each leave-one-out split picks its own ratio
        for name, s in (res.get("search") or {res["chosen"]: res}).items():
            stats_path = Path(run) / "etl" / r["task"] / f"r{name}" / "stats.json"
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
            rows.append({**stats, "ratio": float(name), "value": s["value"], "val": s.get("val"),
                         "chosen": name in chosen})
        all_rows[r["task"]] = rows
        headers, table = report_table(rows, r["metric"], higher[r["task"]], base)
        parts.append(f"### {r['task']} ({r['metric']}; {r['protocol']})\n\n"
                     + tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)
                     + f"\n\n* chosen: {res.get('rule', '')}\n")
    text = "\n".join(parts)
    if not all_rows:  # etl came with --method all and no task could take it: no empty files
        return text
    write_text(Path(run) / "etl.md", text)
    write_json(Path(run) / "etl.json", all_rows)
    plot(all_rows, Path(run) / "etl.png", higher)
    if log:
        log.info("\n" + text)
    return text
