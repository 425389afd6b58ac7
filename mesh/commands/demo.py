"""`mesh demo`: the main job — a local N-node mesh on loopback, one prompt, text streamed."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from mesh import models
from mesh.commands import add_sampling_arguments
from mesh.errors import MeshError
from mesh.sizing import check_budget, memory_bytes, model_profile
from mesh.testing.kills import parse_kill, stream_with_faults
from mesh.testing.launcher import LocalCluster
from mesh.testing.faults import verify_args

class DemoConfigError(MeshError):
    pass


DEFAULT_PROMPT = "Explain in three sentences why splitting a language model across devices helps."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start a local N-node mesh on loopback, run one prompt, stop it",
                       description="Starts N real `mesh join` processes on 127.0.0.1 with a fresh secret, waits "
                                   "for the coordinator and the pipeline, streams one answer, then stops them all.")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes to start (default 3)")
    p.add_argument("--backend", choices=["torch", "mlx", "mixed"], default="torch",
                   help="compute backend of the nodes; mixed alternates torch and mlx (default torch)")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name, .gguf path or HF directory")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message to send")
    add_sampling_arguments(p, max_tokens=96)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--weight-mode", choices=["float32", "quant"], default="float32",
                   help="float32 weights or the faster quantized mode (default float32)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault (repeatable): kill:stage=K:after=T or kill:coordinator:after=T "
                        "SIGKILLs that node's process after T generated tokens; stage=K:SPEC makes the node "
                        "holding stage K cheat (tamper:scale=E, skip-layer:L, noise:sigma=S, stale, corrupt-wire, "
                        "lie-digest, refuse-fetch[:flip|pos|step|silent], withhold[:late=S])")
    p.add_argument("--node-memory", metavar="SIZE",
                   help="memory budget of each node, e.g. 300MiB (`mesh join --memory`; default: 80%% of available)")
    p.add_argument("--audit-rate", type=float, default=0.2, help="share of stage steps audited (default 0.2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the cluster (default 300)")
    p.add_argument("--keep-logs", action="store_true", help="keep the nodes' state dirs and logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.kills = [k for k in (parse_kill(spec) for spec in args.fault) if k is not None]
    args.node_args = verify_args(args.audit_rate, [s for s in args.fault if parse_kill(s) is None])
    path = models.resolve(args.model, fetch=True, progress=sys.stderr.isatty())  # once here, not in every node
    if args.node_memory is not None:
        _check_node_memory(args, path)
    return asyncio.run(_demo(args))


def _check_node_memory(args: argparse.Namespace, path) -> None:
    """What the nodes would refuse at start, said once here: a bad size, a budget more than
    the machine has or too small for one layer, nodes that together cannot hold the model."""
    import psutil

    from kernels.config import load_config
    from mesh.node import NodeConfig
    from mesh.planner import NodeCapacity, plan

    try:
        budget = memory_bytes(args.node_memory)
    except ValueError as exc:
        raise DemoConfigError(f"--node-memory: {exc}") from None
    defaults = NodeConfig()
    profile = model_profile(load_config(path), args.weight_mode, kv_sessions=defaults.kv_sessions,
                            kv_context=defaults.kv_context)
    check_budget(budget, profile, psutil.virtual_memory().total, flag="--node-memory")
    plan([NodeCapacity(f"node{i}", budget, 1.0) for i in range(args.nodes)], profile)  # InsufficientMemory


async def _demo(args: argparse.Namespace) -> int:
    memory = ["--memory", args.node_memory] if args.node_memory is not None else []
    cluster = LocalCluster(n=args.nodes, backend=args.backend, model=args.model, keep_dir=args.keep_logs,
                           extra_args=["--weight-mode", args.weight_mode, *memory, *args.node_args])
    with cluster:
        if not args.json:
            print(f"starting {args.nodes} nodes on 127.0.0.1 (logs in {cluster.workdir}) ...", file=sys.stderr)
        view = await cluster.wait_ready(timeout=args.timeout, stages=args.nodes)
        if not args.json:
            stages = ", ".join(f"{s['node'][:8]}:{s['layers'][0]}-{s['layers'][1]}({s['backend']})"
                               for s in view["plan"]["stages"])
            print(f"coordinator {view['coordinator'][:8]} term {view['term']}; pipeline {stages}", file=sys.stderr)
        def show(text: str) -> None:
            if not args.json:
                sys.stdout.write(text)
                sys.stdout.flush()

        result, failovers, serving = await stream_with_faults(
            cluster, view, args.prompt, args.kills, quiet=args.json, on_text=show, max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw)
        final = await _final_view(cluster, serving) or view
    mesh = result.mesh
    if args.json:
        print(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_token_ids": result.prompt_token_ids,
            "finish_reason": result.finish_reason,
            "ttft_s": result.ttft_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "coordinator": final.get("coordinator"),
            # the plan the answer started on (before any failover or eviction)
            "plan_at_start": [{"index": s["index"], "node": s["node"], "layers": s["layers"], "backend": s["backend"]}
                              for s in view["plan"]["stages"]],
            "term": final.get("term"),
            # the plan at the end of the run: after an eviction, the one without the flagged node
            "pipeline": [{"index": s["index"], "node": s["node"], "layers": s["layers"], "backend": s["backend"]}
                         for s in (final.get("plan") or {}).get("stages", [])] or mesh.get("pipeline", []),
            "verification": final.get("verification") or mesh.get("verification", {}),
            # the kills' records (with the token each came at), else the cluster's list once settled
            "failovers": failovers if args.kills else final.get("failovers", failovers),
            "nodes": args.nodes,
            "backend": args.backend,
        }))
    else:
        print(f"\n\n[{len(result.token_ids)} tokens, ttft {result.ttft_s:.2f}s, "
              f"{result.decode_tokens_per_s:.1f} tokens/s, finish={result.finish_reason}]", file=sys.stderr)
    return 0


async def _final_view(cluster: LocalCluster, index: int, settle_s: float = 15.0) -> dict | None:
    """The serving node's view once the audits of this run have settled (they run off the
    critical path, so the last ones may finish just after the answer), with the
    coordinator's verification counters: the other nodes hear them up to a second late."""
    import aiohttp

    deadline = asyncio.get_running_loop().time() + settle_s
    async with aiohttp.ClientSession() as http:
        await asyncio.sleep(0.5)  # the last chunk's commitments reach the coordinator
        while True:
            views, coordinator = await cluster.statuses(http)
            view = views[index] if index < len(views) else None
            verification = (coordinator or view or {}).get("verification") or {}
            if not verification.get("audits_pending") or asyncio.get_running_loop().time() > deadline:
                if view is not None and coordinator is not None:
                    view = {**view, "verification": verification}
                return view
            await asyncio.sleep(0.2)
