"""Messages the runtime itself sends between nodes (registered like any other message)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .messages import message


@message("actors.Tell")
@dataclass
class Tell:
    to: str
    msg: Any
    sender: str | None = None  # name of the sending actor on the sending node


@message("actors.Ask")
@dataclass
class Ask:
    id: int
    to: str
    msg: Any


@message("actors.Reply")
@dataclass
class Reply:
    id: int
    msg: Any


@message("actors.Failure")
@dataclass
class Failure:
    id: int
    kind: str
    text: str


@message("actors.Ping")
@dataclass
class Ping:
    pass


@message("actors.Watch")
@dataclass
class Watch:
    name: str


@message("actors.Terminated")
@dataclass
class Terminated:
    """Sent to watchers when an actor stops for good (stopped, crashed past its limit, or its node went away)."""

    node_id: str
    name: str
    reason: str
