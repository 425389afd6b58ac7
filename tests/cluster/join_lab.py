"""Real `python -m mesh join` processes for tests and benchmarks, in private namespaces or on loopback.

    with JoinLab(3, netns=True) as lab:        # nodes at 10.77.0.1.. on a bridge, mDNS only
        lab.start_all()
        lab.wait(lambda: lab.agreed(range(3)), 10, "a cluster")
        lab.kill(0); lab.link_down(1); lab.link_up(1)
        lab.view(2)                              # GET /v1/cluster, None when it does not answer

With `netns=True` every node runs in its own namespace (`tests/netns.py`), binds its
address there (`--host/--interface ADDR`, no `--peer`: discovery is mDNS alone) and keeps
its API on 127.0.0.1 inside the namespace; an `ns_agent.py` per namespace relays HTTP.
With `netns=False` the nodes share 127.0.0.1 (`--interface 127.0.0.1`), still without `--peer`.
Nothing here waits without a bound: every wait takes a timeout and fails with a message.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/netns.py

from netns import NetnsLab  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PEER_PORT, API_PORT = 7946, 8080


def write_secret(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """An `ns_agent.py` process inside one namespace; answers are read with a timeout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def send(self, req: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the namespace agent did not answer within {timeout}s") from None

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.send(req)
            return self.next(req.get("timeout", 2.0) + 5.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class JoinLab:
    def __init__(self, n: int, *, netns: bool, extra_nodes: int = 0, join_args: Iterable[str] = (),
                 workdir: Path | None = None) -> None:
        self.n = n + extra_nodes
        self.netns = netns
        self.join_args = list(join_args)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mesh-joinlab-"))
        self.secret = write_secret(self.workdir / "secret")
        self.net: NetnsLab | None = NetnsLab(self.n) if netns else None
        if self.net is not None:
            self.addresses = list(self.net.addresses)
            self.ports = [(PEER_PORT, API_PORT)] * self.n
        else:
            self.addresses = ["127.0.0.1"] * self.n
            self.ports = [(_free_port(), _free_port()) for _ in range(self.n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.n
        self.agents: list[Agent | None] = [None] * self.n
        self.others: list[subprocess.Popen[Any]] = []
        self.ids: list[str | None] = [None] * self.n
        self.launched: list[float] = [0.0] * self.n  # time.time() of each node's latest start

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> JoinLab:
        if self.net is not None:
            self.net.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, i: int, argv: list[str]) -> list[str]:
        return self.net.command(i, argv) if self.net is not None else list(argv)

    def log_path(self, i: int) -> Path:
        return self.workdir / f"node{i}.log"

    def join_argv(self, i: int, *, secret: Path | None = None, extra: Iterable[str] = ()) -> list[str]:
        host = self.addresses[i]
        port, api_port = self.ports[i]
        return [sys.executable, "-m", "mesh", "join", "--cluster", "home", "--secret-file", str(secret or self.secret),
                "--host", host, "--port", str(port), "--interface", host, "--api-port", str(api_port),
                "--name", f"node{i}", "--state-dir", str(self.workdir / f"state{i}"), "--log-format", "json",
                "--backend", "torch", "--threads", "1", *self.join_args, *extra]

    def start(self, i: int, *, secret: Path | None = None, extra: Iterable[str] = ()) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.launched[i] = time.time()
        with open(self.log_path(i), "ab") as log:
            self.procs[i] = subprocess.Popen(self.command(i, self.join_argv(i, secret=secret, extra=extra)),
                                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if self.net is not None and self.agents[i] is None:
            self.agents[i] = Agent(self.net.command(i, [sys.executable, str(HERE / "ns_agent.py")]))

    def start_all(self, indices: Iterable[int] | None = None) -> None:
        for i in indices if indices is not None else range(self.n):
            self.start(i)

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.command(i, argv), cwd=ROOT, **kwargs)
        self.others.append(proc)
        return proc

    def kill(self, i: int) -> float:
        """SIGKILL node i; returns the time of the kill (time.time())."""
        proc = self.procs[i]
        assert proc is not None
        t = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        return t

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def link_down(self, i: int) -> None:
        assert self.net is not None, "a partition needs namespaces"
        self.net.link_down(i)

    def link_up(self, i: int) -> None:
        assert self.net is not None
        self.net.link_up(i)

    def close(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in [*self.procs, *self.others]:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for agent in self.agents:
            if agent is not None:
                agent.close()
        if self.net is not None:
            self.net.cleanup()
        if not os.environ.get("MESH_KEEP_LAB"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- HTTP --------------------------------------------------------------------------

    def api(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i][1]}"

    def request(self, i: int, path: str, *, method: str = "GET", body: Any = None,
                timeout: float = 2.0) -> tuple[int, str]:
        """(status, body); status 0 when the node did not answer (refused, timed out)."""
        req = {"url": self.api(i) + path, "method": method, "body": body, "timeout": timeout}
        agent = self.agents[i]
        if agent is not None:
            out = agent.request(req)
            return out["status"], out.get("body", out.get("error", ""))
        data = json.dumps(body).encode() if body is not None else None
        r = urllib.request.Request(req["url"], data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(r, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except Exception as exc:
            return 0, repr(exc)

    def view(self, i: int, timeout: float = 1.0) -> dict[str, Any] | None:
        if not self.alive(i):
            return None
        status, body = self.request(i, "/v1/cluster", timeout=timeout)
        if status != 200:
            return None
        view = json.loads(body)
        self.ids[i] = view.get("self")
        return view

    # ---- what the nodes agree on -------------------------------------------------------

    def views(self, indices: Iterable[int]) -> list[dict[str, Any] | None]:
        return [self.view(i) for i in indices]

    def agreed(self, indices: Iterable[int]) -> tuple[str, int] | None:
        """(coordinator, term) if these nodes all see it, and exactly these nodes as voters."""
        indices = list(indices)
        views = self.views(indices)
        if any(v is None for v in views):
            return None
        ids = {v["self"] for v in views}  # type: ignore[index]
        seen = {(v["coordinator"], v["term"]) for v in views}  # type: ignore[index]
        if len(seen) != 1 or None in next(iter(seen)):
            return None
        for v in views:
            voters = {n["id"] for n in v["nodes"] if n["voter"]}  # type: ignore[index]
            if voters != ids:
                return None
        return next(iter(seen))

    @staticmethod
    def wait(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(every)

    # ---- logs --------------------------------------------------------------------------

    def events(self, i: int) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path(i).read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def event_time(self, i: int, event: str, last: bool = True) -> float | None:
        """Unix time of node i's (last) log event named `event`."""
        times = [datetime.fromisoformat(e["timestamp"]).timestamp() for e in self.events(i)
                 if e.get("event") == event and "timestamp" in e]
        return (times[-1] if last else times[0]) if times else None

    def wait_started(self, indices: Iterable[int], timeout: float = 90.0) -> float:
        """Wait until these nodes logged `cluster.started`; the time the last one did."""
        indices = list(indices)

        def started() -> float | None:
            for i in indices:
                proc = self.procs[i]
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"node{i} exited with {proc.returncode}:\n{self.tail(i)}")
            times = [self.event_time(i, "cluster.started") for i in indices]
            if any(t is None or t < self.launched[i] for i, t in zip(indices, times)):
                return None  # not yet, or only a previous incarnation's line
            return max(times)  # type: ignore[type-var]

        return self.wait(started, timeout, f"nodes {indices} to start their cluster service", every=0.1)

    def tail(self, i: int, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path(i).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def same_coordinator(lab: JoinLab, indices: Iterable[int], not_in: Iterable[str | None] = ()) -> tuple[str, int] | None:
    """(coordinator, term) if these nodes all name the same one (whatever the voters)."""
    views = lab.views(indices)
    if any(v is None for v in views):
        return None
    seen = {(v["coordinator"], v["term"]) for v in views}  # type: ignore[index]
    if len(seen) != 1:
        return None
    coord, term = next(iter(seen))
    return None if coord is None or coord in set(not_in) else (coord, term)


def state_of(view: dict[str, Any] | None, node_id: str | None) -> str | None:
    if view is None:
        return None
    return next((n["state"] for n in view["nodes"] if n["id"] == node_id), None)
