"""Stage collect: write the default raw instruction set (reasoning-gym + evals registry rows).

    python -m stages.collect --out data/raw/instructions.jsonl --metrics metrics/collect.json

Bring your own data instead: put your JSONL at data/raw/instructions.jsonl and `dvc add` it
(see README); the filter reads any of the native shapes this stage writes.
"""
import time
from pathlib import Path

from lorapipe import cli
from lorapipe import collect


def run(cfg, out: Path) -> dict:
    started = time.time()
    metrics = collect.write(cfg, Path(out))
    seconds = time.time() - started
    metrics.update(seconds=round(seconds, 2), rows_per_s=round(metrics["rows"] / seconds, 1))
    return metrics


def main(argv=None) -> None:
    started = time.time()
    args = cli.parser(__doc__, ["out", "metrics"]).parse_args(argv)
    cfg = cli.start("collect", args)
    cli.finish(args.metrics, run(cfg, Path(args.out)), started)


if __name__ == "__main__":
    main()
