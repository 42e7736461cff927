"""Fusion operators: shapes, the paper's layer widths, reconstruction quality, save/load."""
import math

import numpy as np
import pytest
import torch

from common import fusion


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is several times faster than two on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    if op == "pca":  # a fitted one: an unfitted PCA's zero axes would load the same without its state
        model.fit([torch.randn(50, 12, generator=torch.Generator().manual_seed(0))])
    fusion.save(model, op, 12, 4, tmp_path / "G.safetensors")
    loaded, cfg = fusion.load(tmp_path / "G.safetensors")
    assert cfg == {"op": op, "d_in": 12, "d_out": 4}
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.eval().encode(x))
        assert op == "concat" or loaded.encode(x).abs().sum() > 0  # concat has no state: its config is all


def test_nrmse_per_block():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 6))
    mean = x.mean(0)
    slices = {"a": slice(0, 2), "b": slice(2, 6)}
    assert fusion.nrmse_per_block(x, x, mean, slices) == {"a": 0.0, "b": 0.0}
    r = fusion.nrmse_per_block(np.tile(mean, (100, 1)), x, mean, slices)
    assert r["a"] == pytest.approx(1.0) and r["b"] == pytest.approx(1.0)
    # a teacher constant on every face: no error to normalise (a floor made 1e-7 off read 0.41), n/a in the
    # table and left out of the average
    x[:, 2:] = 0.5
    r = fusion.nrmse_per_block(x + 1e-7 * rng.normal(size=x.shape), x, x.mean(0), slices)
    assert np.isnan(r["b"]) and r["a"] < 1e-3
    md = fusion.table5({"PCA": r})
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| ")}
    assert rows["b"] == "n/a" and float(rows["Average"]) == pytest.approx(r["a"], abs=1e-3)
    assert "b gave the same h_i on every test face" in md and "leaves it out" in md
    broken = x + 0.1  # a diverged decoder's NaN is an infinite error, not a constant teacher
    broken[0, 0] = np.nan
    assert fusion.nrmse_per_block(broken, x, x.mean(0), slices)["a"] == math.inf


