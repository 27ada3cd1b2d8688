"""Run modsync as a csync replica and nothing else (``modsync serve --csync`` is the verb).

    python -m engine.csync.serve --store S --listen 127.0.0.1:2005 [--servername NAME]

Useful where only the csync side is wanted, e.g. to profile it alone.

Prints ``listening on HOST:PORT`` once the port is bound (port 0 picks one),
then serves until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..store import Store
from .server import serve


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.csync.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="the modsync store to replicate into")
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 2005),
                    help="HOST:PORT to listen on (default 127.0.0.1:2005)")
    ap.add_argument("--servername", default="modsync",
                    help="name in the banner and in generated sieve messages")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = Store.open(args.store)
    host, port = args.listen

    async def run():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)

        def ready(bound):
            print(f"listening on {host}:{bound}", flush=True)
        await serve(store, host, port, servername=args.servername, ready=ready)

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
