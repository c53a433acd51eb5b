"""Exact and near-duplicate detection on small, known cases."""
from __future__ import annotations

import numpy as np
import pytest

from lorapipe import dedup

BASE = ("the keeper climbed the spiral stairs every evening to light the great lamp and on "
        "stormy nights he stayed awake until dawn watching ships pass the rocks").split()


def sigs_of(texts: list[list[str]]) -> np.ndarray:
    return dedup.signatures(*dedup.shingle_hashes(texts, 5), 64, 1234)


def test_exact_key_ignores_case_and_whitespace_only():
    a = dedup.exact_key("Hello   World\n".lower().split())
    assert a == dedup.exact_key("hello world".split())
    assert a != dedup.exact_key("hello, world".split())


def test_near_duplicates_keep_first_and_threshold():
    other = ("a completely different sentence about cooking rice with water salt and a lid "
             "on a small stove for twenty minutes").split()
    near = BASE[:-1] + ["reef"]                       # last word changed: J = 25/27 = 0.93
    far = BASE[:12] + other[:12]                      # half shared: J well under 0.85
    dup = dedup.near_duplicates(sigs_of([BASE, other, near, far, near]), 8, 0.85)
    assert dup.tolist() == [False, False, True, False, True]
    assert not dedup.near_duplicates(sigs_of([BASE, near]), 8, 0.99).any()


def test_short_texts_are_one_shingle_and_bands_must_divide():
    assert dedup.shingles(["what", "is", "2+2?"], 5) == ["what is 2+2?"]
    s = sigs_of([["calculate", "5", "-", "3."], ["calculate", "5", "+", "3."]])
    assert not dedup.near_duplicates(s, 8, 0.85).any()
    with pytest.raises(ValueError, match="multiple"):
        dedup.band_keys(s, 7)


def test_shingle_hashes_match_text_shingles_and_repetition():
    texts = [BASE, ["just", "two"], ["la"] * 30, BASE[:5]]
    hashes, offsets = dedup.shingle_hashes(texts, 5)
    for r, words in enumerate(texts):
        mine = hashes[offsets[r]:offsets[r + 1]]
        text = dedup.shingles(words, 5)
        assert len(mine) == len(text)
        assert len(set(mine.tolist())) == len(set(text))      # same equalities, as strings
    rep = dedup.repetition(hashes, offsets)
    assert rep[0] == 1.0 and rep[1] == 1.0 and rep[3] == 1.0
    assert rep[2] == pytest.approx(1 / 26)                   # 26 shingles, all "la la la la la"
    keep = np.array([True, False, True, False])
    sub, sub_off = dedup.select(hashes, offsets, keep)
    assert (sub_off == [0, offsets[1] - offsets[0], offsets[1] - offsets[0] + 26]).all()
    assert (sub[:offsets[1]] == hashes[:offsets[1]]).all()