# ------------------------------------------------------------------ residual layout, split, recipe
def curved(n, d=32, k=3, seed=0, noise=0.05):
    """Rows on a curved k-dim manifold (not a subspace): where a non-linear G can beat PCA."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, k, generator=g) * 4 - 2
    feats = torch.cat([z, torch.sin(2 * z), z ** 2, z[:, :1] * z[:, 1:2]], 1)
    a = torch.randn(feats.shape[1], d, generator=torch.Generator().manual_seed(99))  # same map for every seed
    x = feats @ a + noise * torch.randn(n, d, generator=g)
    return (x - x.mean(0)) / x.std(0)


def test_residual_starts_as_pca_and_round_trips(tmp_path):
    x = curved(400)
    pca = fusion.build("pca", 32, 4)
    pca.weight.copy_(fusion.block_weights([8, 24]))
    pca.fit([x])
    model = fusion.build("ae", 32, 4, layout="residual", hidden=64)
    model.weight.copy_(pca.weight)
    model.pca_init(pca)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.decode(model.encode(x)), pca.decode(pca.encode(x)), atol=1e-4)
    fusion.save(model, "ae", 32, 4, tmp_path / "G.safetensors")
    loaded, cfg = fusion.load(tmp_path / "G.safetensors")
    assert cfg == {"op": "ae", "d_in": 32, "d_out": 4, "layout": "residual", "hidden": 64}
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded.weight, model.weight)


def test_block_weights_balance_teachers_and_weighted_pca_is_best_linear():
    w = fusion.block_weights([4, 12, 16])
    assert w.shape == (32,) and float(w.mean()) == pytest.approx(1.0)
    assert float(w[:4].sum()) == pytest.approx(float(w[4:16].sum())) == pytest.approx(float(w[16:].sum()))
    x = curved(500)
    plain, weighted = fusion.build("pca", 32, 4), fusion.build("pca", 32, 4)
    weighted.weight.copy_(w)
    plain.fit([x])
    weighted.fit([x])
    err = lambda m: float((w * (m.decode(m.encode(x)) - x) ** 2).mean())
    # Weighted PCA minimises the weighted error; the plain fit, chosen for another loss, does worse on it.
    assert err(weighted) < err(plain)


def keys(n):
    return [f"faces/{i:05d}.png" for i in range(n)]


def test_split_disjoint_stable_and_nested():
    rows = np.arange(1000)[np.arange(1000) % 7 != 0]  # faces found among 1000 images
    s = fusion.three_way_split(keys(1000), rows, 0, 0.1, 0.1, 10**6, 10**6)
    parts = [set(s[k].tolist()) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(rows) and set().union(*parts) == set(rows.tolist())
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert len(s["test"]) == len(s["val"]) == round(0.1 * len(rows))
    # Same faces -> same split, whatever their order (a resumed or re-read cache); another seed -> another split.
    again = fusion.three_way_split(keys(1000), rows[::-1].copy(), 0, 0.1, 0.1, 10**6, 10**6)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["test"], fusion.three_way_split(keys(1000), rows, 1, 0.1, 0.1, 10**6, 10**6)["test"])
    # A face keeps its role when the corpus grows: most of the small corpus' test faces stay test faces.
    big = fusion.three_way_split(keys(3000), np.arange(3000), 0, 0.1, 0.1, 10**6, 10**6)
    small = fusion.three_way_split(keys(3000), np.arange(1000), 0, 0.1, 0.1, 10**6, 10**6)
    assert len(np.intersect1d(small["test"], big["test"])) >= 0.8 * len(small["test"])
    capped = fusion.three_way_split(keys(1000), rows, 0, 0.1, 0.1, 20, 30)
    assert len(capped["val"]) == 20 and len(capped["test"]) == 30
    with pytest.raises(ValueError, match="cannot be split"):
        fusion.three_way_split(keys(5), np.arange(5), 0, 0.1, 0.1, 10, 10)


def test_split_takes_names_that_are_not_utf8():
    """A file name that is not UTF-8 is kept byte for byte (as lone surrogates): G's split draws it a number
    like any other, in every grouping, instead of stopping fuse.py after its extraction."""
    names = [f"d{i % 10}/{i:05d}.png" for i in range(50)] + [b"d\xe9/caf\xe9_\xff.jpg".decode("utf-8", "surrogateescape")]
    for spec in ("image", "folder", r"re:^(d.)/"):
        s = fusion.three_way_split(names, np.arange(len(names)), 0, 0.1, 0.1, 10**6, 10**6, fusion.split_group(spec))
        assert sorted(np.concatenate([s[k] for k in s]).tolist()) == list(range(len(names)))
    # names that are UTF-8 draw the numbers they drew before (their plain UTF-8 bytes hashed): the same test faces
    import hashlib

    drawn = [int.from_bytes(hashlib.blake2b(f"0\t{k}".encode(), digest_size=8).digest(), "little") for k in names[:50]]
    test = fusion.three_way_split(names, np.arange(50), 0, 0.1, 0.1, 10**6, 10**6)["test"]
    assert sorted(test.tolist()) == sorted(np.argsort(drawn, kind="stable")[:5].tolist())


def test_split_by_group_keeps_a_group_on_one_side():
    """--split-group: the frames of one video (or the photos of one person) are never in two of G's sets, the
    default (each image alone) is the split as it was, and a typo is a clear error."""
    names = [f"vid{v:03d}/frame_{i:04d}.jpg" for v in range(60) for i in range(7)] + [f"photo_{i}.jpg" for i in range(40)]
    rows = np.arange(len(names))
    plain = fusion.three_way_split(names, rows, 0, 0.1, 0.1, 10**6, 10**6)
    assert all(np.array_equal(plain[k], fusion.three_way_split(names, rows, 0, 0.1, 0.1, 10**6, 10**6,
                                                               fusion.split_group("image"))[k]) for k in plain)
    key_sets = lambda s, group: [{group(names[r]) for r in s[k]} for k in ("train", "val", "test")]  # noqa: E731
    folder = fusion.split_group("folder")
    assert any(a & b for i, a in enumerate(key_sets(plain, folder)) for b in key_sets(plain, folder)[i + 1:])
    for spec in ("folder", r"re:^(vid\d+)/"):
        group = fusion.split_group(spec)
        s = fusion.three_way_split(names, rows, 0, 0.1, 0.1, 10**6, 10**6, group)
        sets = key_sets(s, group)
        assert not any(a & b for i, a in enumerate(sets) for b in sets[i + 1:]), spec
        assert sum(len(s[k]) for k in s) == len(names) and len(s["test"]) >= round(0.1 * len(names))
        assert len(s["test"]) < round(0.1 * len(names)) + 7  # whole groups: at most one group past the size
    assert fusion.split_group("folder")("top.jpg") == "top.jpg"  # an image at the top is alone
    with pytest.raises(ValueError, match="expected image, folder or re:PATTERN"):
        fusion.split_group("person")
    with pytest.raises(ValueError, match="not a regular expression"):
        fusion.split_group("re:(")
    with pytest.raises(ValueError, match="whole groups \\(1 group\\)"):
        fusion.three_way_split(names[:20], np.arange(20), 0, 0.1, 0.1, 10, 10, lambda key: "one")


def recipe_error(n, op, layout, make=curved, seed=0, steps=400, d_out=3):
    x = make(n + 600, seed=seed)
    rows = np.arange(len(x))
    s = fusion.three_way_split(keys(len(x)), rows, seed, 0.1, 600 / len(x), 10**6, 10**6)
    data = fusion.Rows(x)
    recipe = fusion.Recipe(layout=layout, steps=steps, batch=128, lr=3e-3, eval_every=25, patience=6, seed=seed)
    d = x.shape[1]
    model, info = fusion.fit(op, d, d_out, data, s["train"], s["val"], recipe)
    pca, _ = fusion.fit("pca", d, d_out, data, s["train"], s["val"], recipe)
    return {name: fusion.val_loss(m, data, s[part]) for part in ("val", "test") for name, m in
            ((f"{part}_model", model), (f"{part}_pca", pca))}, info


@pytest.mark.parametrize("op", ["ae", "dae"])
def test_residual_autoencoder_never_worse_than_pca(op):
    # 200 training rows near a 6-dim subspace of 40 dims, h_G of width 6: PCA is all there is to find, and a
    # free non-linear network could only overfit. On the validation rows that choose its step the
    # autoencoder cannot lose to PCA (it starts as PCA); on unseen test rows it may lose by at most the
    # tolerance, 2 % of PCA's error.
    err, info = recipe_error(250, op, "residual", make=correlated, steps=200, d_out=6)
    assert err["val_model"] <= err["val_pca"] * (1 + 1e-4)
    assert err["test_model"] <= err["test_pca"] * 1.02, (err, info)


def test_residual_autoencoder_beats_pca_with_data():
    # A curved 3-dim manifold: with 1000 rows the non-linear residual finds what no 3-dim projection can.
    err, info = recipe_error(1000, "ae", "residual", steps=300)
    assert err["test_model"] < 0.8 * err["test_pca"], (err, info)
    assert info["best_step"] > 0 and info["hidden"] == fusion.hidden_width(info["n_train"], 32, 3)


def test_hidden_width_follows_corpus():
    assert fusion.hidden_width(100, 5488, 1024) == 64
    assert fusion.hidden_width(8000, 5488, 1024) == 992
    assert fusion.hidden_width(10**7, 5488, 1024) == 3136  # the paper's first hidden width caps it


def test_a_diverging_fit_stops_at_the_next_evaluation():
    """The loss is not read back every step (a host wait on a GPU): a non-finite one is caught at the next
    evaluation, and no state it touched is kept."""
    x = curved(400, seed=3)
    s = fusion.three_way_split(keys(len(x)), np.arange(len(x)), 0, 0.1, 0.1, 10**6, 10**6)
    recipe = fusion.Recipe(layout="paper", steps=200, batch=64, lr=1e12, eval_every=10, patience=50)
    with pytest.raises(FloatingPointError, match=r"between steps 1 and 10"):
        fusion.fit("ae", x.shape[1], 3, fusion.Rows(x), s["train"], s["val"], recipe)


def test_a_nan_validation_error_stops_the_fit_instead_of_keeping_step_0():
    x = curved(200, seed=4)
    x[150:] = np.nan  # validation rows only: training stays finite
    recipe = fusion.Recipe(layout="paper", steps=20, batch=32, eval_every=5, patience=50)
    with pytest.raises(FloatingPointError, match="validation error"):
        fusion.fit("ae", x.shape[1], 3, fusion.Rows(x), np.arange(150), np.arange(150, 200), recipe)


def test_a_validation_error_turning_nan_during_the_fit_stops_it(monkeypatch):
    x = curved(200, seed=4)
    errors = iter([1.0, float("nan")])  # the start, then the first evaluation
    monkeypatch.setattr(fusion, "val_loss", lambda model, data, rows: next(errors))
    recipe = fusion.Recipe(layout="paper", steps=20, batch=32, eval_every=5, patience=50)
    with pytest.raises(FloatingPointError, match="validation error became nan at step 5"):
        fusion.fit("ae", x.shape[1], 3, fusion.Rows(x), np.arange(150), np.arange(150, 200), recipe)


def test_pca_axes_computed_once_per_rows_and_weight():
    """Every operator and width of a run starts from the same PCA: its axes come from one pass over the rows
    for each (rows, weight), the same components as a fit of its own."""
    x = curved(500, seed=4)
    data = fusion.Rows(x)
    reads = []
    batches = data.batches
    data.batches = lambda rows, size, rng=None: (reads.append(1), batches(rows, size, rng))[1]
    rows = np.arange(400)
    for d_out in (3, 5, 3):
        pca = fusion.PCA(x.shape[1], d_out)
        pca.fit_like(data, rows)
        alone = fusion.PCA(x.shape[1], d_out)
        alone.fit(batches(rows, 4096))
        assert torch.allclose(pca.components.abs(), alone.components.abs(), atol=1e-6)
    assert len(reads) == 1
    pca.weight.fill_(2.0)  # another weight: another pass
    pca.fit_like(data, rows)
    assert len(reads) == 2


def test_pca_axes_kept_on_disk_for_the_next_process(tmp_path):
    """transfer.py's pca baseline keeps the axes in its task cache folder: the next run (a new data object)
    loads them instead of another pass over the fuse cache; other rows or other data make another file."""
    x = curved(300, seed=5)
    first = fusion.PCA(x.shape[1], 4)
    first.fit_like(fusion.Rows(x), np.arange(200), store=tmp_path)
    again = fusion.Rows(x)
    again.batches = lambda *a, **k: (_ for _ in ()).throw(AssertionError("read the rows again"))
    second = fusion.PCA(x.shape[1], 4)
    second.fit_like(again, np.arange(200), store=tmp_path)
    assert torch.equal(first.components, second.components) and len(list(tmp_path.glob("pca-*.npy"))) == 1
    fusion.PCA(x.shape[1], 4).fit_like(fusion.Rows(x), np.arange(100), store=tmp_path)
    fusion.PCA(x.shape[1], 4).fit_like(fusion.Rows(x + 1), np.arange(200), store=tmp_path)
    assert len(list(tmp_path.glob("pca-*.npy"))) == 3


@pytest.mark.parametrize("op", ["ae", "vae"])
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, op):
    """A fit killed mid-epoch resumes from its last save: same batches, same dropout and sampling noise,
    same kept state as a fit never killed; a finished fit is loaded, not trained again."""
    x = curved(150)
    s = fusion.three_way_split([str(i) for i in range(150)], np.arange(150), 0, 0.2, 0.1, 100, 100)
    data = fusion.Rows(x)
    recipe = fusion.Recipe(steps=60, batch=16, eval_every=10, patience=100, checkpoint_s=0)
    fit = lambda ckpt, progress=None: fusion.fit(op, x.shape[1], 3, data, s["train"], s["val"], recipe,
                                                 progress=progress, checkpoint=ckpt)
    whole, info = fit(fusion.fit_file(tmp_path / "a", op, x.shape[1], 3, data, s["train"], s["val"], recipe))

    class Killed(Exception):
        pass

    def kill_at_35(step, best):  # 7 batches an epoch: step 35 ends epoch 5, the last save (step 30) is mid-epoch
        if step == 35:
            raise Killed

    ckpt = fusion.fit_file(tmp_path / "b", op, x.shape[1], 3, data, s["train"], s["val"], recipe)
    with pytest.raises(Killed):
        fit(ckpt, kill_at_35)
    resumed, info_b = fit(ckpt)
    assert info_b["resumed_from_step"] == 30 and info_b["best_step"] == info["best_step"]
    assert info_b["steps_run"] == info["steps_run"] and abs(info_b["best_val_mse"] - info["best_val_mse"]) < 1e-6
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    loaded, info_c = fit(ckpt, lambda step: pytest.fail("a finished fit trained again"))
    assert info_c["loaded"] and all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(),
                                                                      loaded.state_dict().values()))
    # Another recipe, other rows or other data are another fit.
    other = fusion.Recipe(steps=61, batch=16, eval_every=10, patience=100, checkpoint_s=0)
    names = {fusion.fit_file(tmp_path, op, x.shape[1], 3, data, s["train"], s["val"], r).name for r in (recipe, other)}
    names.add(fusion.fit_file(tmp_path, op, x.shape[1], 3, data, s["train"][1:], s["val"], recipe).name)
    names.add(fusion.fit_file(tmp_path, op, x.shape[1], 3, fusion.Rows(x + 1), s["train"], s["val"], recipe).name)
    names.add(fusion.fit_file(tmp_path, op, x.shape[1], 3, data, s["train"], s["val"], recipe, torch.rand(x.shape[1])).name)
    assert len(names) == 5


def test_a_damaged_fit_state_is_moved_aside_and_the_fit_starts_over(tmp_path, caplog):
    x = curved(120)
    s = fusion.three_way_split([str(i) for i in range(120)], np.arange(120), 0, 0.2, 0.1, 100, 100)
    recipe = fusion.Recipe(steps=20, batch=16, eval_every=10, checkpoint_s=0)
    ckpt = tmp_path / "ae.state.safetensors"
    ckpt.write_bytes(b"\x00" * 100)  # what a disk error could leave (a kill cannot: saves are atomic)
    fusion.log.addHandler(caplog.handler)  # (a run's logger may have stopped "common" from propagating)
    try:
            model, info = fusion.fit("ae", x.shape[1], 3, fusion.Rows(x), s["train"], s["val"], recipe, checkpoint=ckpt)
    finally:
        fusion.log.removeHandler(caplog.handler)
    assert info["steps_run"] == 20 and "resumed_from_step" not in info
    assert (tmp_path / "ae.state.safetensors.damaged").exists() and "starts over" in caplog.text
    assert fusion.fit("ae", x.shape[1], 3, fusion.Rows(x), s["train"], s["val"], recipe, checkpoint=ckpt)[1]["loaded"]


def test_a_save_that_fails_on_a_full_disk_warns_and_the_fit_goes_on(tmp_path, caplog, monkeypatch):
    """safetensors reports a full disk as its own error, not OSError: the fit still ends with its result."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    x = curved(120)
    s = fusion.three_way_split([str(i) for i in range(120)], np.arange(120), 0, 0.2, 0.1, 100, 100)
    recipe = fusion.Recipe(steps=20, batch=16, eval_every=10, checkpoint_s=0)
    fusion.log.addHandler(caplog.handler)
    try:
        model, info = fusion.fit("ae", x.shape[1], 3, fusion.Rows(x), s["train"], s["val"], recipe,
                                 checkpoint=tmp_path / "fits" / "ae.state.safetensors")
    finally:
        fusion.log.removeHandler(caplog.handler)
    assert info["steps_run"] == 20 and "No space left on device" in caplog.text and "goes on" in caplog.text
    assert not list((tmp_path / "fits").glob("*.safetensors")) and not list((tmp_path / "fits").glob(".*.tmp"))


