"""Serving the tail on Ray Serve: replicas, sessions pinned to a replica, autoscaling.

``fc-edge serve --replicas N`` (or ``--autoscale MIN:MAX``) runs the tail as a Ray Serve
deployment. Each replica is one :class:`EdgeReplica`: one
:class:`~fc_edge.runtime.server.EdgeService` (one batching engine owning one copy of the model).
Devices connect to Ray Serve's gRPC proxy, which speaks fc-edge's protocol unchanged
(``fc_edge.proto``): Ray 2.60's proxy carries stream-to-stream methods, so one ``Generate`` stream
is one Ray Serve request, routed once to a replica and kept there until it ends: a session stays
on the replica that opened it, and its decode steps are batched with the other sessions of that
replica. Placement, health checks, restarts of dead replicas and autoscaling (on ongoing
requests, i.e. open sessions) are Ray Serve's. A session whose replica dies ends with INTERNAL
("the actor died"); the device client resumes it on another replica (client.py, docs/deploy.md).

>>> fleet = start_fleet("smollm2-135m", 1, replicas=2, port=50051)   # a local Ray
>>> fleet.address, fleet.open_sessions()
('127.0.0.1:50051', {'a1b2c3d4': 0, 'e5f6g7h8': 0})
>>> fleet.stop()

Why the proxy and not one gRPC server per replica: see docs/deploy.md, "Ray Serve".
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fc_edge.errors import ConfigError

log = logging.getLogger("fc_edge.fleet")

APP_NAME = "fc-edge"
DEPLOYMENT_NAME = "EdgeReplica"
SERVE_NAMESPACE = "serve"
#: Import path of the function that registers fc-edge's service on Ray Serve's gRPC proxy
#: (``grpc_servicer_functions`` of ``gRPCOptions``, ``grpcOptions`` of a RayService manifest).
SERVICER_FUNCTION = "fc_edge.runtime.fleet.add_servicer_to_server"
# Info calls and a refusal answered by a full replica need a little room over its sessions
_EXTRA_REQUESTS = 2


def add_servicer_to_server(servicer: Any, server: Any) -> None:
    """Register the ``SplitInference`` service and ``grpc.health.v1.Health`` on ``server``
    (what Ray Serve's gRPC proxy imports by the path :data:`SERVICER_FUNCTION` to learn the
    methods it routes to the replicas)."""
    from grpc_health.v1 import health_pb2_grpc

    from fc_edge.runtime.proto import pb2_grpc

    pb2_grpc.add_SplitInferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def _ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401 - the extra is needed, not only ray core
    except ImportError:
        raise ConfigError("--replicas/--autoscale need Ray Serve: "
                          "pip install 'fc-edge[fleet]' (ray[serve])") from None
    return ray


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> ``(MIN, MAX)`` replicas, 0 <= MIN <= MAX, MAX >= 1."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--autoscale must be MIN:MAX replicas (e.g. 1:4), got {text!r}") \
            from None
    if not 0 <= lo <= hi or hi < 1:
        raise ConfigError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return lo, hi


class EdgeReplica:
    """One Ray Serve replica: one EdgeService behind the proxy's ``SplitInference`` methods.

    ``model`` is a ``load_model`` spec (each replica loads its own copy), ``options`` the
    keyword arguments of :class:`~fc_edge.runtime.server.EdgeService` (token, limits, device,
    dtype, batching). The session ids it hands out are ``<replica id>/<session id>`` so that a
    session (and its log lines) can be traced to its replica.
    """

    async def __init__(self, model: str, split_layer: int | None,
                       options: dict[str, Any]) -> None:
        from ray import serve

        from fc_edge.runtime.server import EdgeService

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # made here, on the replica's event loop, where its coroutines will run
        self.service = EdgeService(model, split_layer, **options)
        # Ray Serve has waited graceful_shutdown_timeout_s (--drain-s) for the open streams when
        # it deletes a replica: what is left ends at once
        self._drain_s = 0.0
        log.info("replica %s serving %s", self.replica_id, model)

    async def Generate(self, request_stream: AsyncIterator[Any],  # noqa: N802 - gRPC name
                       grpc_context: Any = None) -> AsyncIterator[Any]:
        from fc_edge.runtime.server import SessionAbort

        peer, metadata = _peer_and_metadata(grpc_context)
        try:
            async for frame in self.service.generate(request_stream, peer, metadata):
                if frame.WhichOneof("kind") == "ready":
                    frame.ready.session_id = f"{self.replica_id}/{frame.ready.session_id}"
                yield frame
        except SessionAbort as e:
            raise _status(grpc_context, e) from None

    async def Info(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from fc_edge.runtime.server import SessionAbort

        try:
            return self.service.info(_peer_and_metadata(grpc_context)[1])
        except SessionAbort as e:
            raise _status(grpc_context, e) from None

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        """``grpc.health.v1.Health/Check`` through the proxy (no token, for load balancers):
        SERVING while a replica answers with a running engine."""
        from grpc_health.v1 import health_pb2

        serving = _engine_alive(self.service) and not self.service.draining
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose engine stopped is restarted."""
        if not _engine_alive(self.service):
            raise RuntimeError("the batching engine of this replica is not running")

    async def record_routing_stats(self) -> dict[str, Any]:
        """Per-replica figures (read by :meth:`FleetHandle.open_sessions`)."""
        return {"open_sessions": self.service.open_sessions(), "replica": self.replica_id}

    async def __del__(self) -> None:
        # Ray Serve waits for the open streams first (graceful_shutdown_timeout_s = --drain-s);
        # what is still open then ends with UNAVAILABLE and its devices recover elsewhere
        await self.service.stop(self._drain_s)


