"""Latency profiler: per-stage timing of the real runtime, link models, multi-client simulation.

* :mod:`.link` — the analytic link (rate, latency, jitter) and its presets;
* :mod:`.shaped` — a real rate-limited link between two network namespaces (root only);
* :mod:`.simulate` — the SimPy model of N clients sharing a server;
* :mod:`.driver` — runs server and clients and collects the runtime's stage timings;
* :mod:`.report` — statistics, JSON, markdown and plots;
* :mod:`.commands` — the ``fc-edge profile`` verb.
"""
