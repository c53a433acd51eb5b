"""Raw lines -> one normalised record, or a reject reason. Pure functions, no I/O.

Every known raw shape becomes
    {"id", "source", "messages": [{"role", "content"}, ...], "answer"?, "verify"?}
    alpaca    {"instruction", "input"?, "output"}
    chat      {"messages": [{"role", "content"}, ...]}
    sharegpt  {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}
    evals     {"input": str | [chat messages], "ideal"?: str | [str, ...]}
Generated rows also carry "source" (e.g. "reasoning_gym/gcd") and "rg" ({"dataset", "seed",
"index", "metadata"}); they keep "answer" and a "verify" object that is enough to score a model's
answer later:  reasoning_gym.get_score_answer_fn(v["dataset"])(answer, v["entry"]).

The filter stage (`python -m stages.filter ...`) calls parse_line() then normalise() on each line.
"""
from __future__ import annotations

import orjson

# Every reason a line can be dropped for, in the order the filter checks them. The stage's
# metrics count each (zeros included) so a reader sees every check that ran.
REASONS = (
    "blank_line", "over_long_line", "invalid_utf8", "invalid_json", "not_an_object",
    "unknown_schema", "wrong_types", "empty_turns", "no_assistant_turn",
    "not_english", "low_quality", "too_few_tokens", "too_many_tokens", "contamination",
    "exact_duplicate", "near_duplicate", "heldout_overlap",
)

_BOM = b"\xef\xbb\xbf"
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# sharegpt speaker names seen in the wild -> chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}
# evals registry few-shot examples are system messages named example_user/example_assistant
EVALS_NAMED = {"example_user": "user", "example_assistant": "assistant"}


class Reject(Exception):
    """A line that cannot become a training record; args[0] is one of REASONS."""


def parse_line(raw: bytes, max_line_chars: int):
    """One raw line (without its newline) -> a JSON object; raises Reject(reason).

    The length limit is checked before parsing: a line over 4 bytes x max_line_chars cannot be
    within max_line_chars (UTF-8 uses at most 4 bytes a character), one at or under
    max_line_chars bytes cannot be over; only lines in between are decoded to count characters.
    """
    if raw.endswith(b"\r"):
        raw = raw[:-1]                      # CRLF files
    if raw.startswith(_BOM):
        raw = raw[3:]                       # a UTF-8 byte order mark is not content
    if not raw.strip():
        raise Reject("blank_line")
    if len(raw) > max_line_chars:
        if len(raw) > 4 * max_line_chars:
            raise Reject("over_long_line")
        try:
            n_chars = len(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise Reject("invalid_utf8") from None
        if n_chars > max_line_chars:
            raise Reject("over_long_line")
    try:
        obj = orjson.loads(raw)             # orjson validates UTF-8 itself (fast path)
    except orjson.JSONDecodeError:
        try:
            raw.decode("utf-8")             # tell bad bytes from bad JSON, on the error path only
        except UnicodeDecodeError:
            raise Reject("invalid_utf8") from None
        raise Reject("invalid_json") from None
    if not isinstance(obj, dict):
        raise Reject("not_an_object")
    return obj


def _text(value) -> str:
    if not isinstance(value, str):
        raise Reject("wrong_types")
    return value


def _turns(items, role_key: str, text_key: str, roles: dict) -> list[dict]:
    if not isinstance(items, list):
        raise Reject("wrong_types")
    out = []
    for m in items:
        if not isinstance(m, dict):
            raise Reject("wrong_types")
        role = m.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise Reject("wrong_types")
        role = roles[role]
        if role == "system" and m.get("name") in EVALS_NAMED:
            role = EVALS_NAMED[m["name"]]
        out.append({"role": role, "content": _text(m.get(text_key))})
    return out


def _evals(obj: dict) -> tuple[list[dict], object]:
    """evals registry row: input (str or chat list) + ideal (str or list of acceptable str)."""
    inp = obj["input"]
    messages = ([{"role": "user", "content": inp}] if isinstance(inp, str)
                else _turns(inp, "role", "content", ROLES))
    ideal = obj.get("ideal")
    if ideal is None or ideal == []:
        raise Reject("no_assistant_turn")   # model-graded evals rows carry no reference answer
    if isinstance(ideal, list):
        for x in ideal:
            _text(x)
        first = ideal[0]
    else:
        first = _text(ideal)
    return messages + [{"role": "assistant", "content": first}], ideal


def _messages(obj: dict) -> tuple[list[dict], object]:
    """Detect the schema by its defining key and return (messages, answer or None)."""
    if "messages" in obj:
        return _turns(obj["messages"], "role", "content", ROLES), None
    if "conversations" in obj:
        return _turns(obj["conversations"], "from", "value", SHAREGPT_ROLES), None
    if "instruction" in obj:
        instruction, extra = _text(obj["instruction"]), obj.get("input", "")
        prompt = instruction + ("\n\n" + _text(extra) if extra else "")
        if "output" not in obj:
            raise Reject("no_assistant_turn")
        return ([{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(obj["output"])}], None)
    if "input" in obj:
        return _evals(obj)
    raise Reject("unknown_schema")


def _verify(rg, messages: list[dict], answer: str) -> dict:
    """Enough to call reasoning-gym's score_answer(answer, entry) later, offline."""
    if not isinstance(rg, dict):
        raise Reject("wrong_types")
    name = rg.get("dataset", rg.get("name"))
    if not isinstance(name, str) or not isinstance(rg.get("metadata", {}), dict):
        raise Reject("wrong_types")
    question = next(m["content"] for m in messages if m["role"] == "user")
    out = {"dataset": name,
           "entry": {"question": question, "answer": answer, "metadata": rg.get("metadata", {})}}
    for key in ("seed", "index"):
        if key in rg:
            out[key] = rg[key]
    return out


def normalise(obj: dict) -> dict:
    """A parsed JSON object -> {"source", "messages", "answer"?, "verify"?}; raises Reject.

    The id is added by the caller (a hash of the normalised text, unique after exact dedup).
    """
    messages, answer = _messages(obj)
    if not messages:
        raise Reject("empty_turns")
    for m in messages:
        if not m["content"].strip():
            raise Reject("empty_turns")
    if not any(m["role"] == "assistant" for m in messages):
        raise Reject("no_assistant_turn")
    if not any(m["role"] == "user" for m in messages):
        raise Reject("empty_turns")         # an answer to nothing
    source = obj.get("source")
    if source is None:
        source = "unknown/" + ("chat" if "messages" in obj else "sharegpt" if "conversations"
                               in obj else "alpaca" if "instruction" in obj else "evals")
    elif not isinstance(source, str) or not source:
        raise Reject("wrong_types")
    record = {"source": source, "messages": messages}
    last = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    if answer is not None:
        record["answer"] = answer
    if "rg" in obj:
        record["answer"] = last
        record["verify"] = _verify(obj["rg"], messages, last)
    return record
