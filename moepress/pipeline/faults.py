"""Deterministic fault injection, so tests can kill a run at exact points and check it resumes.

``MOEPRESS_FAULT=POINT:LAYER`` (e.g. ``layer_shard_written:1``, ``mid_layer:0``, ``finish:-1``) makes
the run stop at that point: by ``SIGKILL`` of its own process (a real ``kill -9``: nothing is
flushed, no ``finally`` runs), or with ``MOEPRESS_FAULT_MODE=raise`` by raising
:class:`InjectedFault` (for in-process tests). Unset, :func:`fault_point` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


class InjectedFault(BaseException):
    """Raised at a fault point in ``raise`` mode; a BaseException so no ``except Exception`` eats it."""


def fault_point(point: str, layer: int) -> None:
    wanted = os.environ.get("MOEPRESS_FAULT")
    if not wanted or wanted != f"{point}:{layer}":
        return
    if os.environ.get("MOEPRESS_FAULT_MODE") == "raise":
        raise InjectedFault(wanted)
    os.kill(os.getpid(), signal.SIGKILL)
