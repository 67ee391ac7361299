"""`vicuna serve`: one process serves one model over an OpenAI-compatible API (and the web UI), batching
concurrent requests. The app itself is built by `vicuna.server.app.create_app`."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import socket
import sys

from vicuna.config import add_model_arguments, model_settings_from_args
from vicuna.errors import Terminated, VicunaError

SHUTDOWN_GRACE_S = 3
# Each open connection takes a file descriptor, and shells and services mostly start a process allowed 1024
# (the soft limit). uvicorn gives a request's headers and body no time limit: a thousand connections that
# never finish a request, opened by anyone who reaches the port, refused every other client until they
# closed. The server raises its limit to this many as vLLM's does, toward the hard limit: a reverse proxy with
# timeouts is still what stops a client that holds connections open.
OPEN_FILES = 65535
# A streamed reply's text is handed to the event loop at most this often (its first token and its end at
# once), and what arrived together is sent in one write. Each wake of the event loop and each write took
# CPU from decoding on a small machine: on 2 cores, with `bench serve`'s client on them too, one stream
# ran at 0.94-0.95x the engine's own decode rate every token as made (0.90-0.91x with 8-bit weights,
# whose tokens come faster), and at 0.98-1.02x (0.97-1.0x) so. 20 ms is a little more than a 60 Hz
# screen's frame: text appears as smoothly; an API client gets 2-6 tokens at a time at these rates
# (`--stream-interval 0`: one). Here, not in .app, which it is for: `vicuna serve --help` then imports no
# FastAPI: 0.19 s instead of 0.99 s on 2 busy cores (median of 5).
STREAM_INTERVAL_MS = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument(
        "--model-name",
        type=model_names,
        metavar="NAME[,ALIAS...]",
        help="the name clients use in 'model' (default: the model folder's or .gguf file's name, a Hub repo's "
        "OWNER/NAME); more names after commas are aliases clients may use too (e.g. vicuna-7b,gpt-3.5-turbo "
        "for a tool that asks for that name)",
    )
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument(
        "--api-keys",
        default=os.environ.get("VICUNA_API_KEYS"),
        help="comma-separated keys clients must send as 'Authorization: Bearer KEY' (default: $VICUNA_API_KEYS; none: open)",
    )
    g.add_argument(
        "--allowed-origins",
        type=origin_list,
        default="",
        help="comma-separated origins (e.g. https://chat.example.com, or *) whose web pages may call the API "
        "from a browser (CORS; one named, not *, also from Chrome to this server on a private network); default: "
        "none besides the server's own",
    )
    g.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a batch row; more get 429"
    )
    g.add_argument("--max-batch-size", type=int, default=16, help="replies generated together at most")
    g.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="bound on the batch's KV cache, in tokens (default: max-batch-size x min(context window, 2048), "
        "as far as 80%% of the memory free after loading holds them (40%% for LLaMA models, whose cache grows by "
        "copying), and at least the context window)",
    )
    g.add_argument(
        "--stream-interval",
        type=float,
        default=STREAM_INTERVAL_MS,
        metavar="MS",
        help="send a streamed reply's text at most every MS milliseconds after its first token, what was made "
        "meanwhile together: less CPU taken from decoding (0: every token as it is made)",
    )
    g.add_argument(
        "--root-path",
        type=root_path,
        default="",
        metavar="PATH",
        help="the path prefix a reverse proxy serves this server under, with the prefix taken off the requests "
        "it passes on (nginx: location /vicuna/ { proxy_pass http://127.0.0.1:8000/; } with --root-path "
        "/vicuna): the web UI and /docs then link to their pages under it (default: none, served at /)",
    )
    g.add_argument("--no-webui", action="store_true", help="serve the API only")
    g.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least severe message logged",
    )


def origin_list(value: str) -> list[str]:
    """`--allowed-origins`: comma-separated, or FastChat's JSON list ('["*"]'), which was taken for one origin
    named '["*"]' that no browser sends, as is one with a path or a trailing slash: the server started and
    every page of another origin was refused."""
    if value.strip().startswith("["):
        try:
            origins = json.loads(value)
        except json.JSONDecodeError:
            origins = None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list of origins")
    else:
        origins = value.split(",")
    # as a browser sends its Origin, which the CORS check compares as a string: lowercase, no default port
    origins = [default_port_dropped(o.strip().lower()) for o in origins if o.strip()]
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
            raise argparse.ArgumentTypeError(
                f"{origin!r} is not an origin: scheme://host[:port] without a path (https://chat.example.com), or *"
            )
    return origins


def root_path(value: str) -> str:
    """`--root-path`: /a/b, without the trailing slash ("/" and "" are no prefix)."""
    path = value.strip().rstrip("/")
    if path and (not path.startswith("/") or not re.fullmatch(r"[A-Za-z0-9/._~!$&'()*+,;=:@%-]+", path)):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a URL path: /PREFIX as the proxy serves it (e.g. /vicuna), without scheme or host"
        )
    return path


def default_port_dropped(origin: str) -> str:
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin.removesuffix(port)
    return origin


WSAEACCES = 10013  # Windows' errno for a port it does not let this program bind


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use is said at once, not after it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        if sys.platform != "win32":  # a restart binds while the last run's connections are in TIME_WAIT;
            # on Windows it would let this socket bind a port another server is listening on
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except socket.gaierror as err:
        raise VicunaError(
            f"cannot listen on {host}: no such address ({err.strerror}); --host takes an address or name of "
            "this machine (0.0.0.0: every interface)"
        ) from None
    except OSError as err:  # the hint for a busy port was given for any error, a --host typo's included
        hint = {
            errno.EADDRINUSE: "is another server running there? Choose another --port",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; use one of its own, or 0.0.0.0 "
            "for every interface",
            errno.EACCES: "ports below 1024 need privileges; choose a --port above 1023",
            # Windows' WSAEACCES: a port it keeps for itself (Hyper-V, WSL 2 and Docker reserve ranges of
            # them, which no program is seen listening on) or that a program holds for its own use
            WSAEACCES: "Windows keeps this port from programs (`netsh interface ipv4 show excludedportrange "
            "protocol=tcp` lists the ranges it keeps), or another program holds it; choose another --port",
        }.get(err.errno)
        raise VicunaError(
            f"cannot listen on {host}:{port}: {err.strerror or err}" + (f"; {hint}" if hint else "")
        ) from None
    return sock


def base_url(host: str, port: int) -> str:
    """The URL to print for a server listening on `host`: a wildcard address (0.0.0.0, ::) is no address
    to open, so this machine's name stands for it; an IPv6 address goes in brackets."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def model_names(text: str) -> list[str]:
    """`--model-name`'s comma-separated names: the model's name, then its aliases."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; write NAME or NAME,ALIAS,...")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names one model twice")
    return names


def open_files_raised(target: int = OPEN_FILES) -> int | None:
    """Raise this process's soft limit on open files to `target`, or to the hard limit below it; the soft
    limit now (None on Windows, which has no such limit). Where the system refuses it stays as it was, with
    a warning: macOS says its hard limit is unlimited but refuses more than its kernel's cap (often 10240)
    with EINVAL, which stopped `vicuna serve` there with a traceback before it loaded the model."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as err:  # macOS: a hard limit said unlimited, a kernel cap far below
            logging.getLogger(__name__).warning(
                "cannot raise the limit on open files from %s to %s (%s): the server takes about that many "
                "connections at once; `ulimit -n` raises it",
                soft,
                wanted,
                err,
            )
            return soft
        soft = wanted
    return soft


