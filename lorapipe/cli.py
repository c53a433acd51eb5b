"""The shared shape of every stage's main(): paths in, resolved config printed, metrics out.

A stage is `python -m stages.<name> --<path> ... --metrics metrics/<name>.json`; every path
comes from dvc.yaml's cmd, every value from params.yaml's section <name>.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from lorapipe import config, files

log = logging.getLogger("lorapipe")


def parser(doc: str | None, paths: list[str]) -> argparse.ArgumentParser:
    """An argument parser taking each of `paths` as a required --flag, plus --params."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    for name in paths:
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--params", default="params.yaml", help="the params file (dvc's default)")
    return p


def start(section: str, args: argparse.Namespace):
    """Set up logging, load and validate the section, print the resolved config first."""
    files.setup_logging()
    cfg = config.load(args.params, section)
    paths = {k: v for k, v in vars(args).items() if k != "params"}
    log.info("stage %s\npaths: %s\nparams.%s: %s", section, json.dumps(paths), section,
             config.dump(cfg))
    return cfg


def finish(metrics_path: str, metrics: dict, started: float) -> None:
    metrics = dict(metrics)
    metrics.setdefault("seconds", round(time.time() - started, 2))
    files.write_json(metrics_path, metrics)
    log.info("metrics -> %s\n%s", metrics_path, json.dumps(metrics, indent=2, sort_keys=True))
