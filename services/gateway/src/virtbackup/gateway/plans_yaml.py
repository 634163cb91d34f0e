"""Project YAML (backup plans and chains), read strictly, every refusal naming its line.

PyYAML's safe loader composes the document; this module builds the values itself so that
it can refuse what a plain load would accept silently, and remember the line of every
key and list item:

- a tab anywhere (YAML forbids them in indentation; elsewhere they hide structure);
- a key given twice in one mapping (a plain load keeps the last);
- anchors and aliases (a node used twice): a project is small, and aliases are how a
  document of a few lines expands to gigabytes;
- a top level that is not a mapping; a key that is not a string;
- mappings and lists nested deeper than ``MAX_YAML_DEPTH`` (checked on the parser's
  events before anything is built: deep nesting would exhaust the stack);
- more than ``MAX_PIPELINES`` pipelines or ``MAX_CHAINS`` chains (a project is stored as
  one record in ``VB_PLANS`` and sent as one bus message; see also
  ``MAX_PROJECT_BYTES``);
- anything ``ProjectSpec`` does not take *strictly*: an unknown key, a wrong type
  (``"60"`` is no integer, ``yes`` no string), a missing field.

Dates stay strings (no timestamp resolver). PyYAML is used rather than adding another
YAML library: the gateway already reads ``agent.yaml`` with it.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import yaml

from virtbackup.contracts.v1.plans import ProjectSpec
from virtbackup.runtime.errors import BadRequest

#: The most characters a project document may have (the gateway's body limit is larger).
MAX_YAML_CHARS = 512 * 1024
#: The deepest nesting of mappings and lists a project may have (a project needs about
#: six); deeper documents are refused before they are built, so nothing recurses on them.
MAX_YAML_DEPTH = 32
#: The most pipelines and chains a project may have: a project is one record of
#: ``VB_PLANS`` and one message on the bus, both bounded by NATS's payload limit (1 MiB).
MAX_PIPELINES = 500
MAX_CHAINS = 200
#: The most bytes a project's import message (its parsed form, its source and the line
#: of every key, as JSON) may take; the stored record is smaller than that message but
#: for the schedules' ids, which this leaves room for under NATS's 1 MiB.
MAX_PROJECT_BYTES = 640 * 1024
_AT = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


class _Loader(yaml.SafeLoader):
    """The safe loader without the timestamp resolver (dates stay strings)."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Builder:
    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.lines: dict[str, int] = {}
        self.seen: set[int] = set()

    def build(self, node: yaml.Node, path: str) -> Any:
        if id(node) in self.seen:
            # The node is the anchored one (its mark is the anchor's): name the line of
            # the key that holds the alias, or of the nearest one enclosing it.
            line = line_of(self.lines, path) or _line(node)
            raise BadRequest(f"line {line}: aliases (*name) are not allowed - at `{path}`")
        self.seen.add(id(node))
        self.lines.setdefault(path, _line(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise BadRequest(f"line {_line(key_node)}: merge keys (<<) are not allowed")
                key = self.build_scalar(key_node, path)
                if not isinstance(key, str):
                    raise BadRequest(
                        f"line {_line(key_node)}: a key must be a string, got {key!r} - at `{path}`"
                    )
                where = f"{path}.{key}"
                if key in out:
                    raise BadRequest(
                        f"line {_line(key_node)}: the key {key!r} is given twice - at `{where}`"
                    )
                self.lines[where] = _line(key_node)
                out[key] = self.build(value_node, where)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return self.build_scalar(node, path)

    def build_scalar(self, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise BadRequest(f"line {_line(node)}: a key must be a string - at `{path}`")
        return self.loader.construct_object(node, deep=True)


def _check_depth(text: str) -> None:
    """Refuse (``BadRequest``, naming the line) mappings and lists nested deeper than
    :data:`MAX_YAML_DEPTH`. Reads the parser's events, which are produced without
    recursion, so a hostile document cannot exhaust the stack here either."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = int(event.start_mark.line) + 1 if event.start_mark is not None else 1
                raise BadRequest(
                    f"line {line}: mappings and lists are nested deeper than {MAX_YAML_DEPTH}"
                    " levels"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def line_of(lines: dict[str, int], path: str) -> int | None:
    """The line of ``path`` (a msgspec path such as ``$.pipelines[0].vms``), or of the
    nearest enclosing node that has one."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return lines.get("$")


def parse_project(text: str) -> tuple[ProjectSpec, dict[str, int]]:
    """The project ``text`` holds, and the line of every key and list item (by JSON path).

    Raises ``BadRequest`` (400) whose message begins ``line <n>:`` and ends with the
    field's path (``- at `$.pipelines[0].destination```) for every refusal listed in the
    module's docstring.
    """
    if len(text) > MAX_YAML_CHARS:
        raise BadRequest(f"the project is longer than {MAX_YAML_CHARS} characters")
    for number, line in enumerate(text.splitlines(), start=1):
        if "\t" in line:
            raise BadRequest(f"line {number}: a tab character; indent YAML with spaces")
    loader = _Loader(text)
    try:
        _check_depth(text)
        root = loader.get_single_node()
        if root is None:
            raise BadRequest("line 1: the project is empty")
        if not isinstance(root, yaml.MappingNode):
            raise BadRequest(f"line {_line(root)}: the top level must be a mapping")
        builder = _Builder(loader)
        data = builder.build(root, "$")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "line ?"
        raise BadRequest(f"{where}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise BadRequest(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    try:
        spec = msgspec.convert(data, ProjectSpec, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        found = _AT.search(message)
        path = found.group(1) if found else "$"
        unknown = _UNKNOWN.search(message)
        if unknown:
            path = f"{path}.{unknown.group(1)}"
            message = f"unknown key {unknown.group(1)!r} - at `{path}`"
        elif not found:
            message = f"{message} - at `$`"
        raise BadRequest(f"line {line_of(builder.lines, path)}: {message}") from None
    for field, count, limit in (
        ("pipelines", len(spec.pipelines), MAX_PIPELINES),
        ("chains", len(spec.chains), MAX_CHAINS),
    ):
        if count > limit:
            raise BadRequest(
                f"line {builder.lines.get(f'$.{field}', 1)}: {count} {field}, more than the"
                f" {limit} a project may have - at `$.{field}`"
            )
    return spec, builder.lines
