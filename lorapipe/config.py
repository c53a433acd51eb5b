"""Typed, strict views of params.yaml: one frozen dataclass per section.

params.yaml is the only home of values. The dataclasses below hold types, never defaults: a
missing key, an unknown key or a wrong type fails at once, and every problem of a section is
reported in one error (litgpt-style) so a user fixes them all in one edit.

    from lorapipe import config
    cfg = config.load("params.yaml", "filter")      # -> config.Filter
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """params.yaml does not describe a valid run; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Base:
    source: str            # pip:<pkg>==<ver> | hf:<repo>@<revision> | path:<dir>
    sha256: str            # of the source file (GGUF) or "" to skip for hf:/path: sources
    dtype: str             # storage dtype of the converted HF folder
    precision: str         # how train loads the base: fp32 | bf16 | fp16 | nf4 | fp4 | int8
    bnb_double_quant: bool  # k-bit loading: nested quantization of the absmax constants
    bnb_blocksize: int     # k-bit loading: block size of the 4-bit quantization
    bnb_compute_dtype: str  # k-bit loading: dtype of the dequantized matmuls


@dataclasses.dataclass(frozen=True)
class Collect:
    rows: int                       # total raw rows written
    seed: int
    evals_fraction: float           # share of rows drawn from the evals registry JSONL files
    generators: dict[str, float]    # reasoning-gym generator -> weight among generated rows
    shape_weights: dict[str, float]  # alpaca | messages | conversations -> weight for generated rows


@dataclasses.dataclass(frozen=True)
class Filter:
    seed: int
    workers: int                 # processes; 0 = one per core
    max_line_chars: int          # longer raw lines are rejected before JSON parsing
    min_tokens: int
    max_tokens: int
    chars_per_token_min: float   # bounds used to skip tokenizing rows a char count settles
    chars_per_token_max: float
    lang: str                    # ISO code the text must be in
    lang_min_score: float
    lang_min_chars: int          # shorter texts are not language-checked (too little signal)
    quality_min: float           # reject below this combined quality score
    minhash_perm: int
    minhash_bands: int
    shingle: int                 # words per shingle for near-duplicate detection
    near_dup_threshold: float    # estimated Jaccard at/above which a row is a near duplicate
    contam_ngram: int            # n for the n-gram overlap with benchmark prompts
    heldout_rows: int


# params.yaml section name -> its dataclass (one name everywhere: stage, section, metrics file)
SECTIONS: dict[str, type] = {
    "base": Base,
    "collect": Collect,
    "filter": Filter,
}


def _check_type(value, tp, where: str, errors: list[str]) -> None:
    """Append to errors when value does not match the annotation tp (str form resolved)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
        else:
            _collect(tp, value, where, errors)
        return
    if origin in (typing.Union, types.UnionType):
        sub: list[str] = []
        for arg in typing.get_args(tp):
            trial: list[str] = []
            _check_type(value, arg, where, trial)
            if not trial:
                return
            sub.extend(trial)
        errors.append(f"{where}: {value!r} matches none of {tp}")
        return
    if tp is type(None):
        if value is not None:
            errors.append(f"{where}: expected null, got {value!r}")
        return
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, v in enumerate(value):
            _check_type(v, item, f"{where}[{i}]", errors)
        return
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return
        for k, v in value.items():
            _check_type(k, kt, f"{where} key", errors)
            _check_type(v, vt, f"{where}.{k}", errors)
        return
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        errors.append(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _hints(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _collect(cls, raw: dict, where: str, errors: list[str]) -> None:
    hints = _hints(cls)
    for name in hints:
        if name not in raw:
            errors.append(f"{where}.{name}: missing (add it to params.yaml)")
    for name in raw:
        if name not in hints:
            errors.append(f"{where}.{name}: unknown key (known: {', '.join(hints)})")
    for name, tp in hints.items():
        if name in raw:
            _check_type(raw[name], tp, f"{where}.{name}", errors)


def _build(cls, raw: dict):
    hints = _hints(cls)
    kwargs = {}
    for name, tp in hints.items():
        value = raw[name]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value)
        elif tp is float:
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(cls, raw: dict, where: str):
    """Build dataclass cls from raw, raising one ConfigError listing every problem."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    _collect(cls, raw, where, errors)
    if errors:
        raise ConfigError("invalid params:\n  " + "\n  ".join(errors))
    return _build(cls, raw)


def read_yaml(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return raw


def load(path: str | Path, section: str):
    """Load one section of params.yaml as its dataclass (other sections are not validated)."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    raw = read_yaml(path)
    if section not in raw:
        raise ConfigError(f"{path}: section {section!r} missing")
    return from_dict(SECTIONS[section], raw[section], f"{path}:{section}")


def load_all(path: str | Path) -> dict:
    """Validate every known section of params.yaml at once; section name -> dataclass."""
    raw = read_yaml(path)
    out, errors = {}, []
    for name, cls in SECTIONS.items():
        try:
            out[name] = from_dict(cls, raw.get(name), f"{path}:{name}")
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def dump(cfg) -> str:
    """The resolved config as pretty JSON, printed first by every stage."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=False)
