"""Exact and near-duplicate detection: normalised-text hashes and MinHash LSH over word shingles.

    exact      xxh3-64 of the lower-cased, whitespace-collapsed text; the first line wins
    near-dup   R-MinHash signatures (rensa, Rust) of word k-shingles, LSH with `bands` bands of
               num_perm / bands rows; a row is a near duplicate when a band collides with an
               EARLIER KEPT row whose estimated Jaccard (share of equal signature slots) is at
               least the threshold, so the result is the same as a sequential keep-first scan.

With 64 slots in 16 bands of 4, a pair at Jaccard 0.85 collides in some band with probability
1 - (1 - 0.85^4)^16 = 0.99999, one at 0.5 with 1 - (1 - 0.5^4)^16 = 0.64: the verification step
keeps the threshold exact where banding alone would not. Used by `python -m stages.filter`.
"""
from __future__ import annotations

import itertools

import numpy as np
import rensa
import xxhash

_P = np.uint64(0x100000001B3)   # odd multiplier of the polynomial shingle hash (mod 2^64)
VERIFY_PER_BUCKET = 16      # kept rows per LSH bucket a new row is verified against (see below)


def exact_key(words: list[str]) -> int:
    """64-bit hash of the text with case and whitespace normalised (words = lower.split())."""
    return xxhash.xxh3_64_intdigest(" ".join(words).encode("utf-8", "surrogatepass"))


def shingles(words: list[str], k: int) -> list[str]:
    """Word k-shingles as text; a text shorter than k words is one shingle. (The filter hashes
    the same shingles without building strings: shingle_hashes.)"""
    if len(words) <= k:
        return [" ".join(words)]
    return list(map(" ".join, zip(*(words[i:] for i in range(k)))))


def shingle_hashes(word_lists: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every row's word k-shingles, all rows end to end, and row offsets.

    Word hashes come from rensa's Rust hasher in one call; a shingle's hash is a polynomial in
    its k word hashes (mod 2^64), computed for every window at once in numpy. A row shorter
    than k words is one shingle of all its words. Row r owns hashes[offsets[r]:offsets[r+1]].
    """
    lengths = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
    flat = np.fromiter(itertools.chain.from_iterable(rensa.RMinHash.hash_token_sets(word_lists)),
                       dtype=np.uint64, count=int(lengths.sum()))
    starts = np.concatenate(([0], np.cumsum(lengths)))
    count = np.maximum(lengths - k + 1, 1)                   # shingles per row
    offsets = np.concatenate(([0], np.cumsum(count)))
    owner = np.repeat(np.arange(len(word_lists)), count)
    at = starts[owner] + np.arange(offsets[-1]) - offsets[owner]   # first word of each shingle
    span = np.minimum(lengths[owner], k)                     # k, or the whole short row
    h = np.zeros(len(at), np.uint64)
    for j in range(k):
        use = j < span
        h[use] = h[use] * _P + flat[at[use] + j]
    return h, offsets


def repetition(hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row: distinct shingles / shingles (1.0 = no five words ever repeat in a row)."""
    rows = len(offsets) - 1
    count = np.diff(offsets)
    owner = np.repeat(np.arange(rows), count)
    mixed = hashes ^ (owner.astype(np.uint64) * _P)          # (row, shingle) as one key
    distinct = np.bincount(owner[np.unique(mixed, return_index=True)[1]], minlength=rows)
    return distinct / np.maximum(count, 1)


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(rows, num_perm) uint32 R-MinHash signatures of each row's shingle hashes (Rust)."""
    rows = len(offsets) - 1
    if not rows:
        return np.zeros((0, num_perm), np.uint32)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        hashes, offsets.astype(np.uint64), num_perm, seed)
    return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(rows, num_perm)


def select(hashes: np.ndarray, offsets: np.ndarray, keep: np.ndarray):
    """The shingle hashes and offsets of the rows where keep is True."""
    count = np.diff(offsets)[keep]
    owner_keep = np.repeat(keep, np.diff(offsets))
    return hashes[owner_keep], np.concatenate(([0], np.cumsum(count)))


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(rows, bands) uint64: each band's num_perm/bands slots mixed into one key."""
    rows, num_perm = sigs.shape
    if num_perm % bands:
        raise ValueError(f"filter.minhash_perm={num_perm} is not a multiple of "
                         f"filter.minhash_bands={bands}; pick bands dividing it")
    r = num_perm // bands
    parts = sigs.reshape(rows, bands, r).astype(np.uint64)
    keys = np.zeros((rows, bands), np.uint64)
    for j in range(r):                   # polynomial mix of the r slots (mod 2^64)
        keys = keys * np.uint64(0x100000001B3) + parts[:, :, j]
    return keys


def _buckets(keys: np.ndarray) -> list[list[int]]:
    """Per row, its buckets (band, key) shared with another row, as ints unique across bands;
    rows whose every bucket is theirs alone get [] and are kept without a look."""
    rows, bands = keys.shape
    out = np.full((rows, bands), -1, dtype=np.int64)
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        new = np.concatenate(([True], k[1:] != k[:-1]))
        gid = np.cumsum(new) - 1
        shared = np.bincount(gid)[gid] > 1
        out[order[shared], b] = gid[shared] * bands + b
    return [[g for g in row if g >= 0] for row in out.tolist()]


def near_duplicates(sigs: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """Bool per row (rows in input order): a near duplicate of an earlier kept row.

    A sequential keep-first scan over the rows that share a bucket with another row; each shared
    bucket remembers its latest VERIFY_PER_BUCKET kept rows. Templated rows (one long preamble,
    a few numbers changed) pile thousands of distinct rows into one bucket at Jaccard ~0.7;
    checking each new row against all of them would cost rows^2, the cap keeps it linear.
    """
    dup = np.zeros(len(sigs), dtype=bool)
    if len(sigs) < 2:
        return dup
    need = int(np.ceil(threshold * sigs.shape[1] - 1e-9))     # equal slots for the threshold
    kept: dict[int, list[int]] = {}
    for i, buckets in enumerate(_buckets(band_keys(sigs, bands))):
        if not buckets:
            continue
        cands = [j for g in buckets for j in kept.get(g, ())[-VERIFY_PER_BUCKET:]]
        if cands and (np.count_nonzero(sigs[cands] == sigs[i], axis=1) >= need).any():
            dup[i] = True
            continue
        for g in buckets:
            kept.setdefault(g, []).append(i)
    return dup
