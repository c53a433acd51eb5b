"""Peak memory of the streaming merge vs PEFT merge_and_unload on a ~1B Llama-shape model (CPU).

    .venv/bin/python bench/merge_memory.py                       # TinyLlama-1.1B shape, bf16
    .venv/bin/python bench/merge_memory.py --layers 4 --keep DIR # smaller, keep the files

Builds a random bf16 model shard by shard (never whole in memory) and a random rank-16 LoRA
on every projection, then runs each merge in its own subprocess and reads that process's
peak RSS (ru_maxrss). Acceptance (issue 4): streaming peak <= 0.5 x the model's bytes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
        "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def build(base: Path, adapter: Path, a) -> int:
    """Random bf16 Llama in one shard per layer + a PEFT-format LoRA; returns weight bytes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lorapipe import files

    torch.manual_seed(0)
    kv = a.hidden // a.heads * a.kv_heads
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, tie_word_embeddings=False, dtype="bfloat16")
    base.mkdir(parents=True)
    cfg.save_pretrained(base)
    shapes = {"q_proj": (a.hidden, a.hidden), "k_proj": (kv, a.hidden), "v_proj": (kv, a.hidden),
              "o_proj": (a.hidden, a.hidden), "gate_proj": (a.ffn, a.hidden),
              "up_proj": (a.ffn, a.hidden), "down_proj": (a.hidden, a.ffn)}
    groups = [{"model.embed_tokens.weight": (a.vocab, a.hidden)}]
    for i in range(a.layers):
        g = {f"model.layers.{i}.{PROJ[p]}.{p}.weight": s for p, s in shapes.items()}
        g.update({f"model.layers.{i}.input_layernorm.weight": (a.hidden,),
                  f"model.layers.{i}.post_attention_layernorm.weight": (a.hidden,)})
        groups.append(g)
    groups.append({"model.norm.weight": (a.hidden,), "lm_head.weight": (a.vocab, a.hidden)})
    weight_map, total, lora = {}, 0, {}
    for n, g in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in g.items()}
        save_file(tensors, base / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        for k, (out_f, in_f) in ((k, s) for k, s in g.items() if k.endswith("proj.weight")):
            m = "base_model.model." + k.removesuffix(".weight")
            lora[m + ".lora_A.weight"] = torch.randn(a.rank, in_f) * 0.01
            lora[m + ".lora_B.weight"] = torch.randn(out_f, a.rank) * 0.01
        del tensors
    files.write_json(base / "model.safetensors.index.json",
                     {"metadata": {"total_size": total}, "weight_map": weight_map})
    shas = {p.name: files.sha256_file(p) for p in sorted(base.glob("*.safetensors"))}
    prov = {"source": "bench:random-llama", "input_sha256": None, "files": shas,
            "dtype": "bfloat16", "parameters": total // 2}
    files.write_json(base / "provenance.json", prov)
    adapter.mkdir(parents=True)
    LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(PROJ),
               task_type="CAUSAL_LM").save_pretrained(adapter)
    save_file(lora, adapter / "adapter_model.safetensors")
    files.write_json(adapter / "training.json", {
        "base_provenance": prov, "precision": "bf16", "quantization": None,
        "params": {}, "seed": 0, "versions": {}, "device": "cpu"})
    return total


BUILD = """
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, {repo!r}); sys.path.insert(0, {repo!r} + "/bench")
from merge_memory import build
total = build(Path({base!r}), Path({adapter!r}), argparse.Namespace(**{args!r}))
print(json.dumps({{"total": total}}))
"""

STREAMING = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from lorapipe import merge
t = time.time()
out = Path({out!r}); out.mkdir()
ad = merge.read_adapter({adapter!r})
merge.stream_merge({base!r}, ad, out, target="original", dtype="bfloat16",
                   max_shard_bytes={shard} << 20)
print(json.dumps({{"peak_rss_mb": merge.peak_rss_mb(), "seconds": time.time() - t}}))
"""

PEFT = """
import json, sys, time
import torch
sys.path.insert(0, {repo!r})
from lorapipe import merge
from peft import PeftModel
from transformers import AutoModelForCausalLM
t = time.time()
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
model = merge.peft_merge(PeftModel.from_pretrained(model, {adapter!r}))
model.save_pretrained({out!r}, max_shard_size="{shard}MB")
print(json.dumps({{"peak_rss_mb": merge.peak_rss_mb(), "seconds": time.time() - t}}))
"""


def child(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22)       # TinyLlama-1.1B shape
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shard-mb", type=int, default=256)
    p.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep or tmp)
        t = time.time()
        total = child(BUILD.format(repo=str(REPO), base=str(work / "base"),
                                   adapter=str(work / "adapter"), args=vars(a)))["total"]
        print(f"built {total / 2**30:.2f} GiB bf16 model ({total // 2:,} parameters) in "
              f"{time.time() - t:.0f} s", flush=True)
        kw = {"repo": str(REPO), "base": str(work / "base"), "adapter": str(work / "adapter"),
              "shard": a.shard_mb}
        s = child(STREAMING.format(out=str(work / "streaming"), **kw))
        q = child(PEFT.format(out=str(work / "peft"), **kw))
    model_mb = total / 2**20
    print(f"\ncommand: {' '.join([sys.executable] + sys.argv)}")
    print(f"{'merge':<28}{'peak RSS MiB':>14}{'x model bytes':>15}{'seconds':>9}")
    for name, r in (("streaming (lorapipe.merge)", s), ("PEFT merge_and_unload", q)):
        print(f"{name:<28}{r['peak_rss_mb']:>14.0f}{r['peak_rss_mb'] / model_mb:>15.2f}"
              f"{r['seconds']:>9.1f}")
    print(f"model weights {model_mb:.0f} MiB; streaming / PEFT peak = "
          f"{s['peak_rss_mb'] / q['peak_rss_mb']:.2f}; acceptance streaming <= 0.5 x model: "
          f"{'PASS' if s['peak_rss_mb'] <= 0.5 * model_mb else 'FAIL'}")


if __name__ == "__main__":
    main()