def _engine_alive(service: Any) -> bool:
    # liveness, not readiness: a draining replica is alive (Ray must not restart it mid-drain)
    return bool(service.engine.alive())


def _status(grpc_context: Any, e: Any) -> Exception:
    """Set the gRPC status of ``e`` (a SessionAbort) for the proxy to answer with; returns the
    exception to raise. Ray carries it to the proxy pickled, and an exception whose constructor
    takes other arguments than its message does not unpickle there: raise a plain one."""
    if grpc_context is not None:
        grpc_context.set_code(e.code)
        grpc_context.set_details(e.details)
    return RuntimeError(e.details)


def _peer_and_metadata(grpc_context: Any) -> tuple[str, list[tuple[str, str]]]:
    if grpc_context is None:
        return "ray", []
    return grpc_context.peer(), list(grpc_context.invocation_metadata())


@dataclass
class FleetHandle:
    """A running fleet: ``address`` of Ray Serve's gRPC proxy, the replicas, ``stop()``."""

    address: str
    own_ray: bool  # this process started a local Ray: stop() shuts Serve and Ray down
    connected: bool = False  # this process joined a cluster: stop() deletes the app, disconnects

    def replicas(self) -> dict[str, Any]:
        """``{replica id: actor handle}`` of the replicas alive now."""
        ray = _ray()
        prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
        out = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] == SERVE_NAMESPACE and name.startswith(prefix):
                try:
                    out[name[len(prefix):]] = ray.get_actor(name, namespace=SERVE_NAMESPACE)
                except ValueError:  # died between the listing and the lookup
                    continue
        return out

    def open_sessions(self, timeout_s: float = 10.0) -> dict[str, int]:
        """``{replica id: open sessions}``, asked of each live replica."""
        ray = _ray()
        out = {}
        for rid, actor in self.replicas().items():
            try:
                stats = ray.get(actor.record_routing_stats.remote(), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a replica dying or starting is not counted
                continue
            out[rid] = int(stats.get("open_sessions", 0))
        return out

    def wait_ready(self, replicas: int, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until ``replicas`` replicas answer; returns them."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.open_sessions()
            if len(live) >= replicas:
                return {rid: a for rid, a in self.replicas().items() if rid in live}
            if time.monotonic() > deadline:
                raise ConfigError(f"only {len(live)} of {replicas} replicas came up within "
                                  f"{timeout_s:g} s (see `ray status` and the Ray logs)")
            time.sleep(0.2)

    def kill_replica(self, replica_id: str) -> None:
        """Kill one replica's actor (as a crash would); Ray Serve starts a replacement."""
        ray = _ray()
        ray.kill(self.replicas()[replica_id], no_restart=True)

    def stop(self) -> None:
        """Delete the application; shut Serve and Ray down if this process started them."""
        ray = _ray()
        from ray import serve

        if not ray.is_initialized():
            return
        if self.own_ray:
            serve.shutdown()
            ray.shutdown()
            return
        serve.delete(APP_NAME)  # a cluster's Serve (and its other applications) stay up
        if self.connected:
            ray.shutdown()

    def __enter__(self) -> FleetHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_app(model: str, split_layer: int | None = None, *, replicas: int = 1,
              autoscale: tuple[int, int] | None = None, replica_cpus: float = 1.0,
              replica_gpus: float | None = None, drain_s: float = 10.0,
              **service_options: Any) -> Any:
    """The Ray Serve application (not yet running): :class:`EdgeReplica` with ``replicas``
    fixed replicas or ``autoscale=(MIN, MAX)``, each reserving ``replica_cpus`` CPUs and
    ``replica_gpus`` GPUs (default: 1 when ``device`` is CUDA, else 0; Ray then shows each
    replica only its own GPU, as ``cuda:0``).

    Ray counts a ``Generate`` stream as one ongoing request for its whole life, so its routing
    (a new stream goes to the less loaded of two replicas), queueing and autoscaling all count
    open sessions: a replica takes at most ``max_sessions`` (+2 for Info and refusals), at most
    ``max_sessions`` more wait in the proxy (beyond: RESOURCE_EXHAUSTED, never a hang), and
    the autoscaler aims at half of ``max_sessions`` per replica.
    """
    from ray import serve

    if not replica_cpus >= 0:
        raise ConfigError(f"replica CPUs must be >= 0, got {replica_cpus!r}")
    if replica_gpus is None:
        replica_gpus = 1.0 if str(service_options.get("device", "cpu")).startswith("cuda") \
            else 0.0
    if not replica_gpus >= 0:
        raise ConfigError(f"replica GPUs must be >= 0, got {replica_gpus!r}")
    max_sessions = int(service_options.get("max_sessions", 16))
    config: dict[str, Any] = {
        "max_ongoing_requests": max_sessions + _EXTRA_REQUESTS,
        "max_queued_requests": max_sessions,
        "graceful_shutdown_timeout_s": drain_s,
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus},
    }
    if autoscale is not None:
        lo, hi = autoscale
        config["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi,
            "initial_replicas": min(max(replicas, lo), hi),
            "target_ongoing_requests": max(1, max_sessions // 2),
        }
    else:
        config["num_replicas"] = replicas
    deployment = serve.deployment(EdgeReplica, name=DEPLOYMENT_NAME).options(**config)
    return deployment.bind(model, split_layer, dict(service_options))


def app_builder(args: dict[str, Any]) -> Any:
    """The application of a Serve config file or a KubeRay RayService
    (``import_path: fc_edge.runtime.fleet:app_builder``): ``args`` holds ``model``, and
    optionally ``split_layer``, ``replicas``, ``autoscale`` ("MIN:MAX"), ``replica_cpus``,
    ``drain_s`` and EdgeService keywords (``max_sessions``, ``device``, ``dtype``, ...). The
    bearer token comes from ``$FC_EDGE_TOKEN`` (a Kubernetes secret), not from the file."""
    import os

    options = dict(args)
    if "model" not in options:
        raise ConfigError("the fc-edge application needs args.model (a load_model spec)")
    if "token" in options:
        raise ConfigError("do not put the token in the Serve config: set $FC_EDGE_TOKEN")
    autoscale = options.pop("autoscale", None)
    token = os.environ.get("FC_EDGE_TOKEN")
    if token:
        options["token"] = token
    return build_app(options.pop("model"), options.pop("split_layer", None),
                     autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
                     **options)


def start_fleet(
    model: str,
    split_layer: int | None = None,
    *,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    ray_address: str | None = None,
    port: int = 50051,
    http_port: int = 0,
    replica_cpus: float = 1.0,
    replica_gpus: float | None = None,
    num_cpus: int | None = None,
    drain_s: float = 10.0,
    **service_options: Any,
) -> FleetHandle:
    """Deploy the tail of ``model`` (a ``load_model`` spec) at ``split_layer`` on Ray Serve.

    ``replicas`` fixed replicas, or ``autoscale=(MIN, MAX)`` (``replicas`` is then the initial
    count) scaled by Ray Serve on open sessions per replica (target: half of ``max_sessions``).
    ``ray_address`` joins a running cluster (``auto``, ``ray://...``, ``HOST:PORT``); without
    it a local Ray is started with ``num_cpus`` CPUs (default: all) and no dashboard. Devices
    connect to ``HOST:port`` (Ray's gRPC proxy, on all interfaces, plaintext); ``http_port``
    is Ray's HTTP proxy (started alongside; 0: a free port). Each replica reserves
    ``replica_cpus`` CPUs and ``replica_gpus`` GPUs (see :func:`build_app`).
    ``service_options`` go to each replica's EdgeService (``token``, ``max_sessions``,
    ``max_seq_len``, ``device``, ``dtype``, ...). Returns once every initial replica is up.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"--replicas must be an integer >= 1, got {replicas!r}")
    if not isinstance(model, str):
        raise ConfigError("a fleet loads the model in each replica: give a model spec string")
    ray = _ray()
    from ray import serve
    from ray.serve.config import gRPCOptions

    connect = not ray.is_initialized()
    if connect:
        kwargs: dict[str, Any] = {"log_to_driver": False}
        if ray_address is None:
            kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        ray.init(address=ray_address, **kwargs)
    if http_port == 0:
        http_port = _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION]))
    app = build_app(model, split_layer, replicas=replicas, autoscale=autoscale,
                    replica_cpus=replica_cpus, replica_gpus=replica_gpus, drain_s=drain_s,
                    **service_options)
    initial = replicas if autoscale is None else min(max(replicas, autoscale[0]), autoscale[1])
    port = _proxy_port(ray, port)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - a replica that cannot start, as one line
        first = str(e).strip().splitlines()
        raise ConfigError(f"the fleet did not start: {type(e).__name__}: "
                          f"{first[-1] if first else e}") from None
    handle = FleetHandle(address=f"127.0.0.1:{port}", own_ray=connect and ray_address is None,
                         connected=connect)
    if initial:
        handle.wait_ready(initial)
    return handle


def _proxy_port(ray: Any, asked: int) -> int:
    """The port of the running gRPC proxy: a Serve instance that was already running (a
    cluster's) keeps the options it was started with; it must route fc-edge's service."""
    try:
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        config = ray.get(controller.get_grpc_config.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a private API of Ray: trust the options given
        return asked
    if SERVICER_FUNCTION not in list(config.grpc_servicer_functions):
        raise ConfigError(f"Ray Serve on this cluster runs its gRPC proxy without "
                          f"{SERVICER_FUNCTION}: add it to grpcOptions.grpcServicerFunctions "
                          "(docs/deploy.md)")
    if int(config.port) != asked:
        log.warning("Ray Serve's gRPC proxy already listens on port %d (not %d)",
                    config.port, asked)
    return int(config.port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the CLI ----------------------------------------------------------------------------------
def add_fleet_args(p: argparse.ArgumentParser) -> None:
    """The Ray Serve flags of ``fc-edge serve`` (any of them turns the fleet on)."""
    f = p.add_argument_group("Ray Serve fleet (docs/deploy.md)")
    f.add_argument("--replicas", type=int, default=None,
                   help="serve with N replicas on Ray Serve behind its gRPC proxy on --port "
                   "(each replica: one batching engine; a session stays on its replica)")
    f.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                   help="let Ray Serve scale the replicas between MIN and MAX on open sessions "
                   "(--replicas is then the initial count)")
    f.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (auto, ray://HOST:10001, HOST:6379) instead of "
                   "starting a local Ray")
    f.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica (0: no reservation)")
    f.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs Ray reserves for each replica (default: 1 with --device cuda, "
                   "else 0)")


def wants_fleet(args: argparse.Namespace) -> bool:
    return args.replicas is not None or args.autoscale is not None \
        or args.ray_address is not None


# serve flags (as argparse names) -> EdgeService keyword arguments, where the flag exists
_SERVICE_FLAGS = {
    "token": "token", "max_sessions": "max_sessions", "max_seq_len": "max_seq_len",
    "max_payload_bytes": "max_payload_bytes", "idle_timeout": "idle_timeout_s",
    "open_timeout": "open_timeout_s", "max_streams": "max_streams", "device": "device",
    "dtype": "dtype", "max_batch": "max_batch", "prefill_chunk": "prefill_chunk",
    "kv_cache_tokens": "kv_cache_tokens", "max_sessions_per_peer": "max_sessions_per_peer",
    "max_streams_per_peer": "max_streams_per_peer", "max_session_s": "max_session_s",
    "cuda_graphs": "cuda_graphs", "calibration": "calibrations",
}


def cmd_serve_fleet(args: argparse.Namespace) -> int:
    """``fc-edge serve`` with ``--replicas``/``--autoscale``/``--ray-address``."""
    if args.tls_cert or args.tls_key:
        raise ConfigError("--tls-cert/--tls-key: Ray Serve's gRPC proxy serves plaintext; "
                          "terminate TLS in front of it (docs/deploy.md, 'TLS and tokens')")
    autoscale = parse_autoscale(args.autoscale) if args.autoscale is not None else None
    options = {kw: getattr(args, flag) for flag, kw in _SERVICE_FLAGS.items()
               if getattr(args, flag, None) is not None}
    drain_s = float(getattr(args, "drain_s", None) or 10.0)
    replicas = args.replicas if args.replicas is not None else (autoscale or (1, 1))[0] or 1
    fleet = start_fleet(args.model, args.split_layer, replicas=replicas, autoscale=autoscale,
                        ray_address=args.ray_address, port=args.port,
                        replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                        drain_s=drain_s, **options)
    scale = (f"autoscaling {autoscale[0]}..{autoscale[1]} replicas" if autoscale
             else f"{replicas} replica(s)")
    where = (f"of the cluster's proxy nodes ({args.ray_address})" if args.ray_address
             else f"of every interface ({fleet.address} here)")
    print(f"fc-edge serve: {args.model} on Ray Serve, {scale}; gRPC proxy on port "
          f"{fleet.address.rsplit(':', 1)[1]} {where}"
          + (" [token required]" if args.token else ""), flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("fc-edge serve: stopping the fleet", flush=True)
        fleet.stop()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
