"""The `treadle` command.

Verbs that talk to a server use only the SDK (grpcio, protobuf); `serve`
imports the server lazily, so the client install needs neither torch nor
transformers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treadle", description="Continuous-batching text generation over gRPC."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser(
        "serve",
        help="serve a model (default: the embedded SmolLM2-135M-Instruct)",
        description="Serve a model. Every flag can also be set by the environment "
        "variable named in its help.",
    )
    from treadle.scheduler.serve_cli import add_serve_arguments

    add_serve_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "serve":
        from treadle.scheduler.serve_cli import run_serve

        return run_serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
