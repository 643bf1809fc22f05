"""The `treadle` command.

Verbs that talk to a server (generate, chat, info, health) use only the SDK
(grpcio, protobuf). `serve` goes to the server's command through the
`treadle.commands` entry point (pyproject.toml), so the SDK never imports the
server and the client install needs neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..api.params import GenerationParams, PluginRequest
from .format_flags import FlagError, add_format_arguments, response_format_from_args
from .image_flags import add_image_arguments, images_from_args
from .tool_flags import add_tool_arguments, tool_flags_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treadle", description="Continuous-batching text generation over gRPC."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser(
        "serve",
        help="serve a model (default: the embedded SmolLM2-135M-Instruct); "
        "`treadle serve --help` for its flags",
        add_help=False,
    )
    serve.add_argument("serve_args", nargs=argparse.REMAINDER)

    generate = verbs.add_parser("generate", help="stream one answer to the terminal")
    generate.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    generate.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template)"
    )
    generate.add_argument(
        "--system",
        help="a system message (implies --chat, as --image, --tools and --tool-choice do)",
    )
    generate.add_argument("--json", action="store_true", help="print the result as JSON")
    add_image_arguments(generate, "the prompt (implies --chat)")
    chat = verbs.add_parser("chat", help="an interactive conversation (Ctrl-C stops an answer)")
    chat.add_argument("--system", help="a system message opening the conversation")
    add_image_arguments(chat, "the first question")
    for p in (generate, chat):
        add_connection_arguments(p)
        add_param_arguments(p)
        add_tool_arguments(p)
    for name, text in (("info", "the served model and its limits"), ("health", "server health")):
        add_connection_arguments(verbs.add_parser(name, help=text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = parse(argv)
    from . import commands

    verbs: dict[str, Callable[[argparse.Namespace], int]] = {
        "generate": commands.generate,
        "chat": commands.chat,
        "info": commands.info,
        "health": commands.health,
    }
    return verbs[args.verb](args)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments of a client verb, checked; a usage error exits 2 (argparse's way).

    For generate and chat, `args.response_format` is the format its flags ask for,
    `args.tool_flags` the tools and tool choice and `args.images` the --image files
    (their files read here, so an unreadable one is a usage error naming its flag).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):  # gRPC core aborts on one alone
        parser.error("--tls-cert and --tls-key go together (mutual TLS needs both)")
    if args.verb == "chat" and args.n not in (None, 1):
        parser.error("chat: -n/--n must be 1 (a conversation keeps one answer)")
    if args.verb in ("generate", "chat"):
        stdin_holds = "the conversation" if args.verb == "chat" else None
        if args.verb == "generate" and args.prompt == "-":
            stdin_holds = "the prompt"
        format_from_stdin = "-" in (args.json_schema, args.grammar)
        try:
            args.response_format = response_format_from_args(args, stdin_holds)
            tools_stdin = stdin_holds or ("the response format" if format_from_stdin else None)
            args.tool_flags = tool_flags_from_args(args, tools_stdin)
            args.images = images_from_args(args)
        except FlagError as exc:
            parser.error(str(exc))
    return args


def serve(argv: list[str]) -> int:
    """`treadle serve ARGS...`: the command registered as the `serve` entry point of the
    `treadle.commands` group (the server's), loaded only when asked for."""
    found = entry_points(group="treadle.commands", name="serve")
    try:
        command = next(iter(found)).load()
    except (StopIteration, ImportError) as e:
        print(
            f"treadle serve needs the server install: pip install 'treadle[server]' ({e!r})",
            file=sys.stderr,
        )
        return 2
    result: int = command(argv)
    return result


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--target",
        default=env("TREADLE_TARGET", "localhost:50051"),
        help="server address, 'dns:///name:port', or several comma-separated host:port "
        "(round robin) [TREADLE_TARGET]",
    )
    p.add_argument("--tls", action="store_true", help="use TLS (system roots unless --tls-ca)")
    p.add_argument("--tls-ca", type=Path, default=env("TREADLE_TLS_CA"), help="CA certificate")
    p.add_argument("--tls-cert", type=Path, default=env("TREADLE_TLS_CERT"), help="client cert")
    p.add_argument("--tls-key", type=Path, default=env("TREADLE_TLS_KEY"), help="client key")
    p.add_argument(
        "--tls-server-name",
        default=env("TREADLE_TLS_SERVER_NAME"),
        help="name checked in the server certificate (default: the target's host name, "
        "the first one's for several targets) [TREADLE_TLS_SERVER_NAME]",
    )
    p.add_argument("--token-file", type=Path, help="bearer token file (or TREADLE_TOKEN)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per call")


def add_param_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per GenerationParams field, named like the field."""
    group = p.add_argument_group("generation parameters (as in GenerationParams)")
    for f in dataclasses.fields(GenerationParams):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if f.name == "n":
            group.add_argument(
                "-n",
                flag,
                type=int,
                default=None,
                metavar="N",
                help="samples of the prompt (default 1); each is printed, labelled",
            )
        elif f.name == "plugins":
            group.add_argument(
                flag.removesuffix("s"),
                dest=f.name,
                action="append",
                type=plugin,
                metavar="NAME[=JSON]",
                help="enable a server plugin (repeatable)",
            )
        elif f.name == "response_format":
            add_format_arguments(p)  # --json-schema, --regex, ...: parse() reads them
        elif f.name == "logit_bias":
            group.add_argument(
                flag, action="append", type=token_bias, metavar="ID=BIAS", help="repeatable"
            )
        elif f.name == "bad_words_ids":
            group.add_argument(
                flag, action="append", type=token_ids, metavar="ID,ID,...", help="repeatable"
            )
        elif f.name == "stop_token_sequences":
            group.add_argument(
                flag.removesuffix("s"),
                dest=f.name,
                action="append",
                type=token_ids,
                metavar="ID,ID,...",
                help="token ids that end the output when it ends with them (repeatable)",
            )
        elif kind.startswith("list["):
            item = int if "int" in kind else str
            group.add_argument(flag, action="append", type=item, help="repeatable")
        elif kind == "bool":
            default = f.default
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            number = float if "float" in kind else int
            group.add_argument(flag, type=number, default=None, help=f"default {f.default}")


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    """The GenerationParams that the parameter flags describe (unset flags keep defaults;
    `response_format` is what parse() made of the format flags)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationParams):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = dict(value) if f.name == "logit_bias" else value
    return GenerationParams(**values)


# argparse converters: a bad value is reported by argparse, naming the flag.
def plugin(spec: str) -> PluginRequest:
    name, _, args = spec.partition("=")
    return PluginRequest(name=name, args=json.loads(args) if args else {})


def token_bias(spec: str) -> tuple[int, float]:
    token, _, bias = spec.partition("=")
    return int(token), float(bias)


def token_ids(spec: str) -> list[int]:
    return [int(t) for t in spec.split(",")]


if __name__ == "__main__":
    sys.exit(main())