class QuietProbes(logging.Filter):
    """Leaves out of the access log the answered probes of a load balancer (/health) and of Prometheus
    (/metrics): every few seconds each, they made most of a quiet server's log. A failed one stays in."""

    def __init__(self, root_path: str) -> None:
        super().__init__()
        self.root_path = root_path

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's access line: client, method, path with query, HTTP version, status
        if not (isinstance(args, tuple) and len(args) == 5 and isinstance(args[4], int)):
            return True
        path = str(args[2]).split("?")[0].removeprefix(self.root_path)
        return not (path in ("/health", "/metrics") and args[4] < 400)


def quiet_probes(root_path: str, log_level: str) -> None:
    """`QuietProbes` on uvicorn's access log, below debug; in place of an earlier server's in this process,
    whose filter had kept hiding probes from a later server run at debug."""
    access = logging.getLogger("uvicorn.access")
    for earlier in [f for f in access.filters if isinstance(f, QuietProbes)]:
        access.removeFilter(earlier)
    if log_level != "debug":
        access.addFilter(QuietProbes(root_path))


def check_flags(args: argparse.Namespace) -> None:
    """The server's own flags, before minutes go into loading the model."""
    from vicuna.server.app import check_settings

    if not 0 < args.port < 65536:
        raise VicunaError(f"--port must be 1-65535, not {args.port}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise VicunaError("--kv-cache-tokens must be positive")
    if args.api_keys is not None and not args.api_keys.replace(",", "").strip():
        # `--api-keys "$KEY"` with $KEY unset served everyone, said only by a word left out of the startup line
        raise VicunaError(
            f"--api-keys (or $VICUNA_API_KEYS) is {args.api_keys!r}, which holds no key; give at least one, "
            "or leave both out (unset VICUNA_API_KEYS) to serve without keys"
        )
    check_settings(args.max_queue, args.max_batch_size, args.stream_interval)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from vicuna.engine.loader import load_engine
    from vicuna.engine.memory import gib
    from vicuna.server.app import create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    check_flags(args)
    open_files_raised()
    sock = listen(args.host, args.port)
    engine = load_engine(model_settings_from_args(args))
    keys = [k for k in (args.api_keys or "").split(",") if k.strip()]
    app = create_app(
        engine,
        model_name=args.model_name[0] if args.model_name else None,
        aliases=args.model_name[1:] if args.model_name else (),
        api_keys=keys,
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        kv_cache_tokens=args.kv_cache_tokens,
        stream_interval_ms=args.stream_interval,
        webui=not args.no_webui,
        allowed_origins=args.allowed_origins,
    )
    batcher = app.state.batcher
    base = base_url(args.host, args.port)
    print(
        f"Serving {app.state.model_name} at {base}/v1{'' if args.no_webui else f', web UI at {base}/'} "
        f"(batch of {batcher.max_batch_size}, KV cache {batcher.kv_cache_tokens} tokens = "
        f"{gib(batcher.kv_cache_bytes)}{', as much as free memory holds' if batcher.kv_cut_to_memory else ''}"
        f"{', API keys required' if keys else ''})",
        flush=True,
    )
    quiet_probes(args.root_path, args.log_level)
    # Ctrl-C: open connections (a web UI tab keeps one) get SHUTDOWN_GRACE_S to end, then are closed and
    # the running replies cancelled; without a bound the server waited for every tab to close.
    config = uvicorn.Config(
        app,
        log_config=None,  # uvicorn's lines as ours (above): with the time, on stderr, not two formats on two streams
        log_level=args.log_level,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        lifespan="on",
        root_path=args.root_path,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:  # the replies end first, then their streams
            batcher.stop()
            super().handle_exit(sig, frame)

    try:
        Server(config).run(sockets=[sock])
    except Terminated:  # uvicorn raises SIGTERM again once it has shut down: the server stopped as asked,
        return 0  # a success, as gunicorn and TGI say it (an exit status of 143 fails a `systemctl stop`)
    return 0
