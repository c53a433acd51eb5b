"""GPU experiment: bf16 LoRA and nf4 QLoRA on SmolLM2, then the nf4 adapter merged three ways.

Issue 3 (train on a GPU: held-out loss and tokens/s of bf16 and nf4) and issue 4 (one nf4
adapter merged into the dequantized weights, into the original weights, and through PEFT's
4-bit merge_and_unload, which the merge stage refuses: KL, top-1 and held-out loss side by side).

    python bench/gpu_qlora.py --base W/base --train data/filtered/train.jsonl \
        --heldout data/filtered/heldout.jsonl --work W --out results/gpu/qlora.json \
        --steps 500 --batch 32

Values come from params.yaml; the overrides this experiment makes (steps, batch, rows) are
printed and recorded in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorapipe import watchdog  # noqa: E402  (its clock starts at import, as in stages.train)

import torch  # noqa: E402

from lorapipe import config, fidelity, files, kbit, lora  # noqa: E402


def train(args, precision: str) -> dict:
    from lorapipe import trainer

    base_cfg = dataclasses.replace(config.load(args.params, "base"), precision=precision)
    cfg = dataclasses.replace(config.load(args.params, "train"), steps=args.steps,
                              global_batch=args.batch, micro_batch=args.batch,
                              max_length=args.max_length, lr=args.lr,
                              warmup_steps=args.steps // 20, heldout_rows=args.heldout_rows,
                              eval_batch=32, log_steps=10, save_steps=args.steps)
    work = Path(args.work) / precision
    paths = {"base": args.base, "train": args.train, "heldout": args.heldout,
             "out": str(work / "adapter"), "checkpoints": str(work / "checkpoints"),
             "live": None}
    dog = watchdog.Watchdog(cfg.setup_stall_seconds, cfg.stall_seconds).start()
    metrics = trainer.fit(paths, base_cfg, cfg, dog)
    dog.stop()
    metrics["overrides"] = {k: getattr(cfg, k) for k in
                            ("steps", "global_batch", "micro_batch", "max_length", "lr",
                             "warmup_steps", "heldout_rows")}
    print(json.dumps({precision: metrics}), flush=True)
    return metrics


def merge_three_ways(args, adapter: Path) -> dict:
    """nf4 adapter: dequantized and original through the merge stage's code, and PEFT's 4-bit
    merge_and_unload (measured here only; lorapipe.merge refuses it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapipe import merge

    info = files.read_json(adapter / lora.TRAINING_JSON)
    ad = merge.read_adapter(adapter)
    tok = AutoTokenizer.from_pretrained(args.base)
    rows = fidelity.load_rows(args.heldout, args.fidelity_rows)
    seqs = fidelity.encode(tok, rows, args.max_length)
    trained = lora.load_trained(args.base, adapter, args.device)
    out = {}
    for target in ("dequantized", "original"):
        folder = Path(args.work) / f"merged-{target}"
        kw = {}
        if target == "dequantized":
            spec = info["quantization"]
            kw = {"quantized": merge.quantized_weights(args.base, spec), "spec": spec,
                  "weights_dtype": merge.train_dtype(info)}
        with files.atomic_dir(folder) as tmp:
            shards = merge.stream_merge(args.base, ad, tmp, target=target, dtype="float32",
                                        max_shard_bytes=2000 << 20, **kw)
            merge.write_folder(Path(args.base), adapter, tmp, shards,
                               {"target": target, "dtype": "float32"})
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     device_map={"": args.device}).eval()
        out[target] = fidelity.compare(trained, model, seqs, 32, tok.pad_token_id)
        del model
    base_cfg = config.from_dict(config.Base, info["params"]["base"], "training.json")
    peft4 = PeftModel.from_pretrained(lora.load_base(args.base, base_cfg, args.device), str(adapter))
    peft4 = peft4.merge_and_unload().eval()  # re-quantizes base + delta to nf4
    out["peft_4bit_merge"] = fidelity.compare(trained, peft4, seqs, 32, tok.pad_token_id)
    for name, m in out.items():
        print(f"{name:>16}: kl_mean {m['kl_mean']:.3e}  kl_max {m['kl_max']:.3f}  top1 "
              f"{m['top1_agree']:.4f}  heldout loss trained {m['loss_a']:.4f} merged "
              f"{m['loss_b']:.4f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base", "train", "heldout", "work", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--heldout-rows", type=int, default=512)
    p.add_argument("--fidelity-rows", type=int, default=256)
    p.add_argument("--precisions", default="bf16,nf4",
                   help="comma-separated; the nf4 adapter is then merged three ways")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    args = p.parse_args()
    files.setup_logging()
    started = time.time()
    result = {"device": (torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"), "command": " ".join(sys.argv),
              "versions": __import__("lorapipe.trainer").trainer.versions()}
    for precision in args.precisions.split(","):
        result[precision] = train(args, precision)
    if "nf4" in args.precisions.split(","):
        result["nf4_merge"] = merge_three_ways(args, Path(args.work) / "nf4" / "adapter")
    result["seconds"] = round(time.time() - started, 1)
    files.write_json(args.out, result)
    print(f"wrote {args.out}; repeat: {result['command']}")


if __name__ == "__main__":
    main()
