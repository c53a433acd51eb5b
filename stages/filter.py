"""Stage filter: normalise, clean, deduplicate and decontaminate the raw rows; split off held-out.

    python -m stages.filter --input data/raw/instructions.jsonl --base models/base \
        --train data/filtered/train.jsonl --heldout data/filtered/heldout.jsonl \
        --rejects data/filtered/rejects.jsonl --metrics metrics/filter.json

Every input line ends up in exactly one of train, heldout or rejects (with its reason), and
metrics/filter.json says input_rows == train_rows + heldout_rows + sum(rejected).
"""
import time

from lorapipe import cli, filtering


def run(cfg, input, base, train, heldout, rejects) -> dict:
    return filtering.run(cfg, input, base, train, heldout, rejects)


def main(argv=None) -> None:
    started = time.time()
    args = cli.parser(__doc__, ["input", "base", "train", "heldout", "rejects", "metrics"]
                      ).parse_args(argv)
    cfg = cli.start("filter", args)
    cli.finish(args.metrics, run(cfg, args.input, args.base, args.train, args.heldout,
                                 args.rejects), started)


if __name__ == "__main__":
    main()
