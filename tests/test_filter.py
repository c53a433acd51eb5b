"""The filter stage: every hostile line gets its reason, the accounting identity holds, dedup and
decontamination catch what they should, the held-out split is stable, output is the same for
any worker count, and the real CLI runs."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorapipe import config, data, decontam, filtering

REPO = Path(__file__).resolve().parents[1]
STORY = ("The old lighthouse keeper climbed the spiral stairs every evening to light the lamp, "
         "and on stormy nights he stayed awake until dawn watching the ships pass the rocks.")


def filter_cfg(**overrides):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["filter"]
    return dataclasses.replace(config.from_dict(config.Filter, raw, "filter"), **overrides)


def clean_rows(n: int) -> list[dict]:
    """n distinct, English, generated rows in the collect stage's shapes."""
    import reasoning_gym

    rows = []
    for name in ("leg_counting", "syllogism", "basic_arithmetic"):
        ds = reasoning_gym.create_dataset(name, seed=7, size=n // 3 + 1)
        for i in range(n // 3 + 1):
            e = ds[i]
            rows.append({"instruction": e["question"], "input": "", "output": e["answer"],
                         "source": f"reasoning_gym/{name}",
                         "rg": {"dataset": name, "seed": 7, "index": i,
                                "metadata": e["metadata"]}})
    return rows[:n]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in lines))
    return path


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