def test_pca_fits_do_not_depend_on_the_training_recipe_and_keep_their_axes(tmp_path):
    x = curved(120)
    s = fusion.three_way_split([str(i) for i in range(120)], np.arange(120), 0, 0.2, 0.1, 100, 100)
    data = fusion.Rows(x)
    a, b = fusion.Recipe(steps=20), fusion.Recipe(steps=40, lr=0.01)
    name = lambda op, r: fusion.fit_file(tmp_path, op, x.shape[1], 3, data, s["train"], s["val"], r).name  # noqa: E731
    assert name("pca", a) == name("pca", b) and name("concat", a) == name("concat", b) and name("ae", a) != name("ae", b)
    # an autoencoder of a new recipe, in a new process, starts from the axes the first one kept on disk
    fusion.fit("ae", x.shape[1], 3, data, s["train"], s["val"], a, checkpoint=tmp_path / name("ae", a))
    kept = list((tmp_path / "pca").glob("pca-*.npy"))
    assert len(kept) == 1
    fresh = fusion.Rows(x)  # no axes in memory
    fresh_axes = lambda *args: pytest.fail("the PCA axes were computed again")  # noqa: E731
    import unittest.mock
    with unittest.mock.patch.object(fusion.PCA, "axes", fresh_axes):
        fusion.fit("ae", x.shape[1], 3, fresh, s["train"], s["val"], fusion.Recipe(steps=20, batch=16, eval_every=10),
                   checkpoint=tmp_path / name("ae", b))


