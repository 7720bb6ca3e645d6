"""The controller's checkpoint format and its versions.

Version 3 keys decisions by layer name and nests the policy's own state. Versions 1 and 2 (one
flat dict, the adaptive controller's memory under ``adaptive_state``) are upgraded on load.
"""

from __future__ import annotations

from typing import Any

from ..errors import StateDictError

VERSION = 3


def upgrade(state: dict[str, Any], controller: str) -> dict[str, Any]:
    """``state`` in the current format (``controller``: the resolved controller loading it).

    Raises:
        StateDictError: not a vcas controller state, or a version this release does not know.
    """
    if not isinstance(state, dict) or "version" not in state:
        raise StateDictError("not a vcas controller state_dict (no 'version' key)")
    version = state["version"]
    if version == VERSION:
        return state
    if version not in (1, 2):
        raise StateDictError(
            f"vcas controller state_dict version {version!r} is not supported by this release "
            f"(it reads versions 1 to {VERSION}); load it with the release that wrote it")
    saved = state.get("config", {}).get("controller", controller)
    policy: dict[str, Any] = {"s": float(state["s"])}
    if saved == "adaptive":
        memory = state.get("adaptive_state") or {"history": [], "steps": [], "step": 0.1,
                                                 "direction": 0, "interval": 0, "next_step": 1}
        policy.update(_upgrade_memory(memory, state))
    return {**state, "version": VERSION, "policy": policy, "adapting": bool(state["adaptive"]),
            "recording": bool(state.get("recording", False))}


def _upgrade_memory(memory: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The adaptive memory of version 1-2 checkpoints: calibration records by position become
    records by layer and block name."""
    blocks = list(state["block_names"])
    linears = list(state["linear_names"])
    history = []
    for stats in memory["history"]:
        measured = _measured_names(len(stats["layers"]), linears)
        passes = [{blocks[int(b)]: norms for b, norms in p.items()} for p in stats["passes"]]
        history.append({
            "passes": passes, "blocks": blocks,
            "scales": dict(zip(measured, stats["scales"])),
            "row_scores": dict(zip(linears, stats["row_scores"])),
            "layers": {name: [(index, None if block is None else blocks[int(block)], squares, total)
                              for index, block, squares, total in records]
                       for name, records in zip(measured, stats["layers"])}})
    steps = memory.get("steps", [memory["next_step"]] * len(history))
    return {"history": history, "steps": steps, "step": memory["step"],
            "direction": memory["direction"], "interval": memory["interval"],
            "next_step": memory["next_step"]}


def _measured_names(count: int, linears: list[str]) -> list[str]:
    if count != len(linears):
        raise StateDictError(
            f"this version-2 checkpoint measured {count} weights of a model with {len(linears)} "
            "sampled linears (frozen linears or convolutions), whose names it did not save; "
            "resume it with the release that wrote it")
    return linears
