"""Reading config YAML strictly: a problem is a `(yaml path, reason)` pair, never a traceback.

On top of `yaml.safe_load`: the text must be UTF-8; a mapping may not repeat a key
(`safe_load` keeps the last one silently, so a duplicated `lr:` would train with
whichever came second); nesting deeper than MAX_DEPTH is refused before PyYAML's
recursive constructor meets it (a 50k-deep file raised RecursionError); a document is
composed once and walked iteratively, each node (aliases included) visited once.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64  # a real config nests 5 deep


class YAMLProblem(ValueError):
    """`path` is the YAML path of the offending node ("" for the document itself)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path or '<document>'}: {reason}")


def _child(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _check_tree(root: yaml.Node, where: str) -> None:
    """Duplicate keys and nesting depth, walked without recursion."""
    stack, seen = [(root, "", 0)], set()
    while stack:
        node, path, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise YAMLProblem(path, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, _child(path, i), depth + 1) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.id} key>"
                ident = (key.tag, name)
                if ident in lines:
                    raise YAMLProblem(_child(path, name), f"duplicate key (lines {lines[ident]} and "
                                                          f"{key.start_mark.line + 1} of {where})")
                lines[ident] = key.start_mark.line + 1
                stack.append((value, _child(path, name), depth + 1))


def parse_yaml(data: bytes | str, where: str) -> Any:
    """The document in `data` (a config file's bytes or an override's value text);
    raises YAMLProblem. `where` names the source in messages (a file, an override)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YAMLProblem("", f"not UTF-8: byte {data[exc.start]:#04x} at offset {exc.start}") from None
    try:
        node = yaml.compose(data, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise YAMLProblem("", f"not valid YAML: {exc}") from None
    except RecursionError:
        raise YAMLProblem("", f"nested deeper than {MAX_DEPTH} levels") from None
    if node is None:
        return None
    _check_tree(node, where)
    try:
        return yaml.SafeLoader("").construct_document(node)
    except yaml.YAMLError as exc:
        raise YAMLProblem("", f"not valid YAML: {exc}") from None
