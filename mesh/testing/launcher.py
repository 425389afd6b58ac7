"""Start and stop a local cluster of real `python -m mesh join` processes on loopback.

Used by `mesh demo`, the benchmarks and the end-to-end tests: a fresh secret and
state dirs in a temporary folder, free ports, mDNS restricted to 127.0.0.1 (plus
static peers so start-up does not wait on multicast), and every process stopped on
exit, Ctrl-C or error.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from mesh.errors import MeshError


class ClusterStartFailed(MeshError):
    pass


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """A preexec function: on Linux the child gets SIGKILL when the launcher dies (a killed
    pytest or demo must not leave `mesh join` processes holding GBs). The signal follows
    the thread that forked, so spawn from a long-lived thread (every caller here uses the
    main one). Elsewhere: None, and `stop()` is the only cleanup."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return arm


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalNode:
    index: int
    port: int
    api_port: int
    state_dir: Path
    backend: str
    log_path: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    node_id: str | None = None
    api_key: str | None = None

    @property
    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalCluster:
    n: int = 3
    backend: str = "torch"  # torch | mlx | mixed (torch and mlx alternate)
    model: str = "smollm2-135m"
    extra_args: list[str] = field(default_factory=list)
    node_args: dict[int, list[str]] = field(default_factory=dict)
    api_keys: dict[int, str] = field(default_factory=dict)  # node index -> the key its API requires (in a 0600 file)
    keep_dir: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-cluster-"))
        self.secret_file = self.workdir / "secret"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        self.nodes: list[LocalNode] = []
        ports = [(free_port(), free_port()) for _ in range(self.n)]
        for i, (port, api_port) in enumerate(ports):
            backend = self.backend if self.backend != "mixed" else ("torch" if i % 2 == 0 else "mlx")
            peers = [a for j, (p, _) in enumerate(ports) if j != i for a in ("--peer", f"127.0.0.1:{p}")]
            state = self.workdir / f"node{i}"
            key_args = []
            if i in self.api_keys:
                key_file = self.workdir / f"node{i}.api-key"
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(self.api_keys[i] + "\n")
                key_args = ["--api-key-file", str(key_file)]
            args = [sys.executable, "-m", "mesh", "join", "--cluster", "demo", "--secret-file", str(self.secret_file),
                    "--host", "127.0.0.1", "--port", str(port), "--api-port", str(api_port),
                    "--interface", "127.0.0.1", *peers, "--backend", backend, "--model", self.model,
                    "--name", f"node{i}", "--state-dir", str(state), "--log-format", "json",
                    "--log-level", self.log_level, *self.extra_args, *key_args, *self.node_args.get(i, [])]
            self.nodes.append(LocalNode(i, port, api_port, state, backend, self.workdir / f"node{i}.log", args,
                                        api_key=self.api_keys.get(i)))

    def start(self) -> None:
        for node in self.nodes:
            self._spawn(node)

    def _spawn(self, node: LocalNode) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(node.log_path, "ab")
        node.proc = subprocess.Popen(node.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        log.close()

    def restart(self, index: int) -> None:
        """Start a stopped or killed node again, with its state dir and ports: it comes back
        with the same identity and rejoins the cluster."""
        node = self.nodes[index]
        if node.alive:
            raise ClusterStartFailed(f"node{index} is still running")
        self._spawn(node)

    def kill(self, index: int) -> None:
        node = self.nodes[index]
        if node.alive:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(5)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)
        if not self.keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, index: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.nodes[index].log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def status(self, index: int, session: aiohttp.ClientSession) -> dict | None:
        try:
            node = self.nodes[index]
            async with session.get(node.api + "/v1/cluster", headers=node.api_headers, timeout=aiohttp.ClientTimeout(total=2)) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
            return None

    async def statuses(self, session: aiohttp.ClientSession) -> tuple[list[dict | None], dict | None]:
        """Every node's /v1/cluster (None where it is down) and the coordinator's among them:
        its verification counters are live, the others hear them up to a second late."""
        views = [await self.status(n.index, session) if n.alive else None for n in self.nodes]
        return views, next((v for v in views if v and v.get("self") == v.get("coordinator")), None)

    async def wait_ready(self, timeout: float = 180.0, stages: int | None = None) -> dict:
        """Wait until every live node reports the same ready plan with ``stages`` stages."""
        want = stages if stages is not None else sum(1 for n in self.nodes if n.alive)
        deadline = time.monotonic() + timeout
        last: dict | None = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                for node in self.nodes:
                    if node.proc is not None and node.proc.poll() is not None and node.proc.returncode not in (
                            -signal.SIGKILL, 0):
                        raise ClusterStartFailed(
                            f"node{node.index} exited with {node.proc.returncode}:\n{self.log_tail(node.index)}")
                views = [await self.status(n.index, http) if n.alive else None for n in self.nodes]
                for node, view in zip(self.nodes, views):
                    if view is not None:
                        node.node_id = view.get("self")
                live = [v for n, v in zip(self.nodes, views) if n.alive]
                if live and all(v is not None for v in live):
                    plans = {json.dumps(v.get("plan"), sort_keys=True) for v in live}
                    last = live[0]
                    plan = last.get("plan") or {}
                    if len(plans) == 1 and plan.get("ready") and len(plan.get("stages", [])) == want:
                        return last
                await asyncio.sleep(0.2)
        raise ClusterStartFailed(f"the cluster was not ready within {timeout:.0f}s; last view: {json.dumps(last)}"
                                 f"\nlog of node0:\n{self.log_tail(0)}")

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