# (raw line, expected reason or None for kept)
HOSTILE = [
    (js({"instruction": "Tell me about lighthouses.", "input": "", "output": STORY}), None),
    (js(chat("Why do lighthouses use lenses at all?", "A Fresnel lens concentrates the lamp's "
             "light into a beam that can be seen from twenty miles away.")), None),
    (js({"conversations": [{"from": "system", "value": "You are terse."},
                           {"from": "human", "value": "How many legs does a spider have?"},
                           {"from": "gpt", "value": "A spider has eight legs."}]}), None),
    (js({"input": [{"role": "system", "content": "Answer with one word."},
                   {"role": "user", "content": "What colour is a clear daytime sky?"}],
         "ideal": ["Blue", "blue"], "source": "evals/colours"}), None),
    (b"\xef\xbb\xbf" + js(chat("Which planet is known as the red planet?",
                               "Mars is called the red planet because of iron oxide dust.")), None),
    (js(chat("Name a large mammal that lives in the ocean.",
             "The blue whale is the largest animal known to have lived.")) + b"\r", None),
    (b'{"instruction": "caf\xe9 au lait", "output": "milk"}', "invalid_utf8"),
    (b'{"messages": [{"role": "user", "content": "trunc', "invalid_json"),
    (b'{"instruction": "a\x00b", "output": "c"}', "invalid_json"),
    (b'{"messages": [' + b'{"role": "user", "content": "' + b"x" * (10 << 20) + b'"}]}',
     "over_long_line"),
    (b"", "blank_line"),
    (b"   \t ", "blank_line"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"42", "not_an_object"),
    (b"null", "not_an_object"),
    (b'"a string"', "not_an_object"),
    (js({"text": "no known keys here"}), "unknown_schema"),
    (js({"messages": "hello"}), "wrong_types"),
    (js({"instruction": 5, "output": "five"}), "wrong_types"),
    (js({"messages": [{"role": "robot", "content": "beep"}]}), "wrong_types"),
    (js({"messages": []}), "empty_turns"),
    (js({"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "ok"}]}),
     "empty_turns"),
    (js({"messages": [{"role": "user", "content": "Is anyone there to answer me?"}]}),
     "no_assistant_turn"),
    (js({"input": "Grade this essay about the sea and the ships."}), "no_assistant_turn"),
    (js(chat("Quelle est la capitale de la France et pourquoi est-elle si célèbre?",
             "Paris est la capitale de la France, célèbre pour ses musées et ses monuments.")),
     "not_english"),
    (js(chat("#$%^&*()!@#$%^&*(){}[]<>?/|\\~`", "@@@@ #### $$$$ %%%% ^^^^ &&&& ****")),
     "low_quality"),
    (js({"instruction": "Hi", "output": "Yo"}), "too_few_tokens"),
    (js(chat("Write a very long story about the sea.", " ".join(
        f"On day {i} the keeper counted {i * 7} gulls over the harbour wall." for i in
        range(400)))), "too_many_tokens"),
    (js(chat("Describe a lighthouse keeper's evening.", STORY)), None),  # same answer, new prompt
    (js({"instruction": "tell me   about LIGHTHOUSES.", "output": STORY}), "exact_duplicate"),
    (js({"instruction": "Tell me about lighthouses.", "output": STORY.replace("rocks.", "reef.")}),
     "near_duplicate"),
    (js(chat("Answer this question: " + decontam.benchmark_texts()["gsm8k"][0],
             "She makes 18 dollars every day at the market.")), "contamination"),
]


def run_filter(tmp_path: Path, lines: list[bytes], tok: Path, **overrides):
    src = write_lines(tmp_path / "raw.jsonl", lines)
    out = {k: tmp_path / f"{k}.jsonl" for k in ("train", "heldout", "rejects")}
    metrics = filtering.run(filter_cfg(**overrides), src, tok, out["train"], out["heldout"],
                            out["rejects"])
    read = {k: [json.loads(x) for x in v.read_text().splitlines()] for k, v in out.items()}
    return metrics, read


def test_hostile_file_every_line_accounted(tmp_path, tokenizer_dir):
    rows = [js(r) for r in clean_rows(60)]
    lines = rows + [raw for raw, _ in HOSTILE]
    metrics, out = run_filter(tmp_path, lines, tokenizer_dir, heldout_rows=5, workers=1)
    got = {r["line"]: r["reason"] for r in out["rejects"]}
    for i, (raw, reason) in enumerate(HOSTILE, len(rows) + 1):
        assert got.get(i) == reason, (i, raw[:80], got.get(i))
    assert metrics["input_rows"] == len(lines)
    assert metrics["input_rows"] == (metrics["train_rows"] + metrics["heldout_rows"]
                                     + sum(metrics["rejected"].values()))
    assert metrics["heldout_rows"] == 5 == len(out["heldout"])
    assert metrics["train_rows"] == len(out["train"])
    assert set(metrics["rejected"]) == set(data.REASONS)
    assert all(len(r["text"]) <= 200 for r in out["rejects"])
    kept = out["train"] + out["heldout"]
    assert all(set(r) >= {"id", "source", "messages"} for r in kept)
    gen = [r for r in kept if r["source"].startswith("reasoning_gym/")]
    assert gen and all(r["verify"]["entry"]["answer"] == r["answer"] for r in gen)
    import reasoning_gym  # the verify object is enough to score an answer later

    v = gen[0]["verify"]
    assert reasoning_gym.get_score_answer_fn(v["dataset"])(gen[0]["answer"], v["entry"]) == 1.0
    evals = [r for r in kept if r["source"] == "evals/colours"]
    assert evals and evals[0]["answer"] == ["Blue", "blue"]
    assert evals[0]["messages"][-1] == {"role": "assistant", "content": "Blue"}


def test_decontamination_catches_gsm_symbolic_not_numbers():
    import reasoning_gym

    contam = decontam.Decontaminator(13)
    ds = reasoning_gym.create_dataset("gsm_symbolic", seed=3, size=200)
    sym = [decontam.letter_words((ds[i]["question"] + "\n" + ds[i]["answer"]).lower())
           for i in range(200)]
    caught = contam.flags(sym).mean()
    assert caught >= 0.6, caught           # measured 0.70 (seed 3, 200 rows)
    other = [decontam.letter_words(r["instruction"].lower()) for r in clean_rows(90)]
    assert not contam.flags(other).any()
    # numbers are not evidence: a GSM8K question's numbers in other words do not match
    q = decontam.benchmark_texts()["gsm8k"][0]
    digits = " ".join(w for w in q.replace("$", " ").split() if w.isdigit()) * 5
    assert not contam.flags([decontam.letter_words(digits + " 1 2 3 4 5 6 7 8 9 10 11 12 13")])[0]
    he = decontam.benchmark_texts()["humaneval"][0]
    assert contam.flags([decontam.letter_words(he.lower())])[0]


def test_heldout_split_stable_stratified_disjoint():
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 2**63, 1000, dtype=np.uint64)
    prompts[500:520] = prompts[:20]                        # 20 prompts asked twice
    source = ["a"] * 700 + ["b"] * 300
    held, drop = filtering.split_heldout(prompts, source, 50)
    assert held.sum() == 50
    assert not (held & drop).any()
    held_prompts = set(prompts[held].tolist())
    train = ~held & ~drop
    assert held_prompts.isdisjoint(prompts[train].tolist())
    n_b = sum(1 for i in np.flatnonzero(held) if source[i] == "b")
    assert n_b == 15                                       # 300 / 980 distinct prompts of 50
    again, _ = filtering.split_heldout(prompts, source, 50)
    assert (again == held).all()
    # stable: a row's membership does not depend on the rows after it
    more = np.concatenate([prompts, rng.integers(0, 2**63, 10, dtype=np.uint64)])
    held2, _ = filtering.split_heldout(more, source + ["a"] * 10, 50)
    assert (held2[:1000] == held).mean() > 0.99


def test_same_output_for_any_worker_count(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(filtering, "CHUNK_BYTES", 4096)   # many chunks from a small file
    rows = [js(r) for r in clean_rows(150)] + [raw for raw, _ in HOSTILE[:12]]
    outs = []
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        metrics, out = run_filter(d, rows, tokenizer_dir, heldout_rows=10, workers=workers)
        assert len(filtering.chunk_bounds(d / "raw.jsonl")) > 5
        outs.append((out, {k: v for k, v in metrics.items() if k not in ("seconds",
                     "rows_per_s", "workers")}))
    assert outs[0] == outs[1]


def test_real_cli(tmp_path, tokenizer_dir):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["filter"]["heldout_rows"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    src = write_lines(tmp_path / "raw.jsonl", [js(r) for r in clean_rows(30)] + [b"{bad"])
    cmd = [sys.executable, "-m", "stages.filter", "--input", src, "--base", tokenizer_dir,
           "--train", tmp_path / "f/train.jsonl", "--heldout", tmp_path / "f/heldout.jsonl",
           "--rejects", tmp_path / "f/rejects.jsonl", "--metrics", tmp_path / "m/filter.json",
           "--params", tmp_path / "params.yaml"]
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True, timeout=120)
    m = json.loads((tmp_path / "m/filter.json").read_text())
    assert m["input_rows"] == 31 and m["rejected"]["invalid_json"] == 1
    assert m["heldout_rows"] == 3
    assert m["train_rows"] + 3 + sum(m["rejected"].values()) == 31
    assert not list((tmp_path / "f").glob(".*tmp"))       # no half-written files left


def test_token_counts_match_the_tokenizer(tokenizer_dir):
    """Tier 2 (cached pre-token pieces) counts exactly what the tokenizer counts."""
    from tokenizers import Tokenizer

    from lorapipe import tokens

    counter = tokens.TokenCounter(tokenizer_dir / "tokenizer.json", filter_cfg())
    assert counter.pieces_ok and counter.wrapper == {"system": 5, "user": 5, "assistant": 6}
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [STORY, "def f(x_1, y__2):\n    return x_1 ** 2  # it's   fine\n\n\t", "3.14159 + 2,718",
             "Café naïve — “quotes” ’s 'll ___ … 日本語のテキスト ²³ ½", "  leading\n\n  spaces  "]
    for t in texts:
        assert counter._pieces(t) == len(tok.encode(t, add_special_tokens=False).ids), t
