"""The pipeline in a lab: tools to run it, disturb it and measure it, for the tests and benchmarks.

* :mod:`services.lab.harness`: ``llvc run`` in the background, watched through its telemetry
  (:class:`~services.lab.harness.RunningPipeline`, :class:`~services.lab.harness.Observer`), and
  restart faults measured the way a dashboard sees them.
* :mod:`services.lab.netlab`: two "hosts" in network namespaces and faults on the link between
  them (loss, link down, a delay/jitter relay).
* :mod:`services.lab.pulse`: a PulseAudio server with null sinks: real sound devices without a
  sound card.
* :mod:`services.lab.acoustic`: latency measured acoustically, by cross-correlating recordings.
* :mod:`services.lab.breakdown`: where each chunk's e2e goes, as the dashboard splits it.

Nothing here is a fake: real processes, real sockets, real devices. Used by ``tests/`` and
``scripts/bench_*.py``; the services themselves never import it.
"""
