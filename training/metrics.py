"""Exact binary-classification metrics over a whole split (numpy, no sklearn needed).

AUC is the Mann-Whitney statistic computed from ranks, with tied scores given their
average rank - exact, and equal to ``sklearn.metrics.roc_auc_score``.
"""
from __future__ import annotations

import math

import numpy as np


def auc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by rank sums; ties get the average rank. NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average 1-based rank for each run of equal scores
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    rank_sum_pos = ranks[y].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def logloss_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Numerically stable BCE-with-logits mean."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    p = np.asarray(probs).ravel()
    y = np.asarray(labels).ravel() > 0.5
    if y.size == 0:
        return float("nan")
    return float(np.mean((p >= threshold) == y))


def binary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC, logloss, accuracy and the positive rate for logits and 0/1 labels."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    probs = 1.0 / (1.0 + np.exp(-z))
    y = np.asarray(labels, dtype=np.float64).ravel()
    return {
        "auc": auc_exact(z, y),
        "logloss": logloss_from_logits(z, y),
        "accuracy": accuracy(probs, y),
        "rows": float(y.size),
        "pos_rate": float(y.mean()) if y.size else math.nan,
    }
