"""Private endpoints, so that pipelines under test or benchmark never meet each other's sockets."""
from __future__ import annotations

import itertools
import os
import tempfile

from common.config import REQUIRED_ENDPOINTS
from services import run_session

_ipc_counter = itertools.count()
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, never the same one twice in a process."""
    while True:
        port = run_session.free_port("127.0.0.1")
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def endpoint_overrides(scheme: str = "tcp") -> list[str]:
    """``--set`` overrides putting every required endpoint on a fresh tcp port or ipc path."""
    out = []
    for name in REQUIRED_ENDPOINTS:
        if scheme == "tcp":
            address = f"tcp://127.0.0.1:{free_port()}"
        else:
            address = f"ipc://{tempfile.gettempdir()}/llvc-test-{os.getpid()}-{next(_ipc_counter)}"
        out.append(f"endpoints.{name}.connect={address}")
    return out


def private_sets(*extra: str) -> list[str]:
    """Private endpoints, a private ``/metrics`` port and dashboard port (plus ``extra``
    overrides): what a pipeline started beside others needs."""
    return [*endpoint_overrides("tcp"), f"monitor.metrics_port={free_port()}",
            f'dashboard.bind="127.0.0.1:{free_port()}"', *extra]
