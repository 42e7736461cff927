"""Tests of kernels/: Triton kernels (CUDA if present, else Triton's CPU interpreter) and the PyTorch
fallback, against float64 references."""
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also when run as plain `pytest`
import kernels  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Without a GPU the kernels run in Triton's interpreter, which must be chosen as triton is first imported:
# tests/conftest.py does that before any test module is collected.

HAS_TRITON = kernels._load_triton() is not None
if not HAS_TRITON:
    _skip_reason = f"{kernels._triton_error}: only the PyTorch fallback is tested"
elif DEV.type == "cpu" and not kernels._triton_impl.INTERPRETER_BUILT:
    _skip_reason = "triton was imported without TRITON_INTERPRET=1 (tests/conftest.py imports it first)"
else:
    _skip_reason = ""
needs_triton = pytest.mark.skipif(bool(_skip_reason), reason=_skip_reason)
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
# Rounding of the stored result (half an ulp) plus float32 arithmetic, relative to the result's scale.
RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5, torch.float64: 2e-5}
EPS = 1e-8


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if DEV.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, gen, layout="contiguous"):
    """A float tensor on DEV, contiguous, transposed (column-major) or a strided view."""
    rows, cols = shape
    if layout == "transposed":
        return torch.randn(cols, rows, generator=gen).to(DEV, dtype).t()
    if layout == "strided":
        return torch.randn(rows * 2, cols * 3, generator=gen).to(DEV, dtype)[::2, 1::3]
    return torch.randn(rows, cols, generator=gen).to(DEV, dtype)


def _assert_close(actual, ref, rtol, scale=None):
    """|actual - ref| <= rtol * scale elementwise; scale defaults to |ref| + 1 (the results are O(1))."""
    actual = actual.double().cpu()
    ref = ref.double().cpu()
    assert actual.shape == ref.shape
    assert torch.isfinite(actual).all(), "non-finite values (unwritten poison?)"
    scale = ref.abs() + 1 if scale is None else scale.cpu()
    err = ((actual - ref).abs() / scale).max().item() if ref.numel() else 0.0
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


# ----------------------------------------------------------------------------------------------------
# fuse_features

def _fuse_case(widths, batch, seed, dtypes=(torch.float32, torch.float16, torch.bfloat16),
               layouts=("contiguous", "transposed", "strided")):
    gen = _gen(seed)
    feats = [_randn((batch, w), dtypes[k % len(dtypes)], gen, layouts[k % len(layouts)])
             for k, w in enumerate(widths)]
    total = sum(widths)
    mean = torch.randn(total, generator=gen).to(DEV)
    std = (torch.rand(total, generator=gen) * 1.5 + 0.5).to(DEV)
    return feats, mean, std


def _fuse_ref(feats, mean, std):
    return (torch.cat([x.double() for x in feats], 1) - mean.double()) / std.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,widths", [(1, [5]), (1, [3, 1, 17]), (37, [3, 130, 1, 17, 64]),
                                          (19, [16, 8, 4, 33])])
