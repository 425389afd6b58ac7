"""`mesh status`: the cluster as one node sees it — nodes, coordinator and term, the plan."""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp

from mesh.commands.run import add_api_arguments, api_key, find_api
from mesh.errors import MeshError


class StatusUnavailable(MeshError):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the cluster: nodes, coordinator and term, the layer plan",
                       description="Ask one node (found by mDNS, or --api) for its view of the cluster.")
    add_api_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print the /v1/cluster object (keys self, coordinator, term, nodes, plan, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    api = asyncio.run(find_api(args))
    view = asyncio.run(fetch_view(api, api_key(args)))
    if args.json:
        print(json.dumps(view))
    else:
        print_view(view, api)
    return 0


async def fetch_view(api: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(api.rstrip("/") + "/v1/cluster", headers=headers) as resp:
                if resp.status != 200:
                    raise StatusUnavailable(f"{api} answered {resp.status}: {(await resp.text())[:200]}")
                return await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise StatusUnavailable(f"cannot reach {api}: {exc or type(exc).__name__}; is a node running there?") from None


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _score(node: dict) -> str:
    """The speed score in layers/s, and the one the plan uses when a faster node shares its host."""
    speed, used = node.get("speed"), node.get("plan_speed")
    if not isinstance(speed, (int, float)):
        return "-"
    text = f"{speed:.3g}"
    if isinstance(used, (int, float)) and used != speed:
        text += f" (plan: {used:.3g})"
    return text


def _shared(node: dict, nodes: list[dict], names: dict) -> str:
    host = node.get("host")
    peers = [names.get(n["id"], n["id"][:8]) for n in nodes if host and n.get("host") == host and n["id"] != node["id"]]
    return f"; same host as {', '.join(peers)}: equal shares, by the best score there" if peers else ""


def _membership(node: dict) -> str:
    if node.get("voter"):
        return "voter"
    return "learner" if node.get("member") else "no (not admitted)"


def print_view(view: dict, api: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    names = {n["id"]: n.get("name") or n["id"][:8] for n in view.get("nodes", [])}
    coord = view.get("coordinator")
    console.print(f"[bold]mesh[/bold] via {api} · model [bold]{view.get('model', '?')}[/bold] · coordinator "
                  f"[bold]{names.get(coord, coord) or 'none'}[/bold] ({(coord or '-')[:16]}) · term {view.get('term')}")
    table = Table(show_edge=False)
    for col in ("key (node id)", "name", "member", "address", "backend", "device", "free memory", "score", "state",
                "roles"):
        table.add_column(col)
    for n in view.get("nodes", []):
        me = " (this)" if n["id"] == view.get("self") else ""
        table.add_row(n["id"][:16], (n.get("name") or "-") + me, _membership(n), n.get("address") or "-",
                      n.get("backend") or "-", n.get("device") or "-", _size(n.get("free_memory")), _score(n),
                      n.get("state") or "-", ", ".join(n.get("roles") or []) or "-")
    console.print(table)
    for n in view.get("nodes", []):
        console.print(f"  score of {names.get(n['id'], n['id'][:8])}: {n.get('speed_source') or 'not stated'}"
                      + _shared(n, view.get("nodes", []), names))
    admission = view.get("admission") or {}
    pending = admission.get("pending") or []
    if pending:
        console.print(f"[yellow]waiting to join[/yellow] (approve with `mesh admit KEY`): {', '.join(pending)}")
    for node, held in (view.get("held_out") or {}).items():
        console.print(f"[yellow]held out[/yellow] {names.get(node, node[:8])} ({node[:16]}) for {held['for_s']:.0f} s: "
                      f"{held['reason']}")
    plan = view.get("plan")
    if not plan:
        console.print("plan: none yet")
        return
    state = "serving" if plan.get("ready") else ("error: " + plan["error"] if plan.get("error") else "loading")
    console.print(f"plan term {plan['term']} version {plan['version']}: {state}")
    for s in plan.get("stages", []):
        a, b = s["layers"]
        console.print(f"  stage {s['index']}: layers {a}-{b - 1} on {names.get(s['node'], s['node'][:8])} ({s['backend']})")
    failovers = view.get("failovers") or []
    if failovers:
        console.print(f"failovers: {len(failovers)} (last: {failovers[-1]})")
    v = view.get("verification") or {}
    if v:
        console.print(f"verification: {v.get('commitments', 0)} commitments, {v.get('verified_links', 0)} verified "
                      f"links, {v.get('audits', 0)} audits, {v.get('audit_failures', 0)} failed")
    for f in v.get("flagged_nodes") or []:
        console.print(f"[red]flagged[/red] {names.get(f['node'], f['node'][:8])} ({f['node'][:16]}): {f['reason']}")
