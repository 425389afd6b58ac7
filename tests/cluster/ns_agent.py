"""HTTP from inside a network namespace: one JSON request per stdin line, JSON answers on stdout.

`JoinLab` starts one per namespace (`ip netns exec NS python ns_agent.py`) so that the test,
which lives in the root namespace, can reach APIs bound to 127.0.0.1 inside each node's
namespace without paying a process start per request.

    {"url": "...", "method": "GET", "body": {...}, "timeout": 2, "stream": false}
    -> {"status": 200, "body": "..."}                                 (stream false)
    -> {"line": "data: ...", "t": <unix time>} ... {"end": 200, "t": ...}  (stream true)
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request


def answer(req: dict) -> None:
    data = json.dumps(req["body"]).encode() if req.get("body") is not None else None
    r = urllib.request.Request(req["url"], data=data, method=req.get("method", "GET"),
                               headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=req.get("timeout", 2.0)) as resp:
            if not req.get("stream"):
                print(json.dumps({"status": resp.status, "body": resp.read().decode(errors="replace")}), flush=True)
                return
            for raw in resp:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line:
                    print(json.dumps({"line": line, "t": time.time()}), flush=True)
            print(json.dumps({"end": resp.status, "t": time.time()}), flush=True)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        key = "end" if req.get("stream") else "status"
        print(json.dumps({key: exc.code, "body": body, "t": time.time()}), flush=True)
    except Exception as exc:  # refused, timed out, reset: the caller decides what it means
        key = "end" if req.get("stream") else "status"
        print(json.dumps({key: 0, "error": repr(exc), "t": time.time()}), flush=True)


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            answer(json.loads(line))


if __name__ == "__main__":
    main()
