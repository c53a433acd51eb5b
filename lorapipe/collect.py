"""Build the default raw instruction set: reasoning-gym rows mixed with the evals registry JSONL.

    python -m stages.collect --out data/raw/instructions.jsonl --metrics metrics/collect.json

Rows keep their native shapes; normalising them is the filter's job:
- generated (reasoning-gym), one shape per row drawn by `collect.shape_weights`:
    alpaca         {"source", "instruction", "input": "", "output", "rg"}
    messages       {"source", "messages": [{"role": "user"|"assistant", "content"}], "rg"}
    conversations  {"source", "conversations": [{"from": "human"|"gpt", "value"}], "rg"}
  with "source": "reasoning_gym/<name>" and "rg": {"dataset", "seed", "size", "index",
  "answer", "metadata"}: `rg_entry(row["rg"])` re-creates the generator's entry and
  `score_answer(row["rg"], text)` checks an answer with that generator's own score_answer.
- evals registry rows: the row's own object (`input`: a prompt or a chat list, `ideal`: a string
  or a list, sometimes more keys) with "source": "evals/<file path without .jsonl>" added.

The evals rows are sampled without replacement: at most `evals_max_rows_per_file` random rows of
each usable registry file form a pool, and round(rows * evals_fraction) rows are drawn from it.
If the pool is smaller than that, every pool row is used, the shortfall is logged and counted
(metrics `evals_shortfall`) and generated rows fill the rest, so `rows` always holds. Registry
files are skipped by rule, each counted under its reason: benchmark copies (GSM8K, HumanEval:
bench measures on them, they are never training rows), git-LFS pointers, empty files, and files
whose first row is not an object with an `input` key.

Every row is a pure function of (params, row position): the plan (which slot gets which source,
generator index and shape) is drawn up front with one seeded RNG, then chunks of slots are
rendered by a pool of processes and written in order, so the file is byte-identical for any
worker count.
"""
from __future__ import annotations

import json
import logging
import mmap
import multiprocessing as mp
import os
import re
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

log = logging.getLogger("lorapipe")

SHAPES = ("alpaca", "messages", "conversations")
# Benchmark sets bench measures on: a registry file whose path matches is never a training row.
BENCHMARK_PATTERN = re.compile(r"gsm[-_ ]?8k|human[-_ ]?eval|openai_humaneval", re.IGNORECASE)
LFS_MAGIC = b"version https://git-lfs.github.com/spec"
CHUNK = 4096  # slots per work unit; any value gives the same file (rows depend on slot only)


# ---------------------------------------------------------------- config and reasoning-gym


def rg_names() -> list[str]:
    from reasoning_gym.factory import DATASETS
    return sorted(DATASETS)


def validate(cfg) -> None:
    """Collect every problem of the collect section into one error, before any work."""
    errors = []
    if cfg.rows <= 0:
        errors.append(f"collect.rows must be > 0, got {cfg.rows}")
    if not 0.0 <= cfg.evals_fraction <= 1.0:
        errors.append(f"collect.evals_fraction must be in [0, 1], got {cfg.evals_fraction}")
    if cfg.evals_max_rows_per_file <= 0:
        errors.append(f"collect.evals_max_rows_per_file must be > 0, got "
                      f"{cfg.evals_max_rows_per_file}")
    if cfg.workers < 0:
        errors.append(f"collect.workers must be >= 0 (0 = one per core), got {cfg.workers}")
    known = set(rg_names())
    unknown = sorted(set(cfg.generators) - known)
    if unknown:
        errors.append(f"collect.generators: {unknown} not in reasoning_gym; available: "
                      f"{', '.join(sorted(known))}")
    if not cfg.generators:
        errors.append("collect.generators is empty; name at least one reasoning_gym generator")
    bad_shapes = sorted(set(cfg.shape_weights) - set(SHAPES))
    if bad_shapes:
        errors.append(f"collect.shape_weights: unknown shapes {bad_shapes}; known: {SHAPES}")
    for where, weights in (("generators", cfg.generators), ("shape_weights", cfg.shape_weights)):
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            errors.append(f"collect.{where}: weights must be >= 0 with a positive sum, got "
                          f"{weights}")
    if errors:
        raise ValueError("invalid collect params:\n  " + "\n  ".join(errors))
    if "gsm_symbolic" in cfg.generators:
        log.warning("collect.generators lists gsm_symbolic: its rows are made from GSM8K test "
                    "templates, so the filter's decontamination should reject them")


