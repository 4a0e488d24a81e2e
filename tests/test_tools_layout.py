"""The import structure of ``tools/``: the measuring tools
(``tools/measure``: speed, memory, fidelity) share one set-up module instead of importing each
other's internals. Imports are read with ``ast`` (tests/import_cycles.py), nothing is imported."""
import os
import textwrap

from import_cycles import import_cycles, import_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = "tools.measure.setup"


def _write(root, files: dict) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))


def test_the_finder_finds_every_kind_of_import_circle(tmp_path):
    _write(str(tmp_path), {
        "pkg/__init__.py": "from .a import f\n",
        # absolute, lazy (inside a function) and ``from package import submodule``
        "pkg/a.py": "def f():\n    from pkg import b\n",
        "pkg/b.py": "import pkg.a\n",
        # relative, three modules round
        "pkg/c.py": "from .d import x\n",
        "pkg/d.py": "from . import e\nx = 1\n",
        "pkg/e.py": "def g():\n    from ..pkg import c\n",
        # a chain is no circle; names outside the tree are left out
        "pkg/chain.py": "from __future__ import annotations\nimport json\nimport torch\nfrom pkg.c import x\n",
        # scripts importing their neighbours through sys.path (as tools/bench.py and
        # tools/bench_peers.py did)
        "scripts/bench.py": "import sys\n\ndef main():\n    import peers\n",
        "scripts/peers.py": "from bench import Setup\n",
        "scripts/study.py": "from bench import Setup\n",
        # ``import nodes`` in a ComfyUI pack is ComfyUI's module, unless said otherwise
        "pkg/node_user.py": "import nodes\n",
        "nodes/__init__.py": "from pkg import node_user\n",
    })
    graph = import_graph(str(tmp_path), ["pkg", "scripts", "nodes"])
    assert graph["pkg.chain"] == {"pkg.c"}
    assert graph["scripts.study"] == {"scripts.bench"}
    assert graph["pkg"] == {"pkg.a"}
    assert import_cycles(graph) == [["nodes", "pkg.node_user"], ["pkg.a", "pkg.b"],
                                    ["pkg.c", "pkg.d", "pkg.e"], ["scripts.bench", "scripts.peers"]]
    graph = import_graph(str(tmp_path), ["pkg", "scripts", "nodes"], foreign=["nodes"])
    assert graph["pkg.node_user"] == set()
    assert import_cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"],
                                    ["scripts.bench", "scripts.peers"]]


def test_measuring_tools_share_only_the_setup_module():
    """speed/, memory/ and fidelity/ import nothing of one another; what they share is in
    tools/measure/setup.py, which imports no other tool."""
    graph = import_graph(REPO, ["tools"])  # circles: tests/test_import_graph.py, for the whole tree
    assert {"tools.demo", SETUP, "tools.measure.speed.bench", "tools.measure.memory.vram",
            "tools.measure.fidelity.run"} <= set(graph)  # the tree was read
    assert graph[SETUP] == set()
    crossing = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if not target.startswith("tools.measure.") or target == SETUP:
                continue
            if module.split(".")[:3] != target.split(".")[:3]:
                crossing.append(f"{module} -> {target}")
    assert crossing == []
    # one way inside a group: the driver uses its helpers, never the reverse
    assert "tools.measure.speed.peers" in graph["tools.measure.speed.bench"]
    assert "tools.measure.memory.vram_dit" in graph["tools.measure.memory.vram"]
    for helper in ("tools.measure.speed.peers", "tools.measure.speed.cfg_gradient_study",
                   "tools.measure.memory.vram_dit"):
        assert SETUP in graph[helper], helper
