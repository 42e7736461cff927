"""Evaluation metrics of the target knowledge (paper Table 3) and the fold helpers behind their protocols.

Accuracies and error rates are fractions in [0, 1] (Table 3 prints them x100); MAE is in label units.
A prediction of -1 (class index) or NaN (score, attribute) marks a face the detector missed: it is
always counted wrong, as section 4.1 of the paper asks (see tasks.missed_face_rule).
"""
from __future__ import annotations

import numpy as np


def class_indices(pred) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim == 2:  # logits or probabilities: one row per sample; one holding NaN (a diverged net) is wrong,
        return np.where(np.isnan(pred).any(1), -1, pred.argmax(1))  # not class 0 (argmax's answer)
    return pred


def accuracy(pred, target) -> float:
    """Fraction of samples whose predicted class equals the target; pred is indices or (N, C) scores."""
    pred, target = class_indices(pred), np.asarray(target)
    if len(target) == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(pred == target))


def mae(pred, target) -> float:
    pred, target = np.asarray(pred, np.float64).reshape(-1), np.asarray(target, np.float64).reshape(-1)
    if len(target) == 0:
        raise ValueError("MAE of an empty set")
    return float(np.mean(np.abs(pred - target)))


# The two points whose distance normalises a landmark error: the eye centres of 5-point layouts (CelebA,
# MTCNN); the outer eye corners of the 68 iBUG points, the "inter-ocular" normalisation of 300-W.
OCULAR = {5: (0, 1), 68: (36, 45)}


def nme(pred, target) -> float:
    """Landmark error: per image, the mean point-to-point distance over the inter-ocular distance
    (OCULAR), then the mean over images. pred, target: (N, K, 2) in the same pixels.

    NaN predictions are refused: faces the detector missed get their prediction from the missed-face
    rule (the mean training shape) before scoring.
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if len(target) == 0:
        raise ValueError("NME of an empty set")
    if np.isnan(pred).any():
        raise ValueError("NME: NaN predictions; apply the missed-face rule first")
    if target.shape[1] not in OCULAR:
        raise ValueError(f"NME: no inter-ocular points known for {target.shape[1]} landmarks")
    a, b = OCULAR[target.shape[1]]
    d = np.linalg.norm(target[:, a] - target[:, b], axis=1)
    return float(np.mean(np.linalg.norm(pred - target, axis=2).mean(1) / np.maximum(d, 1e-9)))


def mean_error_rate(pred, target, threshold: float = 0.5) -> float:
    """Multi-label error: the error rate of each attribute, averaged over attributes (CelebA "ER").

    pred holds probabilities or {0,1} decisions (use threshold=0 for logits); NaN rows are missed faces.
    With equal counts per attribute this equals the overall error, but the mean over attributes is
    what the CelebA literature reports, so it is computed that way.
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target)
    if len(target) == 0:
        raise ValueError("error rate of an empty set")
    wrong = ((pred > threshold) != (target > 0.5)) | np.isnan(pred)
    return float(wrong.mean(0).mean())


def best_threshold(scores, same) -> float:
    """Threshold t maximising the accuracy of "same iff score > t" (higher score = more alike).

    Candidates are the midpoints between consecutive distinct scores plus one below and one above
    them all, so the optimum is exact rather than limited to a grid; ties go to the smallest t.
    """
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    ok = ~np.isnan(scores)
    scores, same = scores[ok], same[ok]
    u, inv = np.unique(scores, return_inverse=True)  # one sort: O(n log n) for any number of distinct scores
    if len(u) == 0:
        return 0.0
    cands = np.concatenate([[u[0] - 1], (u[:-1] + u[1:]) / 2, [u[-1] + 1]])
    # Candidate k says "same" for the scores u[k:]: right = same pairs at or above u[k] + other pairs below it.
    n_same = np.bincount(inv, weights=same, minlength=len(u))
    n_diff = np.bincount(inv, weights=~same, minlength=len(u))
    same_above = np.concatenate([np.cumsum(n_same[::-1])[::-1], [0]])
    diff_below = np.concatenate([[0], np.cumsum(n_diff)])
    right = np.rint(same_above + diff_below).astype(np.int64)  # exact counts, so ties resolve as before
    return float(cands[int(np.argmax(right))])


def fold_std(per_fold) -> float | None:
    """LFW's sigma of the folds' accuracies: the sample std (ddof=1); None for one fold."""
    per_fold = np.asarray(per_fold, np.float64)
    return float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else None


def standard_error(per_fold) -> float | None:
    """LFW's S_E beside the mean accuracy: sigma (fold_std) over sqrt(folds); None for one fold."""
    sigma = fold_std(per_fold)
    return float(sigma / np.sqrt(len(per_fold))) if sigma is not None else None


def verification_per_fold(scores, same, folds) -> tuple[np.ndarray, np.ndarray]:
    """LFW protocol, for any number of folds: (accuracy on each fold, accuracy on the other folds that chose
    its threshold), folds in sorted order. The second is what a choice between embeddings may look at (the
    tested fold may not). LFW's own tables give standard_error of the first beside its mean."""
    scores, same, folds = np.asarray(scores, np.float64), np.asarray(same, bool), np.asarray(folds)
    if len(np.unique(folds)) < 2:  # a fold's threshold comes from the other folds: with one, from no pair at all
        raise ValueError(f"verification needs at least 2 folds, got {len(np.unique(folds))}")
    accs, fits = zip(*(fold_accuracy(scores, same, folds == f) for f in np.unique(folds)))
    return np.array(accs), np.array(fits)


def fold_accuracy(scores, same, test) -> tuple[float, float]:
    """LFW's rule for one fold (test: its pairs): the threshold is the best one on the other folds' pairs.
    Returns (accuracy on the fold, accuracy on the other folds at that threshold); a pair with a NaN score
    (a missed face) counts as wrong."""
    t = best_threshold(scores[~test], same[~test])
    right = ((scores > t) == same) & ~np.isnan(scores)
    return float(right[test].mean()), float(right[~test].mean())


def pair_scores(emb, a, b, found) -> np.ndarray:
    """Each pair's dot product of unit-length embeddings; NaN for a pair with a missed face."""
    s = (emb[a] * emb[b]).sum(1)
    s[~(found[a] & found[b])] = np.nan
    return s


def pooled(metric, test_indices, preds, targets) -> float:
    """Score cross-validation folds by pooling every held-out prediction, then applying `metric`.

    For leave-one-person-out on FG-NET this is the usual MAE over all 1002 images, which differs from
    the mean of per-person MAEs because people have different numbers of photos.
    """
    idx = np.concatenate([np.asarray(i) for i in test_indices])
    if len(np.unique(idx)) != len(idx):
        raise ValueError("a sample is held out by more than one fold")
    p = np.concatenate([np.asarray(x) for x in preds])
    return metric(p, np.asarray(targets)[idx])


METRICS = {"accuracy": accuracy, "mae": mae, "error_rate": mean_error_rate, "nme": nme}
LOWER_IS_BETTER = {"mae", "error_rate", "nme"}


def better(metric: str, a: float, b: float) -> bool:
    """True when score a beats score b under metric. NaN (a diverged model's score) never beats a number and
    any number beats it: with plain comparisons a NaN first epoch stayed "best" for good."""
    if np.isnan(a) or np.isnan(b):
        return not np.isnan(a)
    return a < b if metric in LOWER_IS_BETTER else a > b