_DATASETS: dict = {}


def rg_dataset(name: str, seed: int, size: int):
    """The reasoning-gym dataset (cached): entry i depends on (seed, i) only, not on size."""
    key = (name, seed, size)
    if key not in _DATASETS:
        import reasoning_gym
        _DATASETS[key] = reasoning_gym.create_dataset(name, seed=seed, size=size)
    return _DATASETS[key]


def rg_entry(rg: dict) -> dict:
    """Re-create the generator's native entry {"question", "answer", "metadata"} of a row."""
    return rg_dataset(rg["dataset"], rg["seed"], rg["size"])[rg["index"]]


def score_answer(rg: dict, answer: str) -> float:
    """Score `answer` with the row's generator's own score_answer (1.0 = correct).

    Some scorers parse the answer and raise on text they cannot parse (prime_factorization
    int()s every factor): an unparseable answer is a wrong answer, so it scores 0.0.
    """
    ds = rg_dataset(rg["dataset"], rg["seed"], rg["size"])
    try:
        return float(ds.score_answer(answer, rg_entry(rg)))
    except (ValueError, TypeError, ArithmeticError):
        return 0.0


def rg_row(name: str, seed: int, size: int, index: int, shape: str) -> dict:
    """One generated row in its native shape, carrying what re-checking its answer needs."""
    entry = rg_dataset(name, seed, size)[index]
    question, answer = entry["question"], entry["answer"]
    if answer is None:
        # open-ended generators (propositional_logic) have no oracle, only an example answer
        answer = entry["metadata"].get("example_answer")
    if not isinstance(answer, str):
        raise ValueError(f"reasoning_gym/{name}[{index}] has no answer text to train on "
                         f"(answer={entry['answer']!r}); remove {name} from collect.generators")
    row: dict = {"source": f"reasoning_gym/{name}"}
    if shape == "alpaca":
        row.update(instruction=question, input="", output=answer)
    elif shape == "messages":
        row["messages"] = [{"role": "user", "content": question},
                           {"role": "assistant", "content": answer}]
    else:
        row["conversations"] = [{"from": "human", "value": question},
                                {"from": "gpt", "value": answer}]
    row["rg"] = {"dataset": name, "seed": seed, "size": size, "index": index,
                 "answer": entry["answer"], "metadata": entry["metadata"]}
    return row


def gsm_symbolic_rows(n: int, seed: int) -> list[dict]:
    """n reasoning-gym gsm_symbolic rows in the alpaca shape: GSM8K test templates with new
    numbers, used to show that the filter's decontamination catches them (never default)."""
    return [rg_row("gsm_symbolic", seed, n, i, "alpaca") for i in range(n)]


# ---------------------------------------------------------------- evals registry


def evals_root() -> Path:
    """The evals package's registry data folder, located without importing evals."""
    import importlib.util
    spec = importlib.util.find_spec("evals")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the evals package is not installed; install it (pinned in "
                                "requirements-nodeps.txt) or set collect.evals_fraction: 0")
    for loc in spec.submodule_search_locations:
        root = Path(loc) / "registry" / "data"
        if root.is_dir():
            return root
    raise FileNotFoundError(f"no registry/data under {spec.submodule_search_locations}")


