"""The two roles stay separate in the code: an import contract over the ast import graph.

- A deliver-only module never imports a history-only one, and the other way round; each
  role's whole import closure stays on its side.
- The shared modules import no role-only module and no role.
- Only the Kafka wrapper imports confluent_kafka (ALLOWED_KAFKA lists the modules that still do
  and is to end empty).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "consumer"

DELIVER_ONLY = frozenset({
    "consumer.deliver_role", "consumer.service", "consumer.pipeline", "consumer.partitions",
    "consumer.offsets", "consumer.intake", "consumer.delivery", "consumer.gate", "consumer.circuits",
    "consumer.observe", "consumer.tracing", "consumer.nettiming", "consumer.netguard",
    "consumer.gctune", "consumer.durable", "consumer.deliver_context",
})
HISTORY_ONLY = frozenset({
    "consumer.history_role", "consumer.ingest", "consumer.history", "consumer.sql",
    "consumer.queries", "consumer.history_api", "consumer.republish", "consumer.republish_plan",
    "consumer.originals", "consumer.store_errors", "consumer.read_pool", "consumer.console",
    "consumer.console.auth",
    "consumer.console.base", "consumer.console.context", "consumer.console.deliveries",
    "consumer.console.endpoints", "consumer.console.render", "consumer.console.views",
})
# What starts the roles and the tools: may import anything.
TOP = frozenset({
    "consumer.__main__", "consumer.cli", "consumer.cli_endpoints", "consumer.cli_history",
    "consumer.cli_history_output", "consumer.admin_api_client", "consumer.demo", "consumer.receiver",
    "consumer.supervisor",
})
KAFKA_WRAPPER = frozenset({
    "consumer.kafka_io", "consumer.kafka_admin", "consumer.kafka_group", "consumer.kafka_reader",
    "consumer.kafka_topics",
})
# Still importing confluent_kafka themselves (issue: one group-member class in the wrapper).
ALLOWED_KAFKA = frozenset({"consumer.originals"})


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(the project's modules it imports, the top-level names of other packages it imports)."""
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "consumer":
                ours.add(node.module)
                ours.update(f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES)
            else:
                theirs.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.split(".")[0] == "consumer" else theirs).add(
                    alias.name if alias.name.startswith("consumer") else alias.name.split(".")[0])
    return frozenset(ours & MODULES.keys()), frozenset(theirs)


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports(name)[0])
    return seen


def test_every_named_module_exists() -> None:
    named = DELIVER_ONLY | HISTORY_ONLY | TOP | KAFKA_WRAPPER | ALLOWED_KAFKA
    assert named - MODULES.keys() == set()


def test_role_only_modules_never_import_the_other_sides() -> None:
    crossing = [(m, i) for m in DELIVER_ONLY for i in imports(m)[0] if i in HISTORY_ONLY]
    crossing += [(m, i) for m in HISTORY_ONLY for i in imports(m)[0] if i in DELIVER_ONLY]
    assert crossing == []


def test_each_roles_import_closure_stays_on_its_side() -> None:
    assert closure("consumer.deliver_role") & HISTORY_ONLY == set()
    assert closure("consumer.history_role") & DELIVER_ONLY == set()


def test_shared_modules_import_no_role_only_module() -> None:
    shared = MODULES.keys() - DELIVER_ONLY - HISTORY_ONLY - TOP
    wrong = [(m, i) for m in shared for i in imports(m)[0] if i in DELIVER_ONLY | HISTORY_ONLY | TOP]
    assert wrong == []


def test_only_the_kafka_wrapper_imports_confluent_kafka() -> None:
    importers = {m for m in MODULES if "confluent_kafka" in imports(m)[1]}
    assert importers - KAFKA_WRAPPER - ALLOWED_KAFKA == set(), "import it through consumer.kafka_io"
    assert ALLOWED_KAFKA - importers == set(), "no longer imports confluent_kafka: drop it from ALLOWED_KAFKA"
