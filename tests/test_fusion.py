"""Fusion operators: shapes, the paper's layer widths, reconstruction quality, save/load."""
import numpy as np
import pytest
import torch

from common import fusion


def test_layer_widths_match_paper():
    assert fusion.layer_widths(5488, 1024) == [5488, 3136, 1792, 1024]


def correlated(n=600, d=40, k=6, seed=0):
    """Rows living near a k-dim subspace, standardised: what redundant teachers look like."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)
    return (x - x.mean(0)) / x.std(0)


@pytest.mark.parametrize("op", fusion.OPERATORS)
def test_operator_shapes_and_reconstruction(op):
    x = correlated()
    model = fusion.build(op, 40, 8)
    if op == "pca":
        model.fit([x[:300], x[300:]])
    elif op != "concat":
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            loss = model.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        h = model.encode(x)
        rec = model.decode(h)
    assert h.shape == (600, 40 if op == "concat" else 8)
    err = float(((rec - x) ** 2).mean())
    # The data has 6 true dimensions: every operator must do far better than predicting the mean (error 1).
    assert err < (1e-9 if op == "concat" else 0.25), err


def test_pca_matches_svd():
    x = correlated(seed=1)
    model = fusion.build("pca", 40, 5)
    model.fit([x])
    _, _, vt = torch.linalg.svd(x.double(), full_matrices=False)
    # Same subspace as the top right-singular vectors.
    proj_a = model.components.double() @ model.components.double().T
    proj_b = vt[:5].T @ vt[:5]
    assert torch.allclose(proj_a, proj_b, atol=1e-4)


def test_unknown_operator():
    with pytest.raises(ValueError, match="unknown fusion operator"):
        fusion.build("svm", 4, 2)


@pytest.mark.parametrize("op", ["ae", "pca", "concat", "vae"])
def test_save_load_roundtrip(tmp_path, op):
    model = fusion.build(op, 12, 4)
    fusion.save(model, op, 12, 4, tmp_path / "G.safetensors")
    loaded, cfg = fusion.load(tmp_path / "G.safetensors")
    assert cfg == {"op": op, "d_in": 12, "d_out": 4}
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.eval().encode(x))


def test_nrmse_per_block():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 6))
    mean = x.mean(0)
    slices = {"a": slice(0, 2), "b": slice(2, 6)}
    assert fusion.nrmse_per_block(x, x, mean, slices) == {"a": 0.0, "b": 0.0}
    r = fusion.nrmse_per_block(np.tile(mean, (100, 1)), x, mean, slices)
    assert r["a"] == pytest.approx(1.0) and r["b"] == pytest.approx(1.0)
