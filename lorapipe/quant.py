"""bitsandbytes quantization for the merge and quantize stages: rebuild the exact weights a
k-bit adapter was trained against, and export a merged model as a reloadable bnb checkpoint.

    python -m stages.quantize --merged models/merged --heldout data/filtered/heldout.jsonl \
        --out models/quantized --metrics metrics/quantize.json

Imported lazily: `import bitsandbytes` happens only inside the functions that need it, so the
float paths (fp32/bf16/fp16 merges, method none) run without it.

Round trip = what a bnb layer computes with. For 4-bit, Params4bit quantizes the weight in the
dtype it was loaded in (`quant_state.dtype`, training.json's `dequant_dtype`) with
F.quantize_4bit(blocksize, compress_statistics=double_quant, quant_type); the layer's matmul
uses F.dequantize_4bit of that. For int8, Int8Params casts the weight to fp16 and takes
LLM.int8()'s row-wise absmax: CB = round(127 * W / SCB), SCB = max|W_row|; the layer's
weight is CB * SCB / 127. Reproducing these with the same calls gives bit-identical weights
(tests/test_merge.py checks it against a loaded bnb model).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger("lorapipe")

METHODS = ("none", "nf4", "fp4", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantError(ValueError):
    """A quantization request cannot be honoured as configured; the message says the fix."""


def _bnb_functional():
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        raise QuantError("this step needs bitsandbytes (k-bit adapter or quantize.method "
                         "nf4/fp4/int8); pip install the pinned bitsandbytes from "
                         "requirements.txt, or use a float precision / quantize.method: none") from e
    return F


def roundtrip(weight: torch.Tensor, spec: dict) -> torch.Tensor:
    """The weight exactly as the trained bnb layer saw it (dequantized, in its load dtype).

    spec is training.json's `quantization` (kbit.quant_spec of the trained model).
    """
    F = _bnb_functional()
    if spec["method"] == "bnb_4bit":
        dtype = DTYPES[spec["dequant_dtype"]]
        q, state = F.quantize_4bit(weight.to(dtype).contiguous(), blocksize=spec["blocksize"],
                                   compress_statistics=spec["double_quant"],
                                   quant_type=spec["quant_type"])
        return F.dequantize_4bit(q, state)
    if spec["method"] == "bnb_int8":
        if spec["has_fp16_weights"]:
            raise QuantError("int8 adapter trained with has_fp16_weights=True: bnb kept float "
                             "weights, so merge.target: original reproduces it")
        # Int8Params._quantize: fp16 first, then row-wise absmax; dequant = CB * SCB / 127
        cb, scb, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return F.int8_vectorwise_dequant(cb, scb)
    raise QuantError(f"unknown quantization method {spec['method']!r} in training.json; "
                     "expected bnb_4bit or bnb_int8 (written by the train stage)")


def bnb_config(method: str, double_quant: bool, compute_dtype: str):
    """BitsAndBytesConfig for quantize.method (None for none)."""
    if method not in METHODS:
        raise QuantError(f"quantize.method={method!r}; use one of {', '.join(METHODS)}")
    if method == "none":
        return None
    _bnb_functional()
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype])


def export(merged_dir: str | Path, out_dir: Path, method: str, double_quant: bool,
           compute_dtype: str) -> None:
    """Write merged_dir quantized by `method` into out_dir (weights + config; the caller
    copies tokenizer and provenance). `none` copies the merged weights unchanged."""
    merged_dir = Path(merged_dir)
    qcfg = bnb_config(method, double_quant, compute_dtype)
    if qcfg is None:
        for f in sorted(merged_dir.iterdir()):
            if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".index.json")
                                or f.name in ("config.json", "generation_config.json")):
                shutil.copy2(f, out_dir / f.name)
        return
    from transformers import AutoModelForCausalLM

    # non-quantized parts (embeddings, norms, lm_head) stay in the compute dtype
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, quantization_config=qcfg, dtype=DTYPES[compute_dtype],
        device_map={"": "cpu"})
    model.save_pretrained(out_dir)
    del model


def load(model_dir: str | Path, dtype: str):
    """A merged or quantized folder as transformers reloads it (bnb config from config.json)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype],
                                                device_map={"": "cpu"}).eval()


def validate(cfg) -> None:
    """Every problem of the quantize section at once, before any model is read."""
    errors = []
    if cfg.method not in METHODS:
        errors.append(f"quantize.method={cfg.method!r}: use one of {', '.join(METHODS)}")
    if cfg.compute_dtype not in DTYPES:
        errors.append(f"quantize.compute_dtype={cfg.compute_dtype!r}: use one of "
                      f"{', '.join(DTYPES)}")
    for name in ("fidelity_rows", "max_tokens", "batch"):
        if getattr(cfg, name) < 1:
            errors.append(f"quantize.{name}={getattr(cfg, name)} must be >= 1")
    if errors:
        raise QuantError("invalid quantize params:\n  " + "\n  ".join(errors))


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the safetensors weights in a model folder (what quantization shrinks)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
