"""Live training status for the frontend: ``draft.progress`` websocket events plus a GET route
that returns the latest state of every trainer node (so a reloaded page can redraw its chart).

Event ``draft.progress`` (JSON):
    {"node": node id (str), "run": run id (str), "iteration": int, "total": int,
     "reward": float | null (null when skipped), "reward_ma": float | null, "skipped": int,
     "sec_per_iter": float, "eta_s": float, "saved": str | null, "status": "running"}
Event ``draft.heldout`` (one per held-out evaluation, DRaFT Held-out Check):
    {"node", "run", "iteration", "figures": {key: float | null}, "series": [{"key", "label",
     "kind": "judge" | "reward" | "similarity"}], "ranking": key, "best_iteration": int | null,
     "stop_reason": str}
Event ``draft.finished``: {"node", "run", "status": "finished" | "interrupted", "saved": str | null,
    "stop_reason": str}
``draft.started`` also carries ``"heldout"``: null, or a resumed run's held-out summary
(:meth:`training.heldout.HeldoutCheck.summary`: {"series", "ranking", "evaluations":
[{"iteration", "figures"}], "best_iteration", "best", "keep", "stop_reason"}).
GET ``/draft/status``: {node id: {"run", "status", "iteration", "total", "rewards": [..],
    "skipped": int, "sec_per_iter", "eta_s", "saved", "heldout" (the summary or null),
    "text" (the result line, once finished)}}
"""
from __future__ import annotations

import math
import time
import uuid

_LATEST: dict = {}


def _finite(v):
    return float(v) if v is not None and math.isfinite(v) else None


def _json_safe(value):
    """``value`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return _finite(value)
    return value


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
        PromptServer.instance.send_sync(event, data)
    except Exception:  # no server (scripted use): nothing to notify
        pass


def latest_status() -> dict:
    return _LATEST


def set_summary(node, text: str) -> None:
    """The trainer's one-line result, kept with the node's status for reloaded pages."""
    state = _LATEST.get(str(node) if node is not None else "")
    if state is not None:
        state["text"] = text


def node_text(node, text: str) -> None:
    """Show ``text`` on the node now (ComfyUI's progress text), e.g. a warning at the start of a run."""
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, str(node))
    except Exception:  # no server, or a ComfyUI without progress text
        pass


class RunEvents:
    """Sends one event per iteration for trainer node ``node`` and keeps its state for reloads."""

    def __init__(self, node, total: int, start: int = 0, history=(), heldout=None):
        self.node = str(node) if node is not None else ""
        self.run = uuid.uuid4().hex[:12]
        self.total = total
        self.start_iteration = start
        self.t0 = time.perf_counter()
        self.state = {"run": self.run, "status": "running", "iteration": start, "total": total,
                      "rewards": [_finite(v) for v in history], "skipped": 0,
                      "sec_per_iter": None, "eta_s": None, "saved": None,
                      "heldout": _json_safe(heldout)}
        _LATEST[self.node] = self.state
        _send("draft.started", {"node": self.node, "run": self.run, "total": total,
                                "rewards": self.state["rewards"], "heldout": self.state["heldout"]})

    def point(self, report, reward_ma, saved=None) -> None:
        done = report.iteration - self.start_iteration
        spi = (time.perf_counter() - self.t0) / max(1, done)
        st = self.state
        st["iteration"] = report.iteration
        st["rewards"].append(_finite(report.reward))
        st["skipped"] += int(report.skipped)
        st["sec_per_iter"] = spi
        st["eta_s"] = spi * (self.total - report.iteration)
        if saved:
            st["saved"] = saved
        _send("draft.progress", {"node": self.node, "run": self.run, "iteration": report.iteration,
                                 "total": self.total, "reward": _finite(report.reward),
                                 "reward_ma": _finite(reward_ma), "skipped": st["skipped"],
                                 "sec_per_iter": spi, "eta_s": st["eta_s"], "saved": st["saved"],
                                 "status": "running"})

    def heldout(self, summary: dict, record: dict) -> None:
        """One held-out evaluation (``record``) and the check's whole ``summary`` after it."""
        summary = _json_safe(summary)
        self.state["heldout"] = summary
        _send("draft.heldout", {"node": self.node, "run": self.run,
                                "iteration": int(record["iteration"]),
                                "figures": _json_safe(record["figures"]),
                                "series": summary["series"], "ranking": summary["ranking"],
                                "best_iteration": summary["best_iteration"],
                                "stop_reason": summary["stop_reason"]})

    def finished(self, interrupted: bool, saved=None, stop_reason: str = "") -> None:
        self.state["status"] = "interrupted" if interrupted else "finished"
        if saved:
            self.state["saved"] = saved
        _send("draft.finished", {"node": self.node, "run": self.run,
                                 "status": self.state["status"], "saved": self.state["saved"],
                                 "stop_reason": stop_reason})
