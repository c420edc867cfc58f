"""Tools an environment lets the model call; each answers with text for the model and a ToolTrace."""

from __future__ import annotations

from typing import Protocol

import msgspec

from schemas.sessions import ToolTrace


class ToolOutput(msgspec.Struct, frozen=True):
    """A tool's response: `text` goes to the model, `trace` onto the session."""

    text: str
    trace: ToolTrace


class Connector(Protocol):
    """A tool. `call` turns every failure the arguments cause into an output with ok=False."""

    name: str

    async def call(self, args: str, turn_index: int) -> ToolOutput: ...

    async def aclose(self) -> None: ...
