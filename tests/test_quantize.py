"""Quantize stage: a bnb export that from_pretrained reloads and generates with, its cost
against the merged model measured, `none` exact, bad params refused before loading."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorapipe import config, files, quant

REPO = Path(__file__).resolve().parents[1]
QUANT = dict(method="nf4", double_quant=True, compute_dtype="float32", fidelity_rows=4,
             max_tokens=64, batch=4)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"Name {i} colours."},
                                       {"role": "assistant", "content": "Red, green, blue."}]}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_stage(merged, heldout, out, **over):
    from stages import quantize as stage

    return stage.run(config.Quantize(**{**QUANT, **over}), merged, heldout, out)


def test_nf4_reloads_with_from_pretrained_and_generates(tiny_base, heldout, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = run_stage(tiny_base, heldout, tmp_path / "q")
    assert m["method"] == "nf4" and 0 < m["bytes"] < m["merged_bytes"]
    assert 0 < m["kl_mean"] < 0.05 and m["top1_agree"] > 0.5   # a lossy but close copy
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    layers = [n for n, x in model.named_modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and model.lm_head.weight is model.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == ids.shape[1] + 5
    prov = files.read_json(tmp_path / "q" / "provenance.json")
    assert prov["method"] == "nf4" and prov["merged"]["files"] == \
        files.read_json(tiny_base / "provenance.json")["files"]


def test_none_is_an_exact_copy(tiny_base, heldout, tmp_path):
    m = run_stage(tiny_base, heldout, tmp_path / "q", method="none")
    assert m["kl_mean"] == 0.0 and m["top1_agree"] == 1.0 and m["size_ratio"] == 1.0
    assert m["heldout_loss_delta"] == 0.0


def test_bad_params_fail_before_loading(tiny_base, heldout, tmp_path):
    with pytest.raises(quant.QuantError) as e:
        run_stage(tiny_base, heldout, tmp_path / "q", method="gptq", compute_dtype="int4")
    assert "quantize.method" in str(e.value) and "quantize.compute_dtype" in str(e.value)
    assert not (tmp_path / "q").exists()


def test_cli_int8(tiny_base, heldout, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["quantize"].update(method="int8", fidelity_rows=2, max_tokens=32, batch=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.quantize", "--merged", str(tiny_base), "--heldout",
           str(heldout), "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "q.json"),
           "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = files.read_json(tmp_path / "q.json")
    assert m["method"] == "int8" and m["bytes"] < m["merged_bytes"] and m["kl_mean"] > 0
    assert {"size_ratio", "top1_agree", "heldout_loss_delta", "seconds"} <= set(m)
