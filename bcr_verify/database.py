"""Where lockstep tests keep their Hypothesis examples: one location, one ExampleDatabase.

A failing example Hypothesis saves is replayed first by every later run that reads the same
database. Pointing every machine of a campaign (and CI) at one Redis database therefore
makes a failure found anywhere replay everywhere::

    pytest --bcr-database redis://HOST:6379/0

``redis://``, ``rediss://`` and ``unix://`` URLs give a
:class:`~hypothesis.extra.redis.RedisExampleDatabase` (the ``redis`` client package); any
other location is a directory for a
:class:`~hypothesis.database.DirectoryBasedExampleDatabase`. A Redis server is pinged here,
at start-up, so an unreachable one is one clear error instead of a traceback in every test.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

REDIS_SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT_S = 5.0


class UnusableDatabase(Exception):
    """The given location cannot serve as an example database; the message says why and
    what to do."""


def open_database(location: str, option: str = "--bcr-database") -> ExampleDatabase:
    """The example database at ``location``; ``option`` names where it came from in errors."""
    location = location.strip()
    if not location:
        raise UnusableDatabase(f"{option} is empty: give redis://HOST:PORT/DB or a directory")
    scheme, sep, _ = location.partition("://")
    if sep and scheme.lower() in REDIS_SCHEMES:
        return _redis(location, option)
    if sep:
        raise UnusableDatabase(
            f"{option} {location!r}: unknown scheme {scheme!r}; give a redis://HOST:PORT/DB "
            "URL or a directory path")
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise UnusableDatabase(f"{option} {location!r} is a file; give a directory (created "
                               "if missing) or a redis://HOST:PORT/DB URL")
    return DirectoryBasedExampleDatabase(path)


def public_location(location: str) -> str:
    """``location`` fit to print: a Redis URL's password hidden."""
    parts = urlsplit(location)
    if parts.password is None:
        return location
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{parts.hostname}"
                                            + (f":{parts.port}" if parts.port else "")))


def _redis(url: str, option: str) -> ExampleDatabase:
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError:
        raise UnusableDatabase(f"{option} {url!r} needs the redis client package: "
                               "pip install redis") from None
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S)
    except ValueError as exc:
        raise UnusableDatabase(f"{option} {url!r} is not a valid Redis URL ({exc}); the "
                               "form is redis://HOST:PORT/DB") from None
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        raise UnusableDatabase(
            f"{option} {url!r}: no Redis server answers there ({exc}). Start one "
            "(redis-server --port PORT) or fix the URL.") from None
    return RedisExampleDatabase(client)
