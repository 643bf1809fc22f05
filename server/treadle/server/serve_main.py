"""The body of `treadle serve`: start the server, load the model, serve until a signal, drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from ..api.limits import RequestLimits
from ..scheduler.engine import Engine, EngineConfig
from ..worker.loader import DEFAULT_MODEL, ModelNotFoundError
from ..worker.plugins import PluginRegistry, default_registry
from ..worker.plugins.base import PluginArgumentError
from .server import ServerConfig, ServerStartError, TreadleServer

log = logging.getLogger("treadle.serve")


EXIT_OK = 0  # drained after SIGTERM/SIGINT
EXIT_START_FAILED = 1  # bad settings, port taken, TLS files wrong, model missing or unreadable
EXIT_ENGINE_FAILED = 70  # the engine's step thread died while serving (EX_SOFTWARE)


async def serve(args: argparse.Namespace) -> int:
    """Serve until a signal or an engine failure; returns the exit code (EXIT_*).

    Returns after the lame duck (`TreadleServer.lame_duck`) with the gRPC
    server still answering UNAVAILABLE: the caller ends the process without
    stopping it, so no call is ever answered CANCELLED (see server.py).
    """
    try:
        plugins = _plugins(args.plugin)
        server_config = _server_config(args)
    except (PluginArgumentError, ValueError, OSError) as exc:
        print(f"treadle serve: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    server = TreadleServer(server_config, args.model or DEFAULT_MODEL)
    try:
        await server.start()
    except ServerStartError as exc:
        print(f"treadle serve: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loading = asyncio.ensure_future(asyncio.to_thread(Engine.load, _engine_config(args), plugins))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # asked to stop while loading: nothing runs yet
        await server.lame_duck()
        return EXIT_OK
    try:
        engine = loading.result()
    except (ModelNotFoundError, OSError) as exc:  # OSError: e.g. an unreadable model folder
        print(f"treadle serve: {exc}", file=sys.stderr)
        await server.lame_duck()
        return EXIT_START_FAILED
    await server.serve(engine)
    failing = asyncio.ensure_future(server.failed.wait())
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    if server.failed.is_set():
        log.error(
            "the engine failed: exiting with %d so that the process is restarted",
            EXIT_ENGINE_FAILED,
        )
        await server.lame_duck()
        return EXIT_ENGINE_FAILED
    log.info("signal received: draining for up to %.0f s", server_config.grace_period)
    await server.lame_duck()
    return EXIT_OK


def _plugins(specs: list[str]) -> PluginRegistry:
    registry = default_registry()
    for spec in specs:
        registry.load(spec)
    return registry


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        max_batch_rows=args.max_batch_rows,
        max_seq_len=args.max_seq_len,
        kv_cache_memory=args.kv_cache_memory,
        decode_lanes_memory=args.decode_lanes_memory,
        block_size=args.block_size,
        step_token_budget=args.step_token_budget,
        prefix_cache=args.prefix_cache,
        max_waiting=args.max_waiting,
        seed=args.seed,
        priority_step=args.priority_step,
        limits=RequestLimits(
            default_max_new_tokens=args.default_max_new_tokens,
            max_stop_strings=args.max_stop_strings,
            max_plugins=args.max_plugins,
            max_top_logprobs=args.max_top_logprobs,
            max_samples=args.max_samples,
        ),
    )


def _server_config(args: argparse.Namespace) -> ServerConfig:
    token = os.environ.get("TREADLE_AUTH_TOKEN", "").strip() or None
    if args.auth_token_file is not None:
        try:
            token = args.auth_token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"--auth-token-file: cannot read {args.auth_token_file}: {exc.strerror or exc}"
            ) from exc
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty")
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host or args.host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        grace_period=args.grace_period,
        max_request_bytes=args.max_request_bytes,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=token,
        max_connection_age=args.max_connection_age or None,
        max_concurrent_streams=args.max_concurrent_streams or None,
        http_port=None if args.http_port < 0 else args.http_port,
        http_host=args.http_host,
    )
