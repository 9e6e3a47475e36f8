"""Checks of a submission's surroundings before anything is created: the work directory and the tracking store
must be usable, and answer within seconds, or the submission is refused (exit 2). Each backend checks its own
surroundings (an existing Ray cluster) with the helpers here."""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from orch.problems import Problem

CONNECT_SECONDS = 3.0
"""How long a tracking server or a Ray cluster may take to answer before the submission is refused."""
SQL_SCHEMES = ("postgresql", "mysql", "mssql")
"""Database stores MLflow reaches through SQLAlchemy (driver suffixes such as postgresql+psycopg2 included)."""
SQLITE_HEADER = b"SQLite format 3\0"


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster address `HOST:PORT` or `ray://HOST:PORT` (IPv6 hosts in brackets); None for
    `auto` (the cluster this machine's Ray knows). Raises ValueError naming what is wrong."""
    if address == "auto":
        return None
    rest = address.removeprefix("ray://")
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})", rest)
    if match is None or not 0 < int(match[2]) < 65536:
        raise ValueError(f"{address!r} is not a Ray address: give HOST:PORT, ray://HOST:PORT or auto")
    return match[1].strip("[]"), int(match[2])


def reachable(host: str, port: int, timeout: float = CONNECT_SECONDS) -> str | None:
    """None when a TCP connection to host:port opens within `timeout`, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def workdir_problems(workdir: Path) -> list[Problem]:
    """The work directory must be a directory (or creatable as one) that orch can write to."""
    existing = next((p for p in [workdir, *workdir.parents] if p.exists()), None)
    if workdir.exists() and not workdir.is_dir():
        return [Problem("--workdir", f"{workdir} exists and is not a directory")]
    if existing is not None and not existing.is_dir():
        return [Problem("--workdir", f"{existing} is not a directory")]
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [Problem("--workdir", f"{existing} is not writable")]
    return []


def tracking_problems(uri: str | None) -> list[Problem]:
    """A tracking URI must name a store MLflow can use: sqlite:///PATH onto a database (or a new file in an
    existing directory), a reachable http(s) server, a SQL database, or a file store MLflow allows."""
    if uri is None:
        return []
    scheme = urlparse(uri).scheme.split("+")[0]
    where = "--tracking-uri"
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is None or not path.name:
            return [Problem(where, f"{uri!r}: give sqlite:///PATH (relative) or sqlite:////PATH (absolute)")]
        if not path.parent.is_dir():
            return [Problem(where, f"{uri!r}: directory {path.parent} does not exist")]
        if path.exists() and (not path.is_file() or not is_sqlite(path)):
            return [Problem(where, f"{uri!r}: {path} exists and is not an SQLite database")]
        return []
    if scheme in ("http", "https"):
        return [Problem(where, f"{uri!r}: {why}")] if (why := server_unreachable(uri)) else []
    if scheme in SQL_SCHEMES or scheme == "databricks":
        return []
    if scheme == "file":
        path = Path(urlparse(uri).path)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            return [Problem(where, f"{uri!r}: MLflow 3.17 refuses file stores; use sqlite:///PATH or a server")]
        if not (path if path.exists() else path.parent).is_dir():
            return [Problem(where, f"{uri!r}: {path} is not a directory")]
        return []
    known = "sqlite:///PATH, http(s)://HOST:PORT, postgresql://…, mysql://…, databricks"
    return [Problem(where, f"{uri!r}: not a tracking store MLflow can use ({known})")]


def is_sqlite(path: Path) -> bool:
    """An SQLite database file (an empty file is one too: SQLite initialises it)."""
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    return head in (b"", SQLITE_HEADER)


def server_unreachable(uri: str) -> str | None:
    """None when an HTTP server answers at `uri` within CONNECT_SECONDS (any status), else why not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_SECONDS):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: a server is there (authentication or the path is its business)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"no tracking server answers within {CONNECT_SECONDS:.0f} s ({reason})"
