"""The exec sessions marked as `steps proxy`, shared by every connection of the tap.

The Docker CLI and GitLab Runner's Docker client create an exec on one API connection
and start it on another, so a mark made where the create's response passed is looked
up where the start passes. Bounded in size and age: a created exec that is never
started (or started elsewhere) is forgotten after `ttl` seconds or when `max_execs`
newer ones are marked.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MarkedExec:
    exec_id: str
    container_id: str
    tty: bool  # from the exec's create: a Tty session is raw, not multiplexed


class ExecTable:
    def __init__(self, *, max_execs: int, ttl: float) -> None:
        self._max = max_execs
        self._ttl = ttl
        # exec id -> (mark, when marked); oldest first, so expiry pops from the front.
        self._execs: OrderedDict[str, tuple[MarkedExec, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._execs)

    def mark(self, marked: MarkedExec, now: float) -> None:
        self._execs.pop(marked.exec_id, None)
        self._execs[marked.exec_id] = (marked, now)
        self._expire(now)

    def take(self, exec_id: str, now: float) -> MarkedExec | None:
        """The mark of `exec_id`, forgotten from here on: an exec starts once."""
        self._expire(now)
        entry = self._execs.pop(exec_id, None)
        return entry[0] if entry is not None else None

    def _expire(self, now: float) -> None:
        execs = self._execs
        while execs:
            _, (_, marked_at) = next(iter(execs.items()))
            if len(execs) <= self._max and now - marked_at < self._ttl:
                return
            execs.popitem(last=False)
