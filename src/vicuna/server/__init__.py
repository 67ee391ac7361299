"""`vicuna serve`: one process serves one model over an OpenAI-compatible API (and the web UI), batching
concurrent requests. The app itself is built by `vicuna.server.app.create_app`."""

from __future__ import annotations

import argparse
import logging
import os

from vicuna.config import add_model_arguments, model_settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vicuna.server.app import STREAM_INTERVAL_MS

    add_model_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--model-name", help="the name clients use in 'model' (default: the model folder's name)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--api-keys",
        default=os.environ.get("VICUNA_API_KEYS"),
        help="comma-separated keys clients must send as 'Authorization: Bearer KEY' (default: $VICUNA_API_KEYS; none: open)",
    )
    g.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a batch row; more get 429"
    )
    g.add_argument("--max-batch-size", type=int, default=16, help="replies generated together at most")
    g.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="bound on the batch's KV cache, in tokens (default: max-batch-size x min(context window, 2048))",
    )
    g.add_argument(
        "--stream-interval",
        type=float,
        default=STREAM_INTERVAL_MS,
        metavar="MS",
        help="send a streamed reply's text at most every MS milliseconds after its first token, what was made "
        "meanwhile together: less CPU taken from decoding (0: every token as it is made)",
    )
    g.add_argument("--no-webui", action="store_true", help="serve the API only")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from vicuna.engine.loader import load_engine
    from vicuna.server.app import create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = load_engine(model_settings_from_args(args))
    keys = [k for k in (args.api_keys or "").split(",") if k.strip()]
    app = create_app(
        engine,
        model_name=args.model_name,
        api_keys=keys,
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        kv_cache_tokens=args.kv_cache_tokens,
        stream_interval_ms=args.stream_interval,
        webui=not args.no_webui,
    )
    batcher = app.state.batcher
    print(
        f"Serving {app.state.model_name} at http://{args.host}:{args.port}/v1 "
        f"(batch of {batcher.max_batch_size}, KV cache {batcher.kv_cache_tokens} tokens = "
        f"{batcher.kv_cache_bytes / 2**20:.0f} MiB{', API keys required' if keys else ''})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
