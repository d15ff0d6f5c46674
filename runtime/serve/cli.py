"""``qcn-serve``: serve a compiled artifact over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import QcnError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcn-serve",
        description=(
            "Serve a qcn artifact directory over an OpenAI-compatible API (/v1/chat/completions, "
            "/v1/completions, /v1/models, /health, /metrics) with continuous batching, streaming "
            "and qwen3_coder tool calls. Sampling defaults come from the artifact's manifest."
        ),
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact directory written by `qcn-compile` (holds manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; use 0.0.0.0 to accept remote clients)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    p.add_argument("--queue-size", type=int, default=64, metavar="N", help="requests that may wait for a free sequence slot; more get HTTP 429 (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N", help="sequences decoded together, at most the manifest's runtime.max_batch (default: that value)")
    p.add_argument("--max-context", type=int, default=None, metavar="N", help="tokens per sequence, at most the model's max_context (default: that value)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, metavar="MB", help="memory for kept multi-turn states (exact state reuse); 0 = off (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="model id clients send and /v1/models lists (default: the artifact directory's name)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads per graph (default: one per physical core)")
    p.add_argument("--no-verify-hashes", action="store_true", help="skip the sha256 check of the artifact's files (faster start for large weights)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-v info, -vv debug)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qcn").setLevel({0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG))
    try:
        import uvicorn

        from .app import Server, create_app
        from .config import ServeConfig

        if args.prefix_cache_mb < 0:
            raise QcnError(f"--prefix-cache-mb must be >= 0 (0 = off), got {args.prefix_cache_mb}")
        config = ServeConfig(
            artifact=args.artifact, host=args.host, port=args.port, api_key=args.api_key, queue_size=args.queue_size,
            max_batch=args.max_batch, max_context=args.max_context, threads=args.threads,
            prefix_cache_bytes=args.prefix_cache_mb << 20, model_name=args.served_model_name, verify_hashes=not args.no_verify_hashes,
        )
        server = Server(config)
    except QcnError as e:
        print(f"qcn-serve: error: {e}", file=sys.stderr)
        return 2
    try:
        app = create_app(server)
        print(f"qcn-serve: serving {server.model_name!r} ({server.session.max_batch} slots) on http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning" if args.verbose == 0 else "info")
        return 0
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # e.g. the port is taken
        print(f"qcn-serve: error: cannot listen on {config.host}:{config.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