def _lines(mm) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of every non-empty line of a mapped file (end excludes \\r\\n)."""
    buf = np.frombuffer(mm, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [len(buf)]))
    cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)
    ends = ends - cr
    keep = ends > starts
    return starts[keep], ends[keep]


def _row_ok(text: bytes) -> bool:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "input" in obj and "source" not in obj


def _scan_file(path: Path, cap: int, seed: int, rel: str, stats: dict):
    """Pick up to `cap` random valid rows of one file: (starts, ends) or None if skipped."""
    if path.stat().st_size == 0:
        stats["files_skipped"]["empty"] += 1
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:len(LFS_MAGIC)] == LFS_MAGIC:
            stats["files_skipped"]["lfs_pointer"] += 1
            return None
        starts, ends = _lines(mm)
        if len(starts) == 0 or not _row_ok(mm[starts[0]:ends[0]]):
            stats["files_skipped"]["not_input_schema"] += 1
            return None
        # a per-file RNG (seed, crc32 of the path): adding a file never changes another's picks
        rng = np.random.default_rng([seed, zlib.crc32(rel.encode())])
        pick = np.sort(rng.choice(len(starts), min(cap, len(starts)), replace=False))
        ok = np.array([_row_ok(mm[starts[i]:ends[i]]) for i in pick], dtype=bool)
    stats["rows_invalid"] += int((~ok).sum())
    stats["files_used"] += 1
    stats["bytes_scanned"] += path.stat().st_size
    return starts[pick[ok]], ends[pick[ok]]


def evals_pool(root: Path, cap: int, seed: int) -> tuple[list[str], np.ndarray, dict]:
    """All usable registry rows up to `cap` per file: (relative paths, [file, start, end] rows,
    stats). Files are visited in sorted order so the pool is the same on every machine."""
    stats = {"files_used": 0, "rows_invalid": 0, "bytes_scanned": 0, "benchmark_files": [],
             "files_skipped": {"benchmark": 0, "lfs_pointer": 0, "empty": 0,
                               "not_input_schema": 0}}
    rels, parts = [], []
    for path in sorted(root.rglob("*.jsonl")):
        rel = path.relative_to(root).as_posix()
        if BENCHMARK_PATTERN.search(rel):
            stats["files_skipped"]["benchmark"] += 1
            stats["benchmark_files"].append(rel)
            continue
        got = _scan_file(path, cap, seed, rel, stats)
        if got is None or len(got[0]) == 0:
            continue
        fid = np.full(len(got[0]), len(rels), dtype=np.int64)
        parts.append(np.stack([fid, got[0], got[1]], axis=1))
        rels.append(rel)
    pool = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    if stats["benchmark_files"]:
        log.info("evals: excluded %d benchmark files: %s", len(stats["benchmark_files"]),
                 stats["benchmark_files"])
    return rels, pool, stats


# ---------------------------------------------------------------- plan and render

# The plan of the current run; set before the worker pool forks, so workers inherit it.
_PLAN: dict = {}


def make_plan(cfg, root: Path | None) -> dict:
    """Decide every slot up front: evals row (which one) or generator, index and shape.

    One RNG seeded by collect.seed draws, in this order: the evals pool permutation, the evals
    slot positions, each generated slot's generator, each generated slot's shape.
    """
    rng = np.random.default_rng(cfg.seed)
    want = round(cfg.rows * cfg.evals_fraction)  # e.g. 500,000 x 0.3 = 150,000 evals rows
    rels, picked, stats = [], np.zeros((0, 3), dtype=np.int64), {}
    if want > 0:
        root = root or evals_root()
        rels, pool, stats = evals_pool(root, cfg.evals_max_rows_per_file, cfg.seed)
        picked = pool[rng.permutation(len(pool))[:want]]
        if len(picked) < want:
            log.warning("evals: pool has %d unique rows, %d wanted; using all of them and "
                        "filling %d slots with generated rows", len(pool), want,
                        want - len(picked))
        stats.update(pool_rows=len(pool), wanted=want, shortfall=want - len(picked))
    n_ev = len(picked)
    kind = np.zeros(cfg.rows, dtype=np.int32)  # -1 = evals row, else generator id
    kind[rng.choice(cfg.rows, n_ev, replace=False)] = -1
    gen_slots = np.flatnonzero(kind >= 0)
    names = sorted(cfg.generators)  # sorted: reordering params keys does not change the file
    gw = np.array([cfg.generators[n] for n in names], dtype=float)
    kind[gen_slots] = rng.choice(len(names), len(gen_slots), p=gw / gw.sum())
    shapes = [s for s in SHAPES if s in cfg.shape_weights]
    sw = np.array([cfg.shape_weights[s] for s in shapes], dtype=float)
    shape = np.full(cfg.rows, -1, dtype=np.int8)
    shape[gen_slots] = rng.choice(len(shapes), len(gen_slots), p=sw / sw.sum())
    # local index: evals -> row of `picked`; generated -> running index within its generator
    local = np.zeros(cfg.rows, dtype=np.int64)
    local[kind == -1] = np.arange(n_ev)
    sizes = {}
    for g, name in enumerate(names):
        at = kind == g
        sizes[name] = max(int(at.sum()), 1)
        local[at] = np.arange(int(at.sum()))
    return {"kind": kind, "shape": shape, "local": local, "names": names, "shapes": shapes,
            "sizes": sizes, "seed": cfg.seed, "root": root,
            "rels": rels, "picked": picked, "evals_stats": stats}


def _dump(row: dict) -> bytes:
    line = json.dumps(row, ensure_ascii=False)
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate in registry text: keep it, \u-escaped
        return json.dumps(row).encode("ascii") + b"\n"


def _evals_rows(slots: np.ndarray) -> dict[int, dict]:
    """Read the chunk's evals rows, one open per file (offsets sorted within a file)."""
    p = _PLAN
    out, todo = {}, {}
    for s in slots:
        fid, start, end = p["picked"][p["local"][s]]
        todo.setdefault(int(fid), []).append((int(start), int(end), int(s)))
    for fid, spans in todo.items():
        rel = p["rels"][fid]
        with open(p["root"] / rel, "rb") as f:
            for start, end, s in sorted(spans):
                f.seek(start)
                obj = json.loads(f.read(end - start))
                out[s] = {"source": "evals/" + rel.removesuffix(".jsonl"), **obj}
    return out


