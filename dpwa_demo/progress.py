"""Live progress of the demo's nodes: one line per node.

On a terminal the lines are redrawn in place by ``rich.live.Live`` (which also copes with lines
longer than the terminal is wide); otherwise (a log file, a pipe, CI) a plain block of lines is
printed every few seconds and once at the end, so logs stay short.
"""

from __future__ import annotations

import math
import time
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

__all__ = ["Progress"]

_PLAIN_EVERY = 3.0  # seconds between blocks of plain lines
_GOSSIP_KEYS = ("pulls_ok", "pulls_failed", "pulls_timed_out", "swarm_samples", "swarm_nodes")


class Progress:
    """One status line per node, fed with the workers' JSON events.

    Args:
        stream: where to write (usually ``sys.stdout``).
        label: the run's name (``gossip`` or ``isolated``), shown at the start of each line.
        nodes: ``(name, framework)`` of each node, in display order.
        steps: steps per node, to show ``step/steps``.
        live: redraw lines in place; ``None`` decides by ``stream.isatty()``.
        width: columns of the live view (longer lines end in an ellipsis); ``None`` asks the
            terminal.
    """

    def __init__(
        self,
        stream: TextIO,
        label: str,
        nodes: list[tuple[str, str]],
        steps: int,
        live: bool | None = None,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.label = label
        self.steps = steps
        self.live = stream.isatty() if live is None else live
        self._frameworks = dict(nodes)
        self._state: dict[str, dict[str, Any]] = {name: {} for name, _ in nodes}
        self._status: dict[str, str] = {name: "starting" for name, _ in nodes}
        self.width = width
        self._live: Live | None = None
        self._last_plain = time.monotonic()

    def update(self, name: str, event: dict[str, Any]) -> None:
        """Take one event of node ``name`` (``ready``, ``progress``, ``eval`` or ``done``)."""
        kind = event.get("event")
        state = self._state[name]
        if kind == "ready":
            self._status[name] = "ready"
        elif kind in ("progress", "eval", "done"):
            self._status[name] = "done" if kind == "done" else "training"
            for key in ("step", "loss", *_GOSSIP_KEYS):
                if key in event:
                    state[key] = event[key]
            if kind == "done":
                state["step"] = event.get("steps", state.get("step"))
                state["loss"] = event.get("train_loss", state.get("loss"))
            if "test_acc" in event:
                state["acc"] = event["test_acc"]
        self._draw(final=False)

    def failed(self, name: str, code: int) -> None:
        """Mark node ``name`` as exited with ``code`` before it finished."""
        self._status[name] = f"FAILED (exit code {code})"
        self._draw(final=False)

    def finish(self) -> None:
        """Draw the final lines."""
        self._draw(final=True)

    def line(self, name: str) -> str:
        """The status line of node ``name``."""
        state = self._state[name]
        width = max(len(n) for n in self._state)
        fw_width = max(len(f) for f in self._frameworks.values())
        head = f"[{self.label}] {name:<{width}} {self._frameworks[name]:<{fw_width}}"
        if "step" not in state:
            return f"{head} {self._status[name]}"
        loss = state.get("loss", math.nan)
        acc = state.get("acc")
        parts = [
            f"step {state['step']:>{len(str(self.steps))}}/{self.steps}",
            f"loss {loss:6.3f}" if loss == loss else "loss    -  ",
            f"acc {acc:5.1%}" if acc is not None else "acc   -  ",
        ]
        if state.get("pulls_ok") is not None:
            timed_out = state.get("pulls_timed_out") or 0
            parts.append(
                f"pulls ok {state['pulls_ok']} failed {state['pulls_failed']}"
                + (f" timed out {timed_out}" if timed_out else "")
            )
            if state.get("swarm_samples") is not None:
                parts.append(
                    f"swarm {_compact(state['swarm_samples'])} samples"
                    f" ({state['swarm_nodes']} nodes)"
                )
        else:
            parts.append("no gossip")
        status = self._status[name]
        if status not in ("training",):
            parts.append(status)
        return "  ".join([head, *parts])

    def _draw(self, final: bool) -> None:
        lines = [self.line(name) for name in self._state]
        if self.live:
            # Text, never markup: a line shows exactly what the nodes sent.
            view = Group(*(Text(line, no_wrap=True, overflow="ellipsis") for line in lines))
            if self._live is None:
                console = Console(
                    file=self.stream, force_terminal=True, highlight=False, width=self.width
                )
                self._live = Live(view, console=console, auto_refresh=False)
                self._live.start()
            self._live.update(view, refresh=True)
            if final:
                self._live.stop()
                self._live = None
        else:
            now = time.monotonic()
            training = any("step" in state for state in self._state.values())
            if not final and (not training or now - self._last_plain < _PLAIN_EVERY):
                return
            self._last_plain = now
            self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()


def _compact(count: float) -> str:
    """``12345`` as ``12.3k``: a count that fits a live line."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= size:
            return f"{count / size:.1f}{suffix}"
    return f"{count:.0f}"
