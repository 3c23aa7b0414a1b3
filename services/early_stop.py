"""A stop asked for while a service is still starting, before it could install its own handlers.

A service process spends its first second or so importing (numpy, ZeroMQ, the model code).
Until :func:`services.base.run_service` installs its handlers, SIGTERM's default action would
end it at once: a monitor stopped then (``llvc run`` stopped right after it started) would leave
no report, and any service no exit record. :func:`catch` is called first thing, with nothing
imported yet; :func:`asked` tells ``run_service`` whether a stop came in meanwhile, so the
service stops as it would have a moment later: set-up, no loop, teardown (the report).

Standard library only: this module is imported before anything heavy.
"""
from __future__ import annotations

import signal

_asked = False


def _note(*_: object) -> None:
    global _asked
    _asked = True


def catch() -> None:
    """Note SIGTERM and SIGINT from now on instead of dying of them (until replaced)."""
    signal.signal(signal.SIGTERM, _note)
    signal.signal(signal.SIGINT, _note)


def asked() -> bool:
    """Whether a SIGTERM or SIGINT came in since :func:`catch`."""
    return _asked