# ---------------------------------------------------- numbers behind Table 5 (from a mutation audit)
def test_nrmse_is_a_root_and_table5_averages_every_teacher():
    x = np.random.default_rng(0).normal(size=(100, 6))
    mean = x.mean(0)
    r = fusion.nrmse_per_block(mean + 0.5 * (x - mean), x, mean, {"a": slice(0, 2), "b": slice(2, 6)})
    assert r["a"] == pytest.approx(0.5) and r["b"] == pytest.approx(0.5)  # half the spread left: 0.5, not 0.25
    assert "0.200" in fusion.table5({"PCA": {"a": 0.1, "b": 0.3}}).splitlines()[-1]


def test_early_stopping_waits_exactly_its_patience():
    """lr 0: every evaluation equals the start, so the fit stops after `patience` of them, keeping step 0."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    r = fusion.Recipe(steps=400, batch=16, lr=0.0, weight_decay=0.0, eval_every=2, patience=3)
    _, info = fusion.fit("ae", 8, 2, fusion.Rows(x), np.arange(48), np.arange(48, 64), r)
    assert info["best_step"] == 0 and info["steps_run"] == 6


def test_fit_reshuffles_the_training_faces_every_epoch():
    seen = []

    class Spy(fusion.Rows):
        def batches(self, rows, size, rng=None):
            if size == 8:
                seen.append(np.asarray(rows).copy())
            return super().batches(rows, size, rng)

    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    fusion.fit("ae", 6, 2, Spy(x), np.arange(32), np.arange(32, 40),
               fusion.Recipe(steps=8, batch=8, eval_every=100, patience=100))
    assert not np.array_equal(seen[0], np.arange(32)) and not np.array_equal(seen[0], seen[1])


def test_validation_error_is_a_mean_per_value_and_masking_noise_keeps_the_mean():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    assert fusion.val_loss(fusion.PCA(8, 2), fusion.Rows(x), np.arange(50)) == pytest.approx(
        float((x ** 2).mean()), rel=1e-5)  # an unfitted PCA reconstructs 0
    torch.manual_seed(0)
    y = fusion.mask_noise(torch.ones(200_000), 0.2)
    assert abs(float((y == 0).float().mean()) - 0.2) < 0.01 and abs(float(y.mean()) - 1) < 0.01


def test_fits_are_kept_across_a_reworded_comment_or_docstring():
    """The fits' folder was named after fusion.py's bytes: any upgrade that touched a comment made every fit
    unreadable, and fuse.py deleted them and trained G again (hours at 4.12 M faces) to the same bytes. Its
    code names it now: docstrings, comments and line breaks aside."""
    from pathlib import Path

    src = Path(fusion.__file__).read_text()
    v = fusion.code_version(src, "2.14.1+cpu")
    assert v == fusion.code_version(src, "2.14.1+cu130") and fusion._CODE == fusion.code_version(src, torch.__version__)
    # not ast.dump's text, which differs from one Python to the next (3.12 added type_params=[], 3.13 leaves
    # empty fields out): two boxes sharing a cache would each refit and sweep the other's fits
    import ast

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ast, "dump", lambda *a, **k: pytest.fail("ast.dump names the fits"))
        assert fusion.code_version(src, "2.14.1") == v
    reworded = src.replace('"""Train one operator on the train rows;', '"""Trains one operator on its training rows;')
    reworded = reworded.replace("    opt = torch.optim.AdamW(groups, lr=recipe.lr)",
                                "    # (a comment added)\n    opt = torch.optim.AdamW(groups,\n"
                                "                            lr=recipe.lr)")
    assert reworded != src and fusion.code_version(reworded, "2.14.1") == v
    assert fusion.code_version(src.replace("lr=recipe.lr)", "lr=2 * recipe.lr)"), "2.14.1") != v
    assert fusion.code_version(src, "2.15.0") != v
    # pinned: any change to how the code is named renames every fit of every cache (a refit, hours at full size)
    assert fusion.code_version("def f(x):\n    return x\n", "2.0") == "022bb6dff4d13f66"
    # and a field a newer Python adds empty (3.12's type_params=[]) changes nothing
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and "type_params" not in node._fields:
            node._fields += ("type_params",)
            node.type_params = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ast, "parse", lambda *a, **k: tree)
        assert fusion.code_version(src, "2.14.1") == v


def test_a_G_file_whose_config_its_tensors_do_not_fill_is_refused_before_it_is_made(tmp_path):
    """G is built from its file's config: one saying d_out 10**9 took all the memory to refuse."""
    import json

    from safetensors.torch import save_file

    from common.checkpoint import StateError

    fusion.save(fusion.build("pca", 6, 2, "paper", 0), "pca", 6, 2, tmp_path / "G.safetensors")
    assert fusion.load(tmp_path / "G.safetensors")[1]["d_out"] == 2
    save_file({"_empty": torch.zeros(1)}, str(tmp_path / "huge.safetensors"),
              metadata={"config": json.dumps({"op": "pca", "d_in": 3000, "d_out": 3000})})
    with pytest.raises(StateError, match="its tensors do not fit the G its config describes"):
        fusion.load(tmp_path / "huge.safetensors")
