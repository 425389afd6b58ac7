"""`mesh join`: run this device as a node of the home cluster until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from actors import log as actors_log
from mesh import models
from mesh.errors import MeshError
from mesh.secret_files import read_secret_file


class ConfigError(MeshError):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("join", help="run this device as a node of the cluster (until Ctrl-C)",
                       description="Join (or start) the home cluster: find peers by mDNS and --peer, elect a "
                                   "coordinator, take a share of the model's layers and serve the API.")
    p.add_argument("--cluster", default="home", help="cluster name (default: home)")
    p.add_argument("--secret-file", type=Path,
                   help="file with the cluster secret (`mesh secret new PATH`); required off loopback")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on for peers (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="peer port (default: pick a free one)")
    p.add_argument("--api-host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1)")
    p.add_argument("--api-port", type=int, default=0, help="port of the HTTP API (default: pick a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route (visible in `ps`: "
                                     "prefer --api-key-file or $MESH_API_KEY)")
    p.add_argument("--api-key-file", type=Path, metavar="PATH",
                   help="read the API key from PATH (mode 0600; `mesh secret new PATH` writes one)")
    p.add_argument("--api-allow-host", action="append", default=[], dest="api_allow_hosts", metavar="NAME",
                   help="also serve the API under this Host name (repeatable; .suffix allows a domain). "
                        "IP addresses, localhost and --host/--api-host/--interface are always allowed")
    p.add_argument("--api-allow-origin", action="append", default=[], dest="api_allow_origins", metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (CORS; repeatable)")
    p.add_argument("--api-max-generations", type=int, default=16, metavar="N",
                   help="generations this node's API runs at once; 4x as many may wait, the rest get 429 (default 16)")
    p.add_argument("--interface", action="append", default=[], dest="interfaces", metavar="ADDR",
                   help="address of an interface mDNS may use (repeatable); without it, --host")
    p.add_argument("--peer", action="append", default=[], dest="peers", metavar="HOST:PORT",
                   help="a peer to dial directly, for networks without multicast (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS; only --peer")
    p.add_argument("--backend", choices=["auto", "torch", "mlx"], default="auto",
                   help="compute backend (auto: mlx on Apple silicon, torch elsewhere)")
    p.add_argument("--weight-mode", choices=["float32", "quant"], default="float32",
                   help="float32 weights, or the faster quantized mode")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name, .gguf path or HF directory")
    p.add_argument("--name", help="a human name for this device (default: hostname)")
    p.add_argument("--state-dir", type=Path, help="where the node key and votes live (default $MESH_HOME/node)")
    p.add_argument("--memory", help="memory to offer for layers and their KV caches, e.g. 2GiB; refused if more "
                                    "than the machine has or too little for one layer; 0: no layers, the node only "
                                    "votes and serves clients (default: 80%% of available)")
    p.add_argument("--kv-sessions", type=int, default=4, metavar="N",
                   help="concurrent sessions per stage whose KV cache the plan reserves memory for (default 4)")
    p.add_argument("--kv-context", type=int, default=2048, metavar="TOKENS",
                   help="tokens of context each reserved session may hold (default 2048, at most the model's)")
    p.add_argument("--threads", type=int, help="compute threads (default: half the cores)")
    p.add_argument("--speed", type=_positive, metavar="SCORE",
                   help="speed score the planner shares layers by (default: measured at start; "
                        "equal scores give equal shares)")
    p.add_argument("--no-campaign", action="store_true",
                   help="vote in elections but never become coordinator (for a node that mostly serves clients)")
    p.add_argument("--admit", choices=["auto", "ask", "pinned"], default="auto",
                   help="who may join, when this node is the coordinator: auto = any device with the secret "
                        "(shown in `mesh status` and the logs; default), ask = a member approves each new key "
                        "with `mesh admit KEY`, pinned = only the --admit-key ids")
    p.add_argument("--admit-key", action="append", default=[], dest="admit_keys", metavar="NODE_ID",
                   help="with --admit pinned: a node id (16 hex, as `mesh status` shows it) to admit (repeatable)")
    p.add_argument("--max-voters", type=int, default=3, metavar="N",
                   help="members with a vote, the longest-standing first; later ones replicate without (default 3)")
    p.add_argument("--audit-rate", type=float, default=0.2,
                   help="share of stage steps an auditor re-checks, 0..1 (default 0.2)")
    p.add_argument("--fault", metavar="SPEC",
                   help="tests only: misbehave as [stage=K:]tamper:scale=E | skip-layer:L | noise:sigma=S | stale "
                        "| corrupt-wire | lie-digest | refuse-fetch[:flip|pos|step|silent] | withhold[:late=S] "
                        "(see mesh/testing/faults.py)")
    p.add_argument("--log-format", choices=["console", "json"], default="console", help="log format")
    p.add_argument("--log-level", default="info", help="log level (debug, info, warning)")
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def config_from_args(args: argparse.Namespace):
    from mesh.node import NodeConfig
    from mesh.sizing import memory_bytes
    from mesh.verify.service import VerifyConfig

    from mesh.http.guard import ApiPolicy

    secret = read_secret_file(args.secret_file, flag="--secret-file") if args.secret_file is not None else None
    try:
        memory = memory_bytes(args.memory) if args.memory is not None else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.api_max_generations < 1:
        raise ConfigError("--api-max-generations must be at least 1")
    if args.max_voters < 1:
        raise ConfigError("--max-voters must be at least 1")
    if args.kv_sessions < 1 or args.kv_context < 1:
        raise ConfigError("--kv-sessions and --kv-context must be at least 1")
    if args.admit_keys and args.admit != "pinned":
        raise ConfigError("--admit-key is for --admit pinned")
    from mesh.cluster.admission import Admission

    Admission(args.admit, args.admit_keys)  # AdmissionError (a MeshError) names a bad key
    policy = ApiPolicy(allow_hosts=args.api_allow_hosts, allow_origins=args.api_allow_origins,
                       max_generations=args.api_max_generations, max_queue=4 * args.api_max_generations)
    return NodeConfig(model=args.model, cluster=args.cluster, secret=secret, host=args.host, port=args.port,
                      api_host=args.api_host, api_port=args.api_port, api_key=api_key_from(args, os.environ),
                      api_policy=policy,
                      interfaces=args.interfaces or [args.host], peers=args.peers, mdns=not args.no_mdns,
                      backend=args.backend, weight_mode=args.weight_mode, name=args.name, state_dir=args.state_dir,
                      memory_limit=memory, kv_sessions=args.kv_sessions, kv_context=args.kv_context,
                      threads=args.threads, speed=args.speed, campaign=not args.no_campaign,
                      admit=args.admit, admit_keys=[k.lower() for k in args.admit_keys], max_voters=args.max_voters,
                      # the only place the MESH_* verification variables are read (benches set them)
                      verify=VerifyConfig.from_env(os.environ, audit_rate=args.audit_rate, fault=args.fault))


def api_key_from(args: argparse.Namespace, env) -> str | None:
    """--api-key, else --api-key-file, else $MESH_API_KEY (argv is visible to every user in `ps`)."""
    if args.api_key and args.api_key_file:
        raise ConfigError("pass --api-key or --api-key-file, not both")
    if args.api_key:
        return args.api_key
    if args.api_key_file is not None:
        return read_secret_file(args.api_key_file, flag="--api-key-file").decode("utf-8", "replace")
    return env.get("MESH_API_KEY") or None


def run(args: argparse.Namespace) -> int:
    actors_log.configure(format=args.log_format, level=args.log_level.upper())
    config = config_from_args(args)
    import actors

    return actors.run(_serve(config))


async def _serve(config) -> int:
    from mesh.node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    await node.start()  # a node that could not start has nothing to stop (as `async with Node(...)`)
    try:
        await stop.wait()
    finally:
        await node.stop()
    return 0
