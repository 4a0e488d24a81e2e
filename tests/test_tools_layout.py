"""The import structure of ``tools/``, read with ``ast`` (tests/import_cycles.py; nothing is imported)."""
import os
import textwrap

from import_cycles import import_cycles, import_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

