"""The rooms of the house and what may import what (ARCHITECTURE.md), read from the source with
``ast`` (tests/import_cycles.py; nothing is imported):

* ``training/`` and ``reward_models/`` never import ComfyUI (``comfy``, ``comfy_api``,
  ``comfy_extras``, ``comfy_execution``, ``folder_paths``, ``server``, ``node_helpers``,
  ``execution``, ComfyUI's ``nodes``), nor ``nodes/``, ``tools/``, ``tests/``, nor each other;
* ``nodes/`` never imports ``tools/`` or ``tests/``;
* no import circle anywhere in the tree (an import inside a function counts).
"""
import os

import pytest

from import_cycles import foreign_imports, import_cycles, import_graph, module_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOMS = ("training", "reward_models", "nodes", "tools", "tests")
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server",
           "node_helpers", "execution", "nodes"}
FORBIDDEN = {"training": {"reward_models", "nodes", "tools", "tests"},  # room -> rooms it may not import
             "reward_models": {"training", "nodes", "tools", "tests"},
             "nodes": {"tools", "tests"}}


def forbidden_imports(root: str, room: str) -> list:
    """``"<module> imports <what>"`` for each import in ``room`` (below ``root``) that the rules
    forbid."""
    modules = module_files(root, ROOMS)
    graph = import_graph(root, ROOMS, foreign=["nodes"])
    bad = []
    for module in sorted(m for m in graph if m.split(".")[0] == room):
        bad += [f"{module} imports {t}" for t in sorted(graph[module]) if t.split(".")[0] in FORBIDDEN[room]]
        if room != "nodes":
            comfy = foreign_imports(modules[module], modules, foreign=["nodes"]) & COMFYUI
            bad += [f"{module} imports ComfyUI's {name}" for name in sorted(comfy)]
    return bad


def test_the_rules_catch_a_comfy_import_a_wrong_room_and_a_lazy_circle(tmp_path):
    for path, text in {"training/__init__.py": "", "training/a.py": "def f():\n    import comfy.sd\n",
                       "training/b.py": "from . import c\n", "training/c.py": "def g():\n    from .b import x\n",
                       "reward_models/__init__.py": "", "reward_models/r.py": "from training import a\n",
                       "nodes/__init__.py": "", "nodes/n.py": "import nodes\nfrom ..training import a\n"}.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    assert forbidden_imports(str(tmp_path), "training") == ["training.a imports ComfyUI's comfy"]
    assert forbidden_imports(str(tmp_path), "reward_models") == ["reward_models.r imports training.a"]
    assert forbidden_imports(str(tmp_path), "nodes") == []  # `import nodes` is ComfyUI's; ours relatively
    graph = import_graph(str(tmp_path), ROOMS, foreign=["nodes"])
    assert graph["nodes.n"] == {"training.a"}
    assert import_cycles(graph) == [["training.b", "training.c"]]


def test_the_tree_is_read():
    graph = import_graph(REPO, ROOMS, foreign=["nodes"])
    assert "training.trainer" in graph["nodes.training_run"]
    assert "reward_models.base" in graph["reward_models.aesthetic"]
    assert "tools.comfyui_bootstrap" in graph["tools.test_sources"]
    modules = module_files(REPO, ROOMS)
    assert {"comfy", "torch"} <= foreign_imports(modules["nodes.training_run"], modules, ["nodes"])


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_each_room_imports_only_what_it_may(room):
    bad = forbidden_imports(REPO, room)
    assert not bad, "\n".join(bad)


def test_no_import_circle_in_the_tree():
    circles = import_cycles(import_graph(REPO, ROOMS, foreign=["nodes"]))
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)
