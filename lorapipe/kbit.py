"""Everything bitsandbytes-specific: the BitsAndBytesConfig for a k-bit precision and the
quantization actually applied to a loaded model.

Imported lazily: the rest of lorapipe imports (and fp32/bf16/fp16 training runs) without
bitsandbytes installed; only a k-bit precision (nf4 | fp4 | int8) reaches `import bitsandbytes`.

    from lorapipe import kbit
    qcfg = kbit.bnb_config(base_cfg)            # None for fp32 / bf16 / fp16
    model = AutoModelForCausalLM.from_pretrained(dir, quantization_config=qcfg, device_map=...)
    spec = kbit.quant_spec(model)               # what bnb really did, written to training.json

Block size: transformers' BitsAndBytesConfig has no block-size argument; its loader builds
`bnb.nn.Params4bit(...)` without one, so the block size is Params4bit's default (64 in
bitsandbytes 0.50.2). `bnb_config` checks base.bnb_blocksize against that default and fails
before any loading if they differ; `quant_spec` then reads the real value from the modules.
"""
from __future__ import annotations

import inspect

KBIT = ("nf4", "fp4", "int8")
FLOAT = ("fp32", "bf16", "fp16")
PRECISIONS = FLOAT + KBIT


class KbitError(ValueError):
    """A k-bit precision cannot be loaded as configured; the message says how to fix it."""


def is_kbit(precision: str) -> bool:
    return precision in KBIT


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # only reached for nf4 / fp4 / int8
        raise KbitError("base.precision is k-bit but bitsandbytes is not installed; "
                        "pip install bitsandbytes (see requirements.txt) or use fp32/bf16/fp16"
                        ) from e
    return bnb


def bnb_default_blocksize() -> int:
    """The block size bnb.nn.Params4bit uses when the caller (transformers) passes none."""
    bnb = _bnb()
    sig = inspect.signature(bnb.nn.Params4bit.__new__)
    default = sig.parameters["blocksize"].default
    # bitsandbytes 0.50.2: blocksize=None in the signature, replaced by 64 in the body
    return 64 if default is None else int(default)


def _torch_dtype(name: str):
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise KbitError(f"base.bnb_compute_dtype={name!r} is not a torch dtype; "
                        "use float32, bfloat16 or float16")
    return dt


def bnb_config(base_cfg):
    """BitsAndBytesConfig for base_cfg.precision, or None for the float precisions."""
    precision = base_cfg.precision
    if precision not in PRECISIONS:
        raise KbitError(f"base.precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    if not is_kbit(precision):
        return None
    from transformers import BitsAndBytesConfig

    _bnb()
    if precision == "int8":
        # LLM.int8(): 6.0 is transformers' (and the paper's) outlier threshold; recorded by
        # quant_spec from the loaded modules, not assumed
        return BitsAndBytesConfig(load_in_8bit=True)
    real = bnb_default_blocksize()
    if base_cfg.bnb_blocksize != real:
        raise KbitError(
            f"base.bnb_blocksize={base_cfg.bnb_blocksize} but transformers' BitsAndBytesConfig "
            f"cannot set a block size and bitsandbytes will use {real}; set base.bnb_blocksize: "
            f"{real} in params.yaml")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision,
        bnb_4bit_use_double_quant=base_cfg.bnb_double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(base_cfg.bnb_compute_dtype),
    )


def _dtype_name(dt) -> str | None:
    return None if dt is None else str(dt).removeprefix("torch.")


def quant_spec(model) -> dict | None:
    """The quantization bitsandbytes really applied, read from the loaded modules.

    None when the model holds no bnb layer. Every bnb layer must agree (one spec per model);
    `modules` counts them and `skipped` lists Linear layers bnb left in float (lm_head).
    """
    import sys

    import torch

    # no bnb layer can exist unless bitsandbytes was imported: skip its slow import otherwise
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None

    specs, skipped = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            specs[name] = {
                "method": "bnb_4bit", "quant_type": qs.quant_type,
                "blocksize": int(qs.blocksize), "double_quant": bool(qs.nested),
                "compute_dtype": _dtype_name(mod.compute_dtype),
                "storage_dtype": _dtype_name(mod.weight.dtype),
                # the dtype dequantize() returns: what merge must rebuild the weights in
                "dequant_dtype": _dtype_name(qs.dtype),
            }
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            specs[name] = {"method": "bnb_int8", "threshold": float(mod.state.threshold),
                           "has_fp16_weights": bool(mod.state.has_fp16_weights)}
        elif isinstance(mod, torch.nn.Linear):
            skipped.append(name)
    if not specs:
        return None
    distinct = {tuple(sorted(s.items())) for s in specs.values()}
    if len(distinct) != 1:
        raise KbitError(f"bnb layers are quantized in {len(distinct)} different ways: "
                        f"{sorted(distinct)}; expected one spec for the whole model")
    spec = dict(next(iter(specs.values())))
    spec["modules"] = len(specs)
    # LoRA's own lora_A / lora_B are float by design; only base Linears bnb left out count
    spec["skipped"] = sorted(n for n in skipped if ".lora_" not in n)
    return spec


def training_numerics(model):
    """Make bnb 4-bit layers compute on CPU as they did in training, and return the model.

    In eval mode on a CPU with AVX512-BF16, Linear4bit repacks its weight and runs a fused
    kernel that casts the activations and absmax to bf16 (bitsandbytes 0.50.2,
    backends/cpu/ops.py gemv_4bit); training (train mode) ran dequantize_4bit + an fp32
    matmul. Measured on SmolLM2-135M down_proj: 0.36% relative output difference, enough for
    KL ~1.5e-3 against an exact merge. Fidelity compares against the training numerics.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model
