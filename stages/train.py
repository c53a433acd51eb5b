"""Stage train: LoRA (or QLoRA: base.precision=nf4) on the filtered chat data -> models/adapter.

    python -m stages.train --base models/base --train data/filtered/train.jsonl \
        --heldout data/filtered/heldout.jsonl --out models/adapter \
        --checkpoints models/checkpoints --live dvclive --metrics metrics/train.json
"""
from lorapipe import watchdog  # first: the watchdog's set-up clock starts at this import

import time  # noqa: E402

from lorapipe import cli, config  # noqa: E402


def run(cfg, base_cfg, paths: dict, dog) -> dict:
    # imported here, after the watchdog started: importing torch / transformers / bitsandbytes
    # is part of the set-up it guards
    from lorapipe import trainer

    return trainer.fit(paths, base_cfg, cfg, dog)


def main(argv=None) -> None:
    started = time.time()
    args = cli.parser(__doc__, ["base", "train", "heldout", "out", "checkpoints", "live",
                                "metrics"]).parse_args(argv)
    cfg = cli.start("train", args)
    base_cfg = config.load(args.params, "base")
    cli.log.info("params.base: %s", config.dump(base_cfg))
    dog = watchdog.Watchdog(cfg.setup_stall_seconds, cfg.stall_seconds).start()
    paths = {k: getattr(args, k) for k in ("base", "train", "heldout", "out", "checkpoints",
                                           "live")}
    metrics = run(cfg, base_cfg, paths, dog)
    dog.stop()
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        cli.finish(args.metrics, metrics, started)


if __name__ == "__main__":
    main()
