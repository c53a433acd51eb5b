"""Stage quantize: export the merged model through bitsandbytes (none | nf4 | fp4 | int8) as a
folder from_pretrained reloads, and measure what quantization cost against the merged model.

    python -m stages.quantize --merged models/merged --heldout data/filtered/heldout.jsonl \
        --out models/quantized --metrics metrics/quantize.json
"""
import shutil
import time
from pathlib import Path

from lorapipe import cli, fidelity, files, merge, quant


def measure(cfg, merged: Path, quantized: Path, heldout: Path, merged_dtype: str) -> dict:
    """Teacher-forced fidelity of the quantized model to the merged one, and both losses."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quantized)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = fidelity.encode(tok, fidelity.load_rows(heldout, cfg.fidelity_rows), cfg.max_tokens)
    m = fidelity.compare(quant.load(merged, merged_dtype), quant.load(quantized, cfg.compute_dtype),
                         seqs, cfg.batch, pad_id)
    return {"kl_mean": m["kl_mean"], "kl_max": m["kl_max"], "top1_agree": m["top1_agree"],
            "heldout_loss_merged": m["loss_a"], "heldout_loss_quantized": m["loss_b"],
            "heldout_loss_delta": m["loss_b"] - m["loss_a"], "fidelity_rows": len(seqs),
            "fidelity_tokens": m["tokens"]}


def run(cfg, merged: Path, heldout: Path, out: Path) -> dict:
    started = time.time()
    quant.validate(cfg)                                   # seconds, before any model is read
    prov = files.read_json(merged / "provenance.json")
    with files.atomic_dir(out) as tmp:
        quant.export(merged, tmp, cfg.method, cfg.double_quant, cfg.compute_dtype)
        for f in sorted(merged.iterdir()):                # tokenizer, chat template, training.json
            if f.is_file() and not (tmp / f.name).exists() and f.name != "provenance.json" \
                    and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        files.write_json(tmp / "provenance.json", {
            "source": "quantize", "method": cfg.method, "double_quant": cfg.double_quant,
            "compute_dtype": cfg.compute_dtype, "merged": prov,
            "files": {w: files.sha256_file(tmp / w) for w in weights}})
        quant_seconds = time.time() - started
        metrics = measure(cfg, merged, tmp, heldout, prov["dtype"])
        size, merged_size = quant.weight_bytes(tmp), quant.weight_bytes(merged)
    return {"method": cfg.method, "bytes": size, "merged_bytes": merged_size,
            "size_ratio": round(size / merged_size, 4), **metrics,
            "quantize_seconds": round(quant_seconds, 2),
            "peak_rss_mb": round(merge.peak_rss_mb(), 1),
            "seconds": round(time.time() - started, 2)}


def main(argv=None) -> None:
    started = time.time()
    args = cli.parser(__doc__, ["merged", "heldout", "out", "metrics"]).parse_args(argv)
    cfg = cli.start("quantize", args)
    cli.finish(args.metrics, run(cfg, Path(args.merged), Path(args.heldout), Path(args.out)),
               started)


if __name__ == "__main__":
    main()
