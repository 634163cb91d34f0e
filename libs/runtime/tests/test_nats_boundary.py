"""Services reach NATS only through ``virtbackup.runtime``.

Allowed outside it: the key-value types and errors of nats-py (``nats.js.kv``,
``nats.js.errors``), because buckets are nats-py ``KeyValue`` objects handed out by the
runtime. Everything else (connections, JetStream, subscriptions, messages) stays inside.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ALLOWED = {"nats.js.kv", "nats.js.errors"}


def sources() -> list[Path]:
    found = sorted(ROOT.glob("services/*/src/**/*.py")) + sorted(ROOT.glob("cli/src/**/*.py"))
    assert len(found) > 20, ROOT  # the layout is what this test expects
    return found


def violations(source: str, where: str) -> list[str]:
    """What in ``source`` (a module, named ``where`` in the messages) reaches NATS itself."""
    tree = ast.parse(source, where)
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            if (module == "nats" or module.startswith("nats.")) and module not in ALLOWED:
                found.append(f"{where}:{node.lineno} imports {module}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr in {"js", "nc"}
            and isinstance(node.value, ast.Attribute | ast.Name)
            and (node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id)
            == "bus"
        ):
            found.append(f"{where}:{node.lineno} uses bus.{node.attr}")
    return found


def test_services_reach_nats_only_through_the_runtime() -> None:
    found = [
        v for path in sources() for v in violations(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_check_sees_what_it_forbids() -> None:
    sample = (
        "import nats\n"
        "from nats.aio.msg import Msg\n"
        "from nats.js.kv import KeyValue\n"
        "x = ctx.bus.js\n"
        "y = bus.nc\n"
    )
    assert violations(sample, "m.py") == [
        "m.py:1 imports nats",
        "m.py:2 imports nats.aio.msg",
        "m.py:4 uses bus.js",
        "m.py:5 uses bus.nc",
    ]
