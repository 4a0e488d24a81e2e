"""UI-format workflows (what Browse Templates loads) <-> API prompts (what ``POST /prompt`` runs).

ComfyUI converts in its frontend; headless runs (``make demo``, the tests) need the same in
Python. The node schemas come from the server's ``/object_info``: widget values are stored in the
order of the schema's inputs (required, then optional), skipping socket-only types, with one extra
value after every input that has ``control_after_generate``.
"""
from __future__ import annotations

import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(info: dict):
    spec = info["input"]
    for group in ("required", "optional"):
        for name, value in spec.get(group, {}).items():
            yield name, value


def _is_widget(value) -> bool:
    kind, opts = value[0], (value[1] if len(value) > 1 else {})
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_names(info: dict) -> list:
    """``[(input name, has control_after_generate)]`` in widgets_values order."""
    out = []
    for name, value in _inputs(info):
        if _is_widget(value):
            opts = value[1] if len(value) > 1 else {}
            out.append((name, bool(opts.get("control_after_generate"))))
    return out


def to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API prompt. Raises KeyError naming an unknown node type."""
    links = {link[0]: link for link in workflow.get("links", [])}
    api = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        if ntype in ("Note", "MarkdownNote", "Reroute"):
            continue
        if ntype not in object_info:
            raise KeyError(f"node type {ntype!r} (node {node['id']}) is not installed")
        info = object_info[ntype]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, has_control in widget_names(info):
            if i < len(values):
                inputs[name] = values[i]
            i += 2 if has_control else 1
        for inp in node.get("inputs", []):
            link_id = inp.get("link")
            if link_id is None:
                continue
            link = links[link_id]
            inputs[inp["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                "_meta": {"title": node.get("title", ntype)}}
    return api


def set_widget(workflow: dict, node_id: int, name: str, value, object_info: dict) -> dict:
    """A copy of ``workflow`` with widget ``name`` of node ``node_id`` set to ``value``."""
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if node["id"] == node_id:
            i = 0
            for wname, has_control in widget_names(object_info[node["type"]]):
                if wname == name:
                    node["widgets_values"][i] = value
                    return wf
                i += 2 if has_control else 1
            raise KeyError(f"node {node_id} has no widget {name!r}")
    raise KeyError(f"no node {node_id}")
