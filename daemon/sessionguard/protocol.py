"""Placeholder until the control protocol lands: the caller of a control method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """Who called (from the socket's peer credentials), for logs."""

    uid: int
    pid: int
