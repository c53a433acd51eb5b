"""A row's quality score: the weakest of three components, each in [0, 1] and each reported.

    coherence   share of non-space characters that are letters or digits: prose ~0.95, maths
                with operators ~0.75, code ~0.7, symbol soup, control bytes or markup dumps < 0.5
    repetition  share of distinct word shingles (the same shingles near-dup uses): 1.0 for text
                that never repeats five words in a row, ~0.1 for a model stuck in a loop
    length      min(1, words / filter.quality_min_words): a one-word exchange teaches nothing

score = min(coherence, repetition, length); rows under filter.quality_min are dropped as
low_quality and the metrics say which component sank each one. Used by `python -m stages.filter`.
"""
from __future__ import annotations

import numpy as np

COMPONENTS = ("coherence", "repetition", "length")
_SPACES = " \n\t\r\x0b\x0c"


def coherence_length(lower: str, letters: str, n_words: int,
                     min_words: int) -> tuple[float, float]:
    """The two per-row components. lower: the lower-cased text; letters:
    decontam.letters_only(lower) (digits dropped, every other non-letter a space);
    n_words: len(lower.split()). Repetition comes per chunk from dedup.repetition."""
    non_space = len(lower) - sum(map(lower.count, _SPACES))
    alnum = len(lower) - letters.count(" ")        # letters + digits (digits were dropped)
    coherence = min(1.0, alnum / non_space) if non_space else 0.0
    return coherence, min(1.0, n_words / min_words)


def summary(scores: np.ndarray, rejected: np.ndarray) -> dict:
    """Per component: mean and percentiles over scored rows, and how many rejected rows it sank.

    scores: (rows, 3) in COMPONENTS order; rejected: bool mask of rows under quality_min.
    """
    out: dict = {"scored_rows": int(len(scores))}
    if not len(scores):
        return out
    weakest = scores.argmin(axis=1)
    for j, name in enumerate(COMPONENTS):
        col = scores[:, j]
        p5, p50 = np.percentile(col, [5, 50])
        out[name] = {"mean": round(float(col.mean()), 4), "p5": round(float(p5), 4),
                     "p50": round(float(p50), 4),
                     "rejected_by": int(np.sum(rejected & (weakest == j)))}
    return out
