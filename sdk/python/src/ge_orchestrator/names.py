"""Stream names (the contract's defaults, or a replica's ``GE_STREAM_*`` settings) and the
small helpers the agent and the producer share."""

from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

__all__ = ["Names", "parse_duration"]


@dataclass(frozen=True)
class Names:
    """The names of the streams, as a replica has them (``--incoming``, ``GE_STREAM_INCOMING``,
    ...). :meth:`from_env` reads the same variables a replica reads."""

    incoming: str = "ge:work:incoming"
    completed: str = "ge:work:completed"
    failed: str = "ge:work:failed"
    heartbeat: str = "ge:work:heartbeat"
    deadletter: str = "ge:work:deadletter"
    trigger_prefix: str = "triggers."
    #: (v1.6) Prefix of each agent's stream of cancel notices.
    cancel_prefix: str = "cancels."

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Names":
        env = os.environ if env is None else env
        d = cls()
        return cls(
            incoming=env.get("GE_STREAM_INCOMING") or d.incoming,
            completed=env.get("GE_STREAM_COMPLETED") or d.completed,
            failed=env.get("GE_STREAM_FAILED") or d.failed,
            heartbeat=env.get("GE_STREAM_HEARTBEAT") or d.heartbeat,
            deadletter=env.get("GE_STREAM_DEADLETTER") or d.deadletter,
            trigger_prefix=env.get("GE_TRIGGER_PREFIX") or d.trigger_prefix,
            cancel_prefix=env.get("GE_CANCEL_PREFIX") or d.cancel_prefix,
        )

    def trigger_stream(self, agent: str) -> str:
        return f"{self.trigger_prefix}{agent}"

    def cancel_stream(self, agent: str) -> str:
        return f"{self.cancel_prefix}{agent}"


_UNITS = {
    "ms": 0.001, "msec": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip


def parse_duration(value: Union[str, float, int, None]) -> Optional[float]:
    """Seconds from a number or a duration as the replica writes them (``30s``, ``1h``,
    ``500ms``, ``1m30s``); ``off``, ``0`` and None mean none (None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    text = value.strip().lower()
    if text in ("off", "", "0"):
        return None
    try:
        seconds = float(text)
        return seconds if seconds > 0 else None
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text) or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot read the duration {value!r} (e.g. 30s, 5m, 1h, 500ms, off)")
    total = 0.0
    for n, unit in parts:
        if unit not in _UNITS:
            raise ValueError(f"cannot read the duration {value!r}: unknown unit {unit!r}")
        total += float(n) * _UNITS[unit]
    return total if total > 0 else None


class Backoff:
    """100 ms doubling to 5 s, with jitter: the replicas' backoff."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.next = initial

    def reset(self) -> None:
        self.next = self.initial

    async def wait(self, stop: Optional[asyncio.Event] = None) -> None:
        delay = self.next * (0.5 + random.random() / 2)
        self.next = min(self.next * 2, self.maximum)
        if stop is None:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
