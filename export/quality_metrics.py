"""The quality report's metrics, on plain arrays (tests check them against hand-computed values)."""

from __future__ import annotations

import numpy as np

REL_FLOOR = 1e-3  # max_rel divides by |ref| + REL_FLOOR * max|ref|: near-zero references do not dominate


def tensor_metrics(out: np.ndarray, ref: np.ndarray) -> dict[str, float | bool]:
    """max abs error, max relative error (|out-ref| / (|ref| + REL_FLOOR*max|ref|)), cosine, all finite."""
    a, r = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    finite = bool(np.isfinite(a).all())
    if a.shape != r.shape:
        raise ValueError(f"shapes differ: {np.shape(out)} vs {np.shape(ref)}")
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "finite": True}
    err = np.abs(a - r)
    scale = np.abs(r).max()
    if scale > 0:
        max_rel = float((err / (np.abs(r) + REL_FLOOR * scale)).max())
    else:
        max_rel = 0.0 if err.max() == 0 else float("inf")
    return {"max_abs": float(err.max()), "max_rel": max_rel, "cosine": cosine(a, r), "finite": finite}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if not (np.isfinite(na) and np.isfinite(nb)):
        return float("nan")
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def psnr(img: np.ndarray, ref: np.ndarray, peak: float = 255.0) -> float:
    """10 log10(peak^2 / MSE) in dB; inf for identical images."""
    mse = float(np.mean((np.asarray(img, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


def agreement(tokens: list[int], ref: list[int]) -> float:
    """Fraction of the reference positions where tokens agree (missing positions disagree)."""
    if not ref:
        return 1.0
    return sum(a == b for a, b in zip(tokens, ref, strict=False)) / len(ref)


def first_divergence(tokens: list[int], ref: list[int]) -> int | None:
    """First index where the sequences differ (a length difference counts); None if identical."""
    for i, (a, b) in enumerate(zip(tokens, ref, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(ref) else min(len(tokens), len(ref))


def worst(rows: list[dict[str, float | bool]]) -> dict[str, float | bool]:
    """Aggregate per-sample tensor_metrics: the worst of each."""
    return {"max_abs": max(r["max_abs"] for r in rows), "max_rel": max(r["max_rel"] for r in rows),
            "cosine": min(r["cosine"] for r in rows), "finite": all(r["finite"] for r in rows), "samples": len(rows)}


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """logits [T, V] -> [T]: the top-1 logit minus the top-2 logit at each position."""
    top = np.sort(np.asarray(logits, np.float64), axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def bf16_spacing(x: np.ndarray) -> np.ndarray:
    """The distance between adjacent BF16 values at |x| (8 significant bits: 2^(floor(log2|x|) - 7));
    two logits closer than this cannot be ordered once rounded to BF16. 0 at x = 0."""
    x = np.abs(np.asarray(x, np.float64))
    _, e = np.frexp(x)  # x = m * 2^e, m in [0.5, 1): floor(log2 x) = e - 1
    return np.where(x > 0, np.ldexp(1.0, e - 8), 0.0)
