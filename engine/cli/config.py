"""The configuration file: TOML, read with the standard library's tomllib.

Which file: ``--config FILE``, else ``$MODSYNC_CONFIG``, else
``/etc/modsync/modsync.toml`` if it exists, else none.  A file that was
named (by flag or environment) must exist; the default may be absent.

Every key says something a flag can say, and a flag (or environment
variable) always wins: flag > environment > config file > built-in default.
Unknown keys are refused, so a typo cannot silently do nothing.  Relative
paths in the file are relative to the file's directory.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModsyncError

DEFAULT_PATH = Path("/etc/modsync/modsync.toml")
ENV_CONFIG = "MODSYNC_CONFIG"
ENV_STORE = "MODSYNC_STORE"
ENV_LOG_LEVEL = "MODSYNC_LOG_LEVEL"

LOG_LEVELS = ("debug", "info", "warning", "error")

# Dotted key -> (accepted types, the flag it stands for).  docs/cli.md lists the same.
KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "store": ((str,), "--store"),
    "log_level": ((str,), "-v / -vv"),
    "log_file": ((str,), "--log-file"),
    "init.compression_level": ((int,), "init --compression-level"),
    "gc.retention_days": ((int, float), "gc --retention"),
    "verify.blobs": ((bool,), "verify --no-blobs"),
    "backup.append_only": ((bool,), "backup --append-only"),
    "backup.level": ((int,), "backup --level"),
}
PATH_KEYS = ("store", "log_file")


class ConfigError(ModsyncError):
    """The configuration file is missing (when named), unreadable or has a bad key."""

    code = "config"


@dataclass
class Config:
    path: Path | None = None
    values: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.values.get(key, default)


def load(flag_path: str | None) -> Config:
    """The configuration in effect for this run (see the module docstring)."""
    if flag_path:
        path = Path(flag_path)
    elif os.environ.get(ENV_CONFIG):
        path = Path(os.environ[ENV_CONFIG])
    elif DEFAULT_PATH.is_file():
        path = DEFAULT_PATH
    else:
        return Config()
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", subject=path) from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}", subject=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})", subject=path) from None
    return Config(path, _check(path, raw))


def _check(path: Path, raw: dict) -> dict:
    flat: dict = {}

    def walk(prefix: str, table: dict) -> None:
        for k, v in table.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and key not in KEYS:
                walk(key + ".", v)
            else:
                flat[key] = v
    walk("", raw)
    out = {}
    for key, value in flat.items():
        if key not in KEYS:
            known = ", ".join(KEYS)
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {known})",
                              subject=path)
        types, _flag = KEYS[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"config file {path}: {key} must be {want}, not {value!r}",
                              subject=path)
        if key in PATH_KEYS:
            value = str(path.parent / Path(value).expanduser())
        if key == "log_level" and value.lower() not in LOG_LEVELS:
            raise ConfigError(f"config file {path}: log_level {value!r}: use one of "
                              f"{', '.join(LOG_LEVELS)}", subject=path)
        out[key] = value
    return out