def render(span: tuple[int, int]) -> bytes:
    """The JSONL bytes of slots [a, b): a pure function of the plan."""
    p = _PLAN
    a, b = span
    kind, shape, local = p["kind"][a:b], p["shape"][a:b], p["local"][a:b]
    ev = _evals_rows(np.flatnonzero(kind == -1) + a)
    out = []
    for i in range(b - a):
        if kind[i] == -1:
            out.append(_dump(ev[a + i]))
        else:
            name = p["names"][kind[i]]
            out.append(_dump(rg_row(name, p["seed"], p["sizes"][name], int(local[i]),
                                    p["shapes"][shape[i]])))
    return b"".join(out)


def write(cfg, out: Path, root: Path | None = None) -> dict:
    """Plan, render in parallel and stream to `out` atomically; returns the metrics."""
    from lorapipe import files
    validate(cfg)
    plan = make_plan(cfg, root)
    _PLAN.clear()
    _PLAN.update(plan)
    spans = [(a, min(a + CHUNK, cfg.rows)) for a in range(0, cfg.rows, CHUNK)]
    workers = min(cfg.workers or os.cpu_count() or 1, len(spans))
    log.info("collect: %d rows (%d evals, %d generated) in %d chunks on %d workers", cfg.rows,
             int((plan["kind"] == -1).sum()), int((plan["kind"] >= 0).sum()), len(spans), workers)
    # fork: workers inherit _PLAN instead of unpickling it; imap keeps chunk k k-th in the file
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with files.atomic_path(out) as tmp, open(tmp, "wb") as f, \
                tqdm(total=cfg.rows, unit="row", unit_scale=True, desc="collect") as bar:
            for (a, b), blob in zip(spans, pool.imap(render, spans) if pool else
                                    map(render, spans)):
                f.write(blob)
                bar.update(b - a)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return metrics(plan, out, workers)


def metrics(plan: dict, out: Path, workers: int) -> dict:
    kind, shape = plan["kind"], plan["shape"]
    sources = {f"reasoning_gym/{n}": int((kind == g).sum()) for g, n in enumerate(plan["names"])}
    sources["evals"] = int((kind == -1).sum())
    shapes = {s: int((shape == k).sum()) for k, s in enumerate(plan["shapes"])}
    shapes["evals_input"] = sources["evals"]
    ev = dict(plan["evals_stats"])
    ev["files_contributing"] = len({int(f) for f in plan["picked"][:, 0]})
    return {"rows": int(len(kind)), "sources": sources, "shapes": shapes,
            "bytes": out.stat().st_size, "workers": workers, "evals": ev}
