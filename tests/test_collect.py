"""collect: deterministic mix of reasoning-gym rows (native shapes, checkable answers) and evals
registry rows (native input/ideal), benchmark files excluded by rule, the real CLI once."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import reasoning_gym
import yaml

from lorapipe import collect, config

REPO = Path(__file__).resolve().parents[1]
SHAPE_KEYS = {"alpaca": {"source", "instruction", "input", "output", "rg"},
              "messages": {"source", "messages", "rg"},
              "conversations": {"source", "conversations", "rg"}}


def params(**over) -> config.Collect:
    return dataclasses.replace(config.load(REPO / "params.yaml", "collect"), **over)


def chat(input_, ideal) -> str:
    return json.dumps({"input": input_, "ideal": ideal})


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A small evals registry with every kind of file the real one could hold."""
    root = tmp_path_factory.mktemp("registry")
    def put(rel, text):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode() if isinstance(text, str) else text)
    put("chat/samples.jsonl", "\n".join(
        chat([{"role": "system", "content": "Answer."}, {"role": "user", "content": f"q{i}"}],
             f"a{i}") for i in range(40)) + "\n")
    put("plain/prompts.jsonl", "\r\n".join(chat(f"prompt {i}", [f"x{i}", f"y{i}"])
                                           for i in range(30)) + "\r\n\r\n")
    put("messy/rows.jsonl", chat("ok", "1") + "\n{not json\n[1,2]\n" + chat("ok2", "2") + "\n")
    put("gsm8k/test.jsonl", chat("Natalia sold clips", "72") + "\n")
    put("humaneval/samples.jsonl", chat("def f():", "pass") + "\n")
    put("sub/Human-Eval_copy.jsonl", chat("def g():", "pass") + "\n")
    put("big/lfs.jsonl", "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    put("empty/e.jsonl", "")
    put("tasks/t.jsonl", json.dumps({"task": "x", "answer": "y"}) + "\n")
    return root


def write(tmp_path, registry, name="out.jsonl", **over) -> tuple[bytes, dict]:
    out = tmp_path / name
    m = collect.write(params(**{"rows": 400, "workers": 1, **over}), out, root=registry)
    return out.read_bytes(), m


def rows_of(blob: bytes) -> list[dict]:
    return [json.loads(line) for line in blob.decode().splitlines()]


def test_default_generators_exist_and_exclude_gsm_symbolic():
    cfg = params()
    missing = set(cfg.generators) - set(reasoning_gym.factory.DATASETS)
    assert not missing, f"default generators unknown to reasoning_gym: {missing}"
    assert "gsm_symbolic" not in cfg.generators
    collect.validate(cfg)


def test_unknown_generator_fails_with_available_names():
    with pytest.raises(ValueError) as e:
        collect.validate(params(generators={"no_such_gen": 1.0}, shape_weights={"yaml": 1.0},
                                evals_fraction=1.5))
    msg = str(e.value)
    assert "no_such_gen" in msg and "basic_arithmetic" in msg and "leg_counting" in msg
    assert "yaml" in msg and "evals_fraction" in msg  # every problem in one error


def test_deterministic_for_any_worker_count(tmp_path, registry, monkeypatch):
    monkeypatch.setattr(collect, "CHUNK", 64)  # 400 rows -> 7 chunks, so 2 workers interleave
    one, _ = write(tmp_path, registry, "a.jsonl")
    again, _ = write(tmp_path, registry, "b.jsonl")
    two, m = write(tmp_path, registry, "c.jsonl", workers=2)
    other, _ = write(tmp_path, registry, "d.jsonl", seed=99)
    assert one == again == two
    assert m["workers"] == 2
    assert other != one
    assert len(one.splitlines()) == 400 and m["bytes"] == len(one)


def test_shapes_sources_and_metrics(tmp_path, registry):
    blob, m = write(tmp_path, registry)
    rows = rows_of(blob)
    seen = {s: 0 for s in SHAPE_KEYS}
    for r in rows:
        if r["source"].startswith("evals/"):
            continue
        shape = "alpaca" if "instruction" in r else next(s for s in SHAPE_KEYS if s in r)
        assert set(r) == SHAPE_KEYS[shape], r
        assert r["source"] == "reasoning_gym/" + r["rg"]["dataset"]
        seen[shape] += 1
    assert seen == {s: m["shapes"][s] for s in SHAPE_KEYS} and min(seen.values()) > 50
    msgs = [r for r in rows if "messages" in r]
    assert [t["role"] for t in msgs[0]["messages"]] == ["user", "assistant"]
    convs = [r for r in rows if "conversations" in r]
    assert [t["from"] for t in convs[0]["conversations"]] == ["human", "gpt"]
    by_source = {}
    for r in rows:
        key = "evals" if r["source"].startswith("evals/") else r["source"]
        by_source[key] = by_source.get(key, 0) + 1
    assert by_source == {k: v for k, v in m["sources"].items() if v}
    assert sum(m["sources"].values()) == m["rows"] == 400


def test_evals_rows_native_and_benchmarks_excluded(tmp_path, registry):
    blob, m = write(tmp_path, registry, evals_fraction=0.1)  # 40 of the 71 valid pool rows
    ev = [r for r in rows_of(blob) if r["source"].startswith("evals/")]
    assert len(ev) == 40 == m["sources"]["evals"]
    for r in ev:
        assert set(r) == {"source", "input", "ideal"}
        assert r["source"] in {"evals/chat/samples", "evals/plain/prompts", "evals/messy/rows"}
    assert any(isinstance(r["input"], list) for r in ev)   # chat lists kept as lists
    assert any(isinstance(r["ideal"], list) for r in ev)   # list ideals kept as lists
    e = m["evals"]
    assert e["files_skipped"] == {"benchmark": 3, "lfs_pointer": 1, "empty": 1,
                                  "not_input_schema": 1}
    assert sorted(e["benchmark_files"]) == ["gsm8k/test.jsonl", "humaneval/samples.jsonl",
                                            "sub/Human-Eval_copy.jsonl"]
    assert e["rows_invalid"] == 2 and e["pool_rows"] == 40 + 30 + 2 and e["shortfall"] == 0
    assert b"Natalia" not in blob and b"def f()" not in blob


def test_evals_shortfall_filled_with_generated_rows(tmp_path, registry):
    blob, m = write(tmp_path, registry, evals_fraction=0.5, evals_max_rows_per_file=10)
    # pool: 10 (chat) + 10 (plain) + 2 valid of messy's 4 lines = 22 < 200 wanted
    assert m["evals"]["pool_rows"] == 22 and m["evals"]["shortfall"] == 178
    assert m["sources"]["evals"] == 22 and len(blob.splitlines()) == 400
    ev = [r for r in rows_of(blob) if r["source"].startswith("evals/")]
    assert len({json.dumps(r, sort_keys=True) for r in ev}) == 22  # unique, no cycling


def answer_of(row: dict) -> str:
    if "output" in row:
        return row["output"]
    turns = row.get("messages") or row["conversations"]
    return turns[1].get("content", turns[1].get("value"))


def prompt_of(row: dict) -> str:
    if "instruction" in row:
        return row["instruction"]
    turns = row.get("messages") or row["conversations"]
    return turns[0].get("content", turns[0].get("value"))


def test_answers_recheck_with_score_answer(tmp_path, registry):
    blob, _ = write(tmp_path, registry, evals_fraction=0.0)
    firsts = {}
    for r in rows_of(blob):
        firsts.setdefault(r["rg"]["dataset"], []).append(r)
    assert set(firsts) == set(params().generators)
    for name, rows in firsts.items():
        for r in rows[:3]:
            rg = r["rg"]
            entry = collect.rg_entry(rg)            # re-created from dataset, seed, size, index
            assert entry["question"] == prompt_of(r)
            assert collect.score_answer(rg, answer_of(r)) == 1.0, (name, r)
            # the stored metadata alone is enough for the generator's scorer
            ds = reasoning_gym.create_dataset(name, seed=rg["seed"], size=rg["size"])
            stored = {"question": prompt_of(r), "answer": rg["answer"], "metadata": rg["metadata"]}
            assert ds.score_answer(answer_of(r), stored) == 1.0, (name, r)
            assert collect.score_answer(rg, "definitely wrong 123456789") < 1.0


def test_gsm_symbolic_rows_offline_and_checkable():
    rows = collect.gsm_symbolic_rows(5, seed=3)
    assert len(rows) == 5 and len({r["instruction"] for r in rows}) == 5
    for r in rows:
        assert set(r) == SHAPE_KEYS["alpaca"] and r["source"] == "reasoning_gym/gsm_symbolic"
        assert collect.score_answer(r["rg"], r["output"]) == 1.0
    assert collect.gsm_symbolic_rows(5, seed=3) == rows


def test_cli_on_real_registry(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["collect"].update(rows=200, workers=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out, met = tmp_path / "raw" / "instructions.jsonl", tmp_path / "metrics" / "collect.json"
    subprocess.run([sys.executable, "-m", "stages.collect", "--out", str(out), "--metrics",
                    str(met), "--params", str(tmp_path / "params.yaml")], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    m = json.loads(met.read_text())
    rows = rows_of(out.read_bytes())
    assert m["rows"] == len(rows) == 200 and m["bytes"] == out.stat().st_size
    assert m["sources"]["evals"] == 60 and m["rows_per_s"] > 0 and m["seconds"] > 0
    ev = [r for r in rows if r["source"].startswith("evals/")]
    assert len(ev) == 60 and all("input" in r for r in ev)
    assert all(not collect.BENCHMARK_PATTERN.search(r["source"]) for r in rows)
    # every registry file named like a benchmark is counted as excluded
    named = [p for p in collect.evals_root().rglob("*.jsonl")
             if collect.BENCHMARK_PATTERN.search(p.as_posix())]
    assert m["evals"]["files_skipped"]["benchmark"] == len(named)
    assert not list(out.parent.glob(".*.tmp"))  # nothing half-written left beside it
