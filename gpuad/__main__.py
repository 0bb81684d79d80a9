"""python -m gpuad <verb> [options]: gpuad's command-line tools (``python -m gpuad <verb> --help``)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .cli import CommandError, Parser

# verb -> module with HELP, add_arguments(parser) and run(args) (see gpuad/cli.py); a new verb is
# one line here. Every verb module is imported to build --help: import optional packages in run().
VERBS = {
    "train": "gpuad.train",
    "train-lm": "gpuad.train_lm",
    "walk": "gpuad.walk",
}


def build_parser():
    parser = Parser(prog="python -m gpuad", description=__doc__.split(":", 1)[1].strip())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        sub = verbs.add_parser(verb, help=module.HELP, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CommandError as e:
        print(f"python -m gpuad {args.verb}: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