def test_fuse_matches_reference(backend, out_dtype, batch, widths):
    feats, mean, std = _fuse_case(widths, batch, seed=batch * 100 + len(widths))
    out = torch.full((batch, sum(widths)), float("nan"), dtype=out_dtype, device=DEV)
    got = kernels.fuse_features(feats, mean, std, out=out, backend=backend)
    assert got is out
    _assert_close(out, _fuse_ref(feats, mean, std), RTOL[out_dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_allocates_out_dtype(backend):
    feats, mean, std = _fuse_case([7, 9], 5, seed=1)
    for dtype in (torch.float16, torch.float32):
        out = kernels.fuse_features(feats, mean, std, out_dtype=dtype, backend=backend)
        # device('cuda') and device('cuda:0') are one device but compare unequal: compare type and index
        assert out.dtype == dtype and out.shape == (5, 16) and out.device.type == DEV.type
        assert out.device == feats[0].device
        _assert_close(out, _fuse_ref(feats, mean, std), RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_into_slice_of_bigger_buffer(backend):
    feats, mean, std = _fuse_case([5, 11, 2], 6, seed=2)
    buf = torch.full((20, 30), 7.0, dtype=torch.float16, device=DEV)
    view = buf[9:15, 4:22]  # a row range and a column range: strides (30, 1), offset storage
    kernels.fuse_features(feats, mean, std, out=view, backend=backend)
    _assert_close(view, _fuse_ref(feats, mean, std), RTOL[torch.float16])
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[9:15, 4:22] = False
    assert (buf[untouched] == 7.0).all()


@needs_triton
def test_fuse_many_teachers_one_launch(monkeypatch):
    widths = [1 + (5 * k) % 23 for k in range(17)] + [0]  # 17 teachers plus an empty one
    feats, mean, std = _fuse_case(widths, 9, seed=3)
    kernel = kernels._triton_impl._fuse_kernel
    calls = []
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    out = torch.full((9, sum(widths)), float("nan"), dtype=torch.float32, device=DEV)
    kernels.fuse_features(feats, mean, std, out=out, backend="triton")
    assert len(calls) == 1
    _assert_close(out, _fuse_ref(feats, mean, std), RTOL[torch.float32])


@needs_triton
def test_fuse_small_blocks_span_teachers():
    # Several column blocks per teacher and a ragged last block, with the interpreter-friendly sizes.
    feats, mean, std = _fuse_case([13, 4, 9], 3, seed=4)
    out = torch.full((3, 26), float("nan"), dtype=torch.float32, device=DEV)
    kernels._triton_impl.fuse_features(feats, mean, std, out, block_n=4)
    _assert_close(out, _fuse_ref(feats, mean, std), RTOL[torch.float32])


def test_fuse_validates_shapes():
    feats, mean, std = _fuse_case([4, 4], 3, seed=5)
    with pytest.raises(ValueError):
        kernels.fuse_features(feats, mean[:7], std)
    with pytest.raises(ValueError):
        kernels.fuse_features([feats[0], feats[1][:2]], mean, std)
    with pytest.raises(ValueError):
        kernels.fuse_features(feats, mean, std, out=torch.empty(3, 9, device=DEV))


# ----------------------------------------------------------------------------------------------------
# cosine_distill_loss

def _loss_case(batch, dim, dtype, seed, s_layout="contiguous", t_layout="contiguous", zero_rows=True):
    gen = _gen(seed)
    s = _randn((batch, dim), dtype, gen, s_layout)
    t = _randn((batch, dim), dtype, gen, t_layout)
    if zero_rows and batch >= 3:
        s[0] = 0  # zero student row
        t[1] = 0  # zero target row
        s[2] = 0  # both zero
        t[2] = 0
    return s, t


def _loss_ref(s, t, eps=EPS):
    """float64 per-row loss, d loss_i / d s_i (zero for |s_i| <= eps) and the per-element error scale."""
    s, t = s.double().cpu(), t.double().cpu()
    ns, nt = s.norm(dim=1), t.norm(dim=1)
    ns_c, nt_c = ns.clamp_min(eps), nt.clamp_min(eps)
    cos = (s * t).sum(1) / (ns_c * nt_c)
    live = (ns > eps).double()[:, None]
    term_s = live * (cos / ns_c**2)[:, None] * s
    term_t = live * (-1 / (ns_c * nt_c))[:, None] * t
    # The kernel's error is relative to the two terms it adds, not to their (possibly cancelling) sum.
    scale = term_s.abs() + term_t.abs() + 1e-3 * (term_s + term_t).abs().max()
    return 1 - cos, term_s + term_t, scale


def _upstream(reduction, batch, gen):
    if reduction == "none":
        return torch.randn(batch, generator=gen, dtype=torch.float64)
    return torch.tensor(1.7, dtype=torch.float64)


def _check_loss(backend, batch, dim, dtype, reduction, s_layout, t_layout, seed):
    s, t = _loss_case(batch, dim, dtype, seed, s_layout, t_layout)
    s.requires_grad_(True)
    loss = kernels.cosine_distill_loss(s, t, reduction=reduction, backend=backend)
    up = _upstream(reduction, batch, _gen(seed + 1))
    (grad,) = torch.autograd.grad(loss, s, up.to(loss.dtype).to(DEV))

    ref_rows, ref_grad, scale = _loss_ref(s.detach(), t)
    ref = {"mean": ref_rows.mean(), "sum": ref_rows.sum(), "none": ref_rows}[reduction]
    row_up = up.expand(batch) / (batch if reduction == "mean" else 1)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    _assert_close(loss, ref, 1e-5)
    assert grad.dtype == dtype and grad.shape == s.shape
    # Floor at the smallest normal number: below it float16 keeps absolute, not relative, precision.
    floor = torch.finfo(dtype).tiny
    _assert_close(grad, row_up[:, None] * ref_grad, RTOL[dtype], scale * row_up.abs()[:, None] + floor)
    if batch >= 3:
        assert (grad[0] == 0).all() and (grad[2] == 0).all()  # zero student rows: zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch,dim,s_layout,t_layout", [
    (1, 5, "contiguous", "contiguous"),
    (7, 200, "transposed", "strided"),
    (13, 67, "strided", "contiguous"),
])
def test_loss_matches_reference(backend, dtype, reduction, batch, dim, s_layout, t_layout):
    _check_loss(backend, batch, dim, dtype, reduction, s_layout, t_layout, seed=batch * 1000 + dim)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_kernels_write_every_element(dtype):
    # Small blocks force the column loop (ragged last block); outputs start as NaN poison.
    batch, dim = 6, 45
    s, t = _loss_case(batch, dim, dtype, seed=6, s_layout="strided")
    ti = kernels._triton_impl
    loss = torch.full((batch,), float("nan"), device=DEV)
    stats = torch.full((3, batch), float("nan"), device=DEV)
    ti.cosine_forward(s, t, EPS, loss=loss, stats=stats, block_d=16)
    ref_rows, ref_grad, scale = _loss_ref(s, t)
    _assert_close(loss, ref_rows, 1e-5)
    s64, t64 = s.double(), t.double()
    ref_stats = torch.stack([s64.norm(dim=1), t64.norm(dim=1), (s64 * t64).sum(1)])
    _assert_close(stats, ref_stats, 1e-5)
    up = torch.randn(batch, generator=_gen(7), dtype=torch.float64)
    grad = torch.full((batch, dim), float("nan"), dtype=dtype, device=DEV)
    ti.cosine_backward(s, t, stats, up.float().to(DEV), 1.0, EPS, grad=grad, block_d=16)
    floor = torch.finfo(dtype).tiny
    _assert_close(grad, up[:, None] * ref_grad, RTOL[dtype], scale * up.abs()[:, None] + floor)


@needs_triton
def test_triton_matches_fallback_on_mixed_dtypes():
    gen = _gen(8)
    s = _randn((5, 33), torch.bfloat16, gen).requires_grad_(True)
    t = _randn((5, 33), torch.float32, gen, "transposed")
    out = {}
    for backend in ("triton", "torch"):
        loss = kernels.cosine_distill_loss(s, t, backend=backend)
        out[backend] = (loss, *torch.autograd.grad(loss, s))
    _assert_close(out["triton"][0], out["torch"][0], 1e-6)
    _assert_close(out["triton"][1], out["torch"][1], RTOL[torch.bfloat16], out["torch"][1].abs() + 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_saves_inputs_and_row_stats_only(backend):
    s, t = _loss_case(5, 12, torch.float16, seed=13, s_layout="transposed")
    s.requires_grad_(True)
    saved = []  # what autograd keeps for the backward, as it is packed (reading grad_fn.saved_tensors of a
    # dropped output raised "backward through the graph a second time" on an H100 with torch 2.11)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = kernels.cosine_distill_loss(s, t, backend=backend)
    assert loss.requires_grad and len(saved) == 3
    assert saved[0].data_ptr() == s.data_ptr() and saved[1].data_ptr() == t.data_ptr()  # no copies
    assert saved[2].shape == (3, 5) and saved[2].dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fallback_gradcheck(reduction):
    gen = _gen(9)
    s = torch.randn(4, 6, generator=gen, dtype=torch.float64, device="cpu").requires_grad_(True)
    t = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    t[1] = 0  # zero target rows are smooth in s (loss 1, gradient 0)
    fn = lambda x: kernels.cosine_distill_loss(x, t, reduction=reduction, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


def test_fallback_matches_torch_cosine_similarity():
    gen = _gen(10)
    s = torch.randn(8, 16, generator=gen, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    ours = kernels.cosine_distill_loss(s, t, reduction="none", backend="torch")
    theirs = 1 - torch.nn.functional.cosine_similarity(s, t, dim=1, eps=EPS)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    g1, = torch.autograd.grad(ours.sum(), s)
    g2, = torch.autograd.grad(theirs.sum(), s)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_clamps_each_norm_not_their_product(backend):
    """Rows of norm 1e-5: each above eps, their product (1e-10) below it. Clamping the product would give
    1 - 0.01 cos; the random O(1) and all-zero rows of the other tests cannot tell the two apart."""
    gen = _gen(14)
    s = _randn((4, 24), torch.float32, gen)
    t = _randn((4, 24), torch.float32, gen)
    s, t = s / s.norm(dim=1, keepdim=True) * 1e-5, t / t.norm(dim=1, keepdim=True) * 1e-5
    s.requires_grad_(True)
    loss = kernels.cosine_distill_loss(s, t, reduction="none", backend=backend)
    theirs = 1 - torch.nn.functional.cosine_similarity(s.double(), t.double(), dim=1, eps=EPS)
    _assert_close(loss, theirs, 1e-5)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    ref_rows, ref_grad, scale = _loss_ref(s.detach(), t)
    _assert_close(grad, ref_grad, 1e-4, scale)


@needs_triton
def test_forced_triton_backward_never_falls_back(monkeypatch, fresh_failures):
    """An explicit backend="triton" runs its backward in Triton even after an "auto" call gave up on it."""
    kernels._failed_ops["cosine_distill_loss"] = "an earlier failure"
    calls = []
    real = kernels._triton_impl.cosine_backward
    monkeypatch.setattr(kernels._triton_impl, "cosine_backward", lambda *a: calls.append(1) or real(*a))
    s, t = _loss_case(5, 16, torch.float32, seed=15)
    s.requires_grad_(True)
    torch.autograd.grad(kernels.cosine_distill_loss(s, t, backend="triton"), s)
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_is_float32_and_outside_autograd_for_any_input(backend):
    gen = _gen(16)
    feats = [torch.randn(3, w, generator=gen, dtype=torch.float64).to(DEV).requires_grad_(True) for w in (5, 2)]
    mean, std = torch.zeros(7, device=DEV), torch.ones(7, device=DEV) * 3
    out = kernels.fuse_features(feats, mean, std, out_dtype=torch.float64, backend=backend)
    assert not out.requires_grad
    # float32 arithmetic: the float64 inputs' low bits are gone, as in the kernel
    ref32 = torch.cat([f.detach().float() for f in feats], 1).double() / 3
    ref64 = torch.cat([f.detach() for f in feats], 1) / 3
    assert torch.allclose(out, ref32, rtol=1e-6, atol=0) and (out - ref64).abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_target_requiring_grad_raises(backend):
    s, t = _loss_case(3, 4, torch.float32, seed=11, zero_rows=False)
    t.requires_grad_(True)
    with pytest.raises(ValueError, match="detach"):
        kernels.cosine_distill_loss(s, t, backend=backend)
    with torch.no_grad():
        kernels.cosine_distill_loss(s, t, backend=backend)  # no gradient asked for: fine
    kernels.cosine_distill_loss(s, t.detach(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_loss_keeps_float32_inside_autocast(backend, amp):
    """A caller inside autocast gets the float32 loss and gradient: in half precision the dot product of
    rows of norm ~450 overflows (the fallback once gave -inf, and an inf gradient, for a loss of 0)."""
    s = (torch.randn(2, 512, generator=_gen(21)) * 20).to(DEV).requires_grad_(True)
    t = s.detach().clone()
    with torch.autocast(DEV.type, dtype=amp):
        loss = kernels.cosine_distill_loss(s, t, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and torch.isfinite(s.grad).all()
    assert loss.abs().max() < 1e-5, loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_takes_float8_features(backend):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    x = torch.randn(4, 3, generator=_gen(22)).to(DEV, torch.float8_e4m3fn)
    mean, std = torch.zeros(3, device=DEV), torch.full((3,), 2.0, device=DEV)
    out = kernels.fuse_features([x], mean, std, out_dtype=torch.float32, backend=backend)
    _assert_close(out, x.double() / 2, RTOL[torch.float32])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, at the overflow on purpose
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_norm_past_float32s_range_is_nan_not_a_loss_of_one(backend):
    """A diverged student row of norm past float32's range made |s| inf: cos read 0, a loss of exactly 1 and a
    zero gradient, which no NaN check saw. Rows of large but finite norm keep their exact loss."""
    gen = _gen(31)
    base = _randn((3, 536), torch.float32, gen)
    t = base + 0.3 * _randn((3, 536), torch.float32, gen)
    s = (base * torch.tensor([[1e17], [1e18], [1.0]], device=DEV)).requires_grad_(True)
    loss = kernels.cosine_distill_loss(s, t, reduction="none", backend=backend)
    theirs = 1 - torch.nn.functional.cosine_similarity(s.double(), t.double(), dim=1)
    assert torch.isnan(loss[1]) and torch.allclose(loss[[0, 2]].double(), theirs[[0, 2]], atol=1e-5)
    (grad,) = torch.autograd.grad(loss.nansum(), s)
    assert grad[1].isnan().all() and grad[[0, 2]].isfinite().all()


@pytest.mark.skipif(DEV.type != "cuda" or bool(_skip_reason), reason="Triton's CPU interpreter stores bf16 rounded "
                    "toward zero (1 ulp off half the time), within RTOL: the rounding is checked on a GPU")
def test_fuse_rounds_bf16_to_nearest_on_the_gpu():
    x = torch.randn(64, 100, generator=_gen(23)).to(DEV)
    mean, std = torch.zeros(100, device=DEV), torch.full((100,), 3.0, device=DEV)
    out = kernels.fuse_features([x], mean, std, out_dtype=torch.bfloat16, backend="triton")
    assert (out == (x / 3).to(torch.bfloat16)).float().mean() > 0.99


def test_eps_of_another_number_type_keeps_the_kernel(fresh_failures):
    """An eps given as a tensor or numpy number is the same eps: not a kernel failure that sends every
    later call of the process to the fallback; what is not a number is a clear error."""
    import numpy as np

    s, t = _loss_case(3, 4, torch.float32, seed=13, zero_rows=False)
    want = kernels.cosine_distill_loss(s, t, eps=1e-8)
    for eps in (torch.tensor(1e-8), np.float32(1e-8)):
        _assert_close(kernels.cosine_distill_loss(s, t, eps=eps), want, RTOL[torch.float32])
    assert kernels._failed_ops == {}
    with pytest.raises(ValueError, match="eps must be a number"):
        kernels.cosine_distill_loss(s, t, eps="small")


def test_loss_validates_arguments():
    s, t = _loss_case(3, 4, torch.float32, seed=12, zero_rows=False)
    with pytest.raises(ValueError):
        kernels.cosine_distill_loss(s, t, reduction="max")
    with pytest.raises(ValueError):
        kernels.cosine_distill_loss(s, t[:, :3])


# ----------------------------------------------------------------------------------------------------
# GPU compilation without a GPU

@pytest.mark.skipif(not HAS_TRITON, reason=f"{kernels._triton_error}")
def test_kernels_compile_for_hopper():
    # The interpreter never runs Triton's compiler, which rejects things the interpreter accepts (Triton
    # 3.6-3.8 crashed on alignment hints over one-row tiles). Compile (no launch) for sm_90, in a process
    # whose triton is built for the compiler, every plan CUDA launches for batches 1 to 65536, and check
    # that the wide tiles make 16-byte accesses.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    access = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    tiles = {name.split("[")[0]: set() for name in access}
    for name in access:
        tiles[name.split("[")[0]].add(int(name.rsplit("BLOCK_M=", 1)[1]))
    for kernel in ("_fuse_kernel", "_cos_fwd_kernel", "_cos_bwd_kernel"):
        assert 1 in tiles[kernel] and max(tiles[kernel]) > 1, (kernel, tiles[kernel])
    assert len([n for n in access if "transposed" in n]) == 18  # column-major students compile too
    wide_fuse = [v for k, v in access.items() if k.startswith("_fuse_kernel") and k.endswith("BLOCK_M=32")]
    assert wide_fuse and all("st.global.v4" in v for v in wide_fuse)
    for name, v in access.items():
        if name.startswith("_cos_") and "transposed" not in name:  # every loss row is 16-byte aligned, D=536 too
            assert "ld.global.v4" in v, (name, v)
        if name.startswith("_cos_bwd") and "transposed" not in name:
            assert "st.global.v4" in v, (name, v)


def test_every_cuda_tile_height_runs_right(monkeypatch):
    # The tile heights CUDA picks for small batches (one-row tiles first), run here in the interpreter
    # or on the GPU, against the float64 reference.
    ti = kernels._triton_impl if HAS_TRITON else None
    if ti is None or not (ti.INTERPRETER_BUILT or DEV.type == "cuda"):
        pytest.skip(_skip_reason or "no Triton")
    monkeypatch.setattr(ti, "_on_gpu", lambda device_type: True)
    ti.plan_fuse.cache_clear()
    ti.plan_loss.cache_clear()
    try:
        for batch in (1, 2, 5):
            feats, mean, std = _fuse_case([3, 130, 17], batch, seed=40 + batch)
            out = kernels.fuse_features(feats, mean, std, out_dtype=torch.float32, backend="triton")
            _assert_close(out, _fuse_ref(feats, mean, std), RTOL[torch.float32])
            assert ti.plan_fuse(batch, (3, 130, 17), tuple(x.stride() for x in feats), 1, 1, out.stride(),
                                "cuda").meta["BLOCK_M"] == 1
            _check_loss("triton", batch, 536, torch.bfloat16, "mean", "contiguous", "contiguous", seed=50 + batch)
    finally:
        ti.plan_fuse.cache_clear()
        ti.plan_loss.cache_clear()


@needs_triton
def test_launch_plan_is_computed_once():
    ti = kernels._triton_impl
    feats, mean, std = _fuse_case([7, 9], 5, seed=60)
    ti.plan_fuse.cache_clear()
    for _ in range(3):
        kernels.fuse_features(feats, mean, std, backend="triton")
    info = ti.plan_fuse.cache_info()
    assert info.misses == 1 and info.hits == 2


# ----------------------------------------------------------------------------------------------------
# "auto" survives a kernel that fails; old GPUs and precision

@pytest.fixture
def fresh_failures(monkeypatch):
    monkeypatch.setattr(kernels, "_failed_ops", {})
    monkeypatch.delenv("FACEKD_KERNELS", raising=False)


def _broken(calls):
    def fail(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")
    return fail


@needs_triton
def test_auto_falls_back_once_when_the_loss_kernel_fails(monkeypatch, fresh_failures):
    calls = []
    monkeypatch.setattr(kernels._triton_impl, "cosine_forward", _broken(calls))
    s, t = _loss_case(6, 40, torch.float32, seed=70)
    s.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"cosine_distill_loss.*triton \d") as said:
        loss = kernels.cosine_distill_loss(s, t)
    assert len(said) == 1 and kernels._triton_impl.VERSION in str(said[0].message)
    (grad,) = torch.autograd.grad(loss, s)
    ref = kernels.cosine_distill_loss(s, t, backend="torch")
    assert torch.allclose(loss, ref) and torch.isfinite(grad).all()
    # The rest of the process takes the fallback without trying the kernel again, and says nothing more.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.cosine_distill_loss(s, t)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="PassManager"):  # asked for by name, it is not hidden
        kernels.cosine_distill_loss(s, t, backend="triton")


@needs_triton
def test_auto_falls_back_when_only_the_backward_kernel_fails(monkeypatch, fresh_failures):
    calls = []
    monkeypatch.setattr(kernels._triton_impl, "cosine_backward", _broken(calls))
    s, t = _loss_case(5, 33, torch.float32, seed=71)
    s.requires_grad_(True)
    loss = kernels.cosine_distill_loss(s, t)
    with pytest.warns(RuntimeWarning, match="cosine_distill_loss"):
        (grad,) = torch.autograd.grad(loss, s)
    (ref,) = torch.autograd.grad(kernels.cosine_distill_loss(s, t, backend="torch"), s)
    _assert_close(grad, ref, 1e-5)
    assert len(calls) == 1 and kernels.resolve_backend("auto", [s, t], op="cosine_distill_loss") == "torch"


@needs_triton
def test_auto_falls_back_when_the_fuse_kernel_fails(monkeypatch, fresh_failures):
    calls = []
    monkeypatch.setattr(kernels._triton_impl, "fuse_features", _broken(calls))
    feats, mean, std = _fuse_case([4, 6], 3, seed=72)
    with pytest.warns(RuntimeWarning, match="fuse_features"):
        out = kernels.fuse_features(feats, mean, std, out_dtype=torch.float32)
    _assert_close(out, _fuse_ref(feats, mean, std), RTOL[torch.float32])
    kernels.fuse_features(feats, mean, std)
    assert len(calls) == 1
    monkeypatch.setenv("FACEKD_KERNELS", "triton")  # forced through the environment: raises too
    with pytest.raises(RuntimeError):
        kernels.fuse_features(feats, mean, std)


@pytest.mark.skipif(not HAS_TRITON, reason=f"{kernels._triton_error}")
def test_old_gpus_take_the_fallback_without_trying(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    assert "sm_60" in kernels._gpu_reason(gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert kernels._gpu_reason(gpu) is None


def test_amp_policy_follows_the_gpu_generation(monkeypatch):
    from common import precision

    cpu = torch.device("cpu")
    assert precision.amp_policy("auto", cpu) == (None, None)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert precision.amp_policy("auto", gpu) == (torch.bfloat16, None)
    assert precision.amp_policy("off", gpu) == (None, None)
    for old in ((6, 0), (7, 5)):  # P100, T4: no native bf16
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, old=old: old)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradScaler disables itself, with a warning, where no GPU is
            dtype, scaler = precision.amp_policy("auto", gpu)
        assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
        with pytest.raises(ValueError, match="8.0"):
            precision.amp_policy("bf16", gpu)


def test_no_tf32_turns_both_kinds_off_and_puts_back_a_mixed_setting():
    """A user who set cuDNN convolutions and RNNs apart (new API) and asked for TF32 matmuls: inside, both
    convolutions and matmuls are full float32; after, every flag is as it was. Reading the legacy
    cudnn.allow_tf32 flag raises in that state, so the old helper failed before the first teacher ran."""
    from common.precision import no_tf32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision
    try:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = "tf32", "ieee", "tf32"
        with no_tf32():
            assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
            assert cudnn.rnn.fp32_precision == "ieee"
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision) == \
            ("tf32", "ieee", "tf32")
        with pytest.raises(RuntimeError), no_tf32():  # put back on the way out of a failure too
            raise RuntimeError("teacher failed")
        assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = saved


# ----------------------------------------------------------------------------------------------------
# backend selection

def test_backend_selection(monkeypatch):
    x = torch.ones(2, 2)  # CPU tensors: Triton runs them only in its interpreter
    monkeypatch.delenv("FACEKD_KERNELS", raising=False)
    assert kernels.resolve_backend("torch", [x]) == "torch"
    monkeypatch.setenv("FACEKD_KERNELS", "torch")
    assert kernels.resolve_backend("auto", [x]) == "torch"
    monkeypatch.setenv("FACEKD_KERNELS", "bogus")
    with pytest.raises(ValueError):
        kernels.resolve_backend("auto", [x])
    with pytest.raises(ValueError):
        kernels.resolve_backend("cuda", [x])
    monkeypatch.delenv("FACEKD_KERNELS")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    runs = HAS_TRITON and kernels._triton_impl.INTERPRETER_BUILT
    assert kernels.resolve_backend("auto", [x]) == ("triton" if runs else "torch")
    if not runs:
        with pytest.raises(RuntimeError, match="triton"):  # why not: not importable / imported too early
            kernels.resolve_backend("triton", [x])
        return
    assert kernels.triton_available()
    monkeypatch.setenv("FACEKD_KERNELS", "triton")
    assert kernels.resolve_backend("torch", [x]) == "torch"  # the argument beats the environment
    monkeypatch.delenv("FACEKD_KERNELS")
    # float64 is not a Triton loss dtype: auto falls back, forcing it raises.
    x64 = x.double()
    assert kernels.resolve_backend("auto", [x64], kernels._TRITON_LOSS_DTYPES) == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        kernels.resolve_backend("triton", [x64], kernels._TRITON_LOSS_DTYPES)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.resolve_backend("auto", [x]) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.resolve_backend("triton", [x])


@needs_triton
def test_out_of_memory_in_a_kernel_is_raised_not_a_fallback_for_good(monkeypatch, fresh_failures):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernels._triton_impl, "cosine_forward", oom)
    s, t = _loss_case(6, 40, torch.float32, seed=71)
    with pytest.raises(torch.OutOfMemoryError):
        kernels.cosine_distill_loss(s, t)
    assert not kernels._failed_ops


@needs_triton
@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                 "asynchronously reported\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."),
    torch.AcceleratorError("CUDA error: device-side assert triggered"),
    RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")])
def test_a_cuda_fault_in_a_kernel_is_raised_not_blamed_on_the_kernel(monkeypatch, fresh_failures, error):
    # The device is unusable after one, and the fault may be an earlier op's: a fallback would fail too.
    def fault(*args, **kwargs):
        raise error

    monkeypatch.setattr(kernels._triton_impl, "cosine_forward", fault)
    s, t = _loss_case(6, 40, torch.float32, seed=72)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match="CUDA"):
            kernels.cosine_distill_loss(s, t)
    assert not kernels._failed_ops


def test_a_kernel_image_the_driver_cannot_load_falls_back():
    """Triton says it as 'Triton Error [CUDA]' too, as it does a device fault; a driver older than Triton's
    toolchain is common, and the PyTorch fallback works there."""
    assert not kernels._device_fault(RuntimeError("Triton Error [CUDA]: device kernel image is invalid"))
    assert kernels._device_fault(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))


def test_triton_that_cannot_be_imported_is_said_once_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_impl", None)
    monkeypatch.setattr(kernels, "_triton_error", "triton cannot be imported (ImportError: no triton)")
    monkeypatch.setattr(kernels, "_said", set())
    monkeypatch.delenv("FACEKD_KERNELS", raising=False)
    on_gpu, on_cpu = (SimpleNamespace(device=torch.device(d), dtype=torch.float32) for d in ("cuda:0", "cpu"))
    with pytest.warns(RuntimeWarning, match="cannot be imported.*PyTorch fallback"):
        assert kernels.resolve_backend("auto", [on_gpu]) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every step
        assert kernels.resolve_backend("auto", [on_gpu]) == "torch"
        monkeypatch.setattr(kernels, "_said", set())
        assert kernels.resolve_backend("auto", [on_cpu]) == "torch"  # the CPU's fallback is the rule, not news


def test_the_float16_loss_scaler_stops_a_run_whose_steps_all_overflow():
    """GradScaler skips a step with inf or NaN gradients and lowers its scale: a run of only such steps wrote
    an untrained student and exited 0. A few skips are normal; SKIPS_IN_A_ROW of them stop it."""
    from common.precision import LossScaler, backward_step

    model = torch.nn.Linear(3, 1)
    opt, scaler = torch.optim.Adam(model.parameters()), LossScaler("cpu", init_scale=2.0 ** 16)
    x = torch.ones(4, 3)
    for poison in [1.0, float("inf"), float("inf"), 1.0] + [1.0] * 3:
        backward_step((model(x) * poison).sum(), opt, scaler)
    assert scaler.taken == 5 and scaler.in_a_row == 0
    for _ in range(LossScaler.SKIPS_IN_A_ROW - 1):
        backward_step((model(x) * float("nan")).sum(), opt, scaler)
    again = LossScaler("cpu")  # a resume: the run of skips goes on
    again.load_state_dict(scaler.state_dict())
    assert again.in_a_row == LossScaler.SKIPS_IN_A_ROW - 1
    with pytest.raises(FloatingPointError, match=r"50 float16 steps in a row .*--amp bf16"):
        backward_step((model(x) * float("nan")).sum(), opt, again)
    assert scaler.taken == 5
    # a long run of skips while the scale settles, then a step taken: the count starts again (not a total)
    settling = LossScaler("cpu", init_scale=2.0 ** 16)
    for poison in [float("inf")] * 5 + [1.0] + ([float("inf"), 1.0, 1.0] * 20):
        backward_step((model(x) * poison).sum(), opt, settling)
    assert settling.in_a_row == 0 and settling.taken == 41
    with pytest.raises(ValueError, match="not fused"):  # its step runs even when skipped inside: not countable
        backward_step(model(x).sum(), torch.optim.Adam(model.parameters(), fused=True), LossScaler("cpu"))
