"""``modsync init``: create a store."""
from __future__ import annotations

import argparse

from .config import ConfigError
from .options import add_verb

DOC = """\
create a store in an empty directory

Creates the LMDB database (STORE/db), the blob directory (STORE/blobs) and,
last, the STORE/FORMAT marker that every other command checks for; a
directory without it is refused (for example an unmounted volume).  The
directory may be missing; if it exists it must be empty.

Bodies are compressed with zstd at --compression-level (1 fast .. 22
small; default 3, or `[init] compression_level` in the config file).  The
level is stored with the store and used by every later writer.

example:
  modsync init --store /srv/modsync
"""


def compression_level(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 22:
        raise argparse.ArgumentTypeError(f"{text!r}: give a zstd level from 1 to 22")
    return n


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "init", run, DOC)
    p.add_argument("--compression-level", type=compression_level, metavar="N",
                   help="zstd level for bodies, 1..22 (default 3)")


def run(ctx) -> None:
    path = ctx.store_path()
    level = ctx.setting(ctx.args.compression_level, "init.compression_level", 3)
    if not 1 <= level <= 22:   # only the config file can get here; the flag is checked
        raise ConfigError(f"init.compression_level {level}: give a zstd level from 1 to 22")
    from ..store import SCHEMA_VERSION, Store
    with Store.init(path, compression_level=level) as store:
        ctx.out.note({"store": str(path), "id": store.id, "schema": SCHEMA_VERSION,
                      "compression_level": level},
                     f"initialised store {path} (id {store.id})")
