"""Where Redis is: one address, or Sentinels and the name of the master they watch.

The URL forms are those a replica accepts (``REDIS_URL``, see the project's README and
``src/engine/streams/endpoint.rs``):

* ``redis://[user:password@]host[:port][/db]`` and ``rediss://`` (TLS): one server;
* ``redis+sentinel://[user:password@]host1[:port],host2[:port]/MASTER[/db]`` and
  ``rediss+sentinel://`` (TLS to the Sentinels and the master). The port defaults to 26379.
  The user and password are the master's; Sentinels with credentials of their own take them
  from ``GE_REDIS_SENTINEL_PASSWORD`` (and ``GE_REDIS_SENTINEL_USERNAME``).

Every connection to a master found through Sentinels asks the Sentinels for the master and
uses it only once the node answers ``ROLE`` as the master, as the replicas do; a connection
that meets ``READONLY`` is dropped and made again the same way (redis-py's Sentinel pool).
``GE_REDIS_CA_CERT`` names a PEM file of a CA to trust for TLS, besides the system roots.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Endpoint", "SENTINEL_PORT", "close_client", "redact"]

SENTINEL_PORT = 26379

#: How to write a user or password that URL parsers would split elsewhere than meant (the
#: replica's words).
ENCODE = (
    "the user and password cannot be read as written: percent-encode their special characters "
    "(/ as %2F, ? as %3F, # as %23, @ as %40, : in the user as %3A, % as %25), and any @ after the hosts as %40"
)

#: How long one Sentinel, or the master it names, may take to answer (the replicas' 1 s).
LOOKUP_TIMEOUT = 1.0


def redact(url: str) -> str:
    """The URL with its password shown as ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _with_port(host: str, default: int) -> Optional[Tuple[str, int]]:
    """``host`` or ``host:port`` (IPv6 in brackets) as (host, port); None when unreadable."""
    if host.startswith("["):
        ip, sep, after = host[1:].partition("]")
        if not sep:
            return None
        if after == "":
            return ip, default
        if not after.startswith(":"):
            return None
        port = after[1:]
    else:
        if host.count(":") > 1:
            return None
        h, sep, port = host.rpartition(":")
        if not sep:
            return (host, default) if host else None
        if not h:
            return None
        host = h
        ip = h
    try:
        n = int(port)
    except ValueError:
        return None
    if not 0 < n < 65536:
        return None
    return ip, n


class _RoleChecked:
    """After connecting, asks the node for its ``ROLE`` and refuses it unless it is the
    master: a Sentinel that lags behind a failover may still name the old master."""

    async def connect_to(self, address: Tuple[str, int]) -> None:
        await super().connect_to(address)  # type: ignore[misc]
        await self.send_command("ROLE")  # type: ignore[attr-defined]
        reply = await self.read_response()  # type: ignore[attr-defined]
        role = reply[0] if isinstance(reply, (list, tuple)) and reply else None
        if isinstance(role, bytes):
            role = role.decode()
        if role != "master":
            await self.disconnect()  # type: ignore[attr-defined]
            raise RedisConnectionError(f"the node {address[0]}:{address[1]} the Sentinel named is not the master")


class _MasterConnection(_RoleChecked, SentinelManagedConnection):
    pass


class _MasterSSLConnection(_RoleChecked, SentinelManagedSSLConnection):
    pass


