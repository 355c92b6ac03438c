"""The ``fc-edge profile`` verb: a thin front over :func:`fc_edge.profile.profiler.run_profile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fc_edge.errors import ConfigError
from fc_edge.profile.link import DEFAULT_LINKS


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fc_edge.cli import add_codec_args, add_model_args
    from fc_edge.profile.profiler import DEFAULT_CODECS, DEFAULT_PROMPT_LENGTHS

    add_model_args(p)
    p.add_argument("--split-layer", type=int, default=None,
                   help="split layer (default: the runtime's, a quarter of the layers)")
    p.add_argument("--prompt-lengths", default=DEFAULT_PROMPT_LENGTHS,
                   help="comma-separated prompt lengths in tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=8,
                   help="tokens generated per run (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds: generations per codec and prompt length, the codecs "
                   "taking turns within each round (default %(default)s)")
    p.add_argument("--links", default=DEFAULT_LINKS,
                   help="comma-separated presets or RATE[:LATENCY[:JITTER[:LOSS]]] "
                   "(default %(default)s)")
    p.add_argument("--sim-link", default=None,
                   help="link of the multi-client simulation (default: the first of --links)")
    p.add_argument("--workers", type=int, default=1,
                   help="server workers in the multi-client simulation (default %(default)s)")
    p.add_argument("--server-speedup", type=float, default=1.0,
                   help="simulate a server this many times faster than the measured one, e.g. "
                   "a GPU server (default %(default)s)")
    p.add_argument("--sim-clients", default="1,2,4,8,16,32,64",
                   help="client counts to simulate ('' to skip; default %(default)s)")
    p.add_argument("--check-clients", default="1,2,4,8",
                   help="real concurrent clients on loopback vs the simulation "
                   "('' to skip; default %(default)s)")
    p.add_argument("--shaped-check", choices=["auto", "off"], default="auto",
                   help="time payloads over a tbf-shaped veth link between two network "
                   "namespaces and compare with the analytic links (needs root; 'auto' skips "
                   "with the reason otherwise)")
    p.add_argument("--shaped-links", default="",
                   help="also run the runtime itself (server and client in namespaces) over "
                   "shaped links at these links' rates, e.g. 5g,wifi6 (root; default none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process, server and client (default %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="where the head and the tail run: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision of the head and the tail")
    p.add_argument("--prompt-seed", type=int, default=0,
                   help="seed of the random prompt ids and of the simulation (default 0)")
    p.add_argument("--out", default="profile-out", help="report folder (default %(default)s)")
    add_codec_args(p, default=DEFAULT_CODECS, multiple=True)


def config_from_args(args: argparse.Namespace):
    from fc_edge.cli import codec_kwargs
    from fc_edge.profile.link import parse_links
    from fc_edge.profile.profiler import ProfileConfig

    return ProfileConfig(
        model=args.model, split_layer=args.split_layer,
        codecs=[c.strip() for c in args.codecs.split(",") if c.strip()],
        codec_kwargs=codec_kwargs(args),
        prompt_lengths=_ints(args.prompt_lengths, "--prompt-lengths"),
        new_tokens=args.new_tokens, repeats=args.repeats, links=parse_links(args.links),
        sim_link=args.sim_link, workers=args.workers, server_speedup=args.server_speedup,
        sim_clients=_ints(args.sim_clients, "--sim-clients"),
        check_clients=_ints(args.check_clients, "--check-clients"),
        threads=args.threads, seed=args.prompt_seed, out=Path(args.out),
        device=args.device, dtype=args.dtype,
        shaped_check=args.shaped_check == "auto",
        shaped_links=parse_links(args.shaped_links) if args.shaped_links else [],
    )


def run(args: argparse.Namespace) -> int:
    from fc_edge.devices import resolve_device, resolve_dtype
    from fc_edge.profile.profiler import run_profile

    resolve_dtype(args.dtype, resolve_device(args.device))  # before any process starts

    report = run_profile(config_from_args(args))
    print((Path(args.out) / "profile.md").read_text())
    check = report.get("multi_client_check")
    if check and not check["all_within_tolerance"]:
        print("note: the multi-client check is outside its tolerance on this host (see the "
              "table above); the simulation's numbers are a model, not a measurement.")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="per-stage latency of the real runtime, links, multi-client scaling",
        description="Run the edge server (child process) and the device client, time every "
        "stage per codec, apply analytic links, simulate N clients, and write a report.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p