@dataclass
class Endpoint:
    """A parsed ``REDIS_URL``. :meth:`client` makes a redis-py asyncio client for it."""

    url: str = field(repr=False)
    sentinels: List[Tuple[str, int]] = field(default_factory=list)
    master_name: Optional[str] = None
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    db: int = 0

    def __repr__(self) -> str:
        return f"Endpoint({self.shown})"

    @property
    def is_sentinel(self) -> bool:
        return self.master_name is not None

    @property
    def shown(self) -> str:
        """The URL as given, password hidden (for logs and errors)."""
        return redact(self.url)

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        shown = redact(url)

        def bad(why: str) -> ValueError:
            return ValueError(f"invalid REDIS_URL {shown}: {why}")

        scheme, sep, rest = url.partition("://")
        if not sep:
            raise bad("no scheme (redis://, rediss://, redis+sentinel://, rediss+sentinel://)")
        if scheme in ("redis", "rediss", "unix"):
            return cls(url=url, tls=scheme == "rediss")
        if scheme not in ("redis+sentinel", "rediss+sentinel"):
            raise bad(f"unknown scheme {scheme}")
        # As every URL parser reads it (and the replica, contract v1.5): the Sentinels' part ends
        # at the first `/`, `?` or `#`, the user and password are what comes before its last
        # `@`. An `@` after that point means a delimiter left unencoded in the password.
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        if "@" in rest[end:]:
            raise bad(ENCODE)
        userinfo, at, hosts_only = rest[:end].rpartition("@")
        if not at:
            userinfo = ""
        hostpart = hosts_only + rest[end:]
        hosts, slash, path = hostpart.partition("/")
        if not slash:
            raise bad("no master name (…/mymaster after the Sentinels)")
        path = path.split("?", 1)[0]
        master, slash2, db = path.partition("/")
        if not master:
            raise bad("no master name (…/mymaster after the Sentinels)")
        dbn = 0
        if slash2 and db:
            try:
                dbn = int(db)
            except ValueError:
                raise bad("the database after the master name must be a number") from None
            if dbn < 0:
                raise bad("the database after the master name must be a number")
        sentinels: List[Tuple[str, int]] = []
        for h in (h.strip() for h in hosts.split(",")):
            if not h:
                continue
            addr = _with_port(h, SENTINEL_PORT)
            if addr is None:
                raise bad(f"cannot read the Sentinel address {h!r}")
            sentinels.append(addr)
        if not sentinels:
            raise bad("no Sentinel address")
        username: Optional[str] = None
        password: Optional[str] = None
        if userinfo:
            u, colon, p = userinfo.partition(":")
            username = unquote(u) or None
            password = unquote(p) if colon else None
        return cls(
            url=url,
            sentinels=sentinels,
            master_name=master,
            tls=scheme.startswith("rediss"),
            username=username,
            password=password,
            db=dbn,
        )

    def _tls_kwargs(self) -> Dict[str, Any]:
        ca = os.environ.get("GE_REDIS_CA_CERT")
        return {"ssl_ca_certs": ca} if (self.tls and ca) else {}

    def client(self, **kwargs: Any) -> "aioredis.Redis":
        """A client for the master (``decode_responses`` on unless given). Extra keyword
        arguments go to redis-py (``socket_timeout``, ``health_check_interval``, ...)."""
        kwargs.setdefault("decode_responses", True)
        if not self.is_sentinel:
            return aioredis.Redis.from_url(self.url, **self._tls_kwargs(), **kwargs)
        sentinel_kwargs: Dict[str, Any] = {
            "socket_timeout": LOOKUP_TIMEOUT,
            "socket_connect_timeout": LOOKUP_TIMEOUT,
            "decode_responses": True,
        }
        spw = os.environ.get("GE_REDIS_SENTINEL_PASSWORD")
        if spw:
            sentinel_kwargs["password"] = spw
            if os.environ.get("GE_REDIS_SENTINEL_USERNAME"):
                sentinel_kwargs["username"] = os.environ["GE_REDIS_SENTINEL_USERNAME"]
        if self.tls:
            sentinel_kwargs["ssl"] = True
            sentinel_kwargs.update(self._tls_kwargs())
        master_kwargs: Dict[str, Any] = dict(kwargs)
        master_kwargs.setdefault("socket_connect_timeout", 5.0)
        if self.password is not None:
            master_kwargs["password"] = self.password
        if self.username is not None:
            master_kwargs["username"] = self.username
        master_kwargs["db"] = self.db
        if self.tls:
            master_kwargs.update(self._tls_kwargs())
        sentinel = Sentinel(self.sentinels, sentinel_kwargs=sentinel_kwargs)
        connection_class = _MasterSSLConnection if self.tls else _MasterConnection
        client: "aioredis.Redis" = sentinel.master_for(
            self.master_name,  # type: ignore[arg-type]
            connection_pool_class=SentinelConnectionPool,
            connection_class=connection_class,
            **master_kwargs,
        )
        return client


async def close_client(client: "aioredis.Redis") -> None:
    """Closes a client made by :meth:`Endpoint.client`, and its Sentinels' connections."""
    closing = getattr(client, "aclose", None) or client.close
    await closing()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for s in getattr(manager, "sentinels", []):
        await (getattr(s, "aclose", None) or s.close)()
