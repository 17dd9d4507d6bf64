"""Reading the YAML of configuration files: safe YAML with duplicate keys and keys that are
lists or mappings refused, merge keys (``<<: *anchor``) allowed, and bounds on what a file may
make the parser build (size, nesting, what aliases add), checked while it composes, before
anything is expanded. A protocol file is a few KB; these bounds only refuse what is no
protocol (a log named ``.yaml``, a "billion laughs" alias bomb)."""

from __future__ import annotations

from pathlib import Path

import yaml

MAX_FILE_BYTES = 1 << 20  # real protocols are < 2 KB; a bigger file is not one
MAX_NESTING = 100  # levels of YAML collections (real ones: 4); deeper ran out of Python stack
MAX_ALIAS_NODES = 10_000  # nodes aliases may add (a few lines of aliases can expand to 10^9)


class YamlInputError(ValueError):
    """A YAML file that cannot be read as a mapping; the message names the file."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (a silent override otherwise) and keys
    that are lists or mappings, and bounds nesting and what aliases add (``MAX_NESTING``,
    ``MAX_ALIAS_NODES``) while it composes, before anything is expanded. Pure Python: the
    composer is what the bounds hook into (libyaml's CSafeLoader composes in C)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._open: set[str] = set()  # anchors of the collections being composed
        self._size: dict[int, int] = {}  # id(node): its nodes with aliases expanded
        self._height: dict[int, int] = {}  # id(node): its levels with aliases expanded
        self._added = 0  # nodes the aliases so far add
        self._keys_checked: set[int] = set()  # id(mapping node) whose keys were checked

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:  # a recursive structure, no protocol value
                raise yaml.composer.ComposerError(
                    None, None, f"an alias (*{event.anchor}) refers to a node that contains it",
                    event.start_mark)
            node = super().compose_node(parent, index)
            self._added += self._size[id(node)]
            if self._added > MAX_ALIAS_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"its aliases (*name) expand it by more than {MAX_ALIAS_NODES} "
                    "nodes (a protocol needs a few)", event.start_mark)
            if self._depth + self._height[id(node)] > MAX_NESTING:  # aliases in aliases
                raise yaml.composer.ComposerError(
                    None, None, f"with *{event.anchor} expanded, nested more than {MAX_NESTING} "
                    "levels deep", event.start_mark)
            return node
        if self._depth >= MAX_NESTING:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_NESTING} levels deep", event.start_mark)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)
        if isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:
            kids = node.value if isinstance(node, yaml.SequenceNode) else []
        self._size[id(node)] = 1 + sum(self._size[id(k)] for k in kids)
        self._height[id(node)] = 1 + max((self._height[id(k)] for k in kids), default=0)
        return node


def _check_keys(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> None:
    """Refuse duplicate keys, and keys that are lists or mappings, in ``node`` and the mappings
    it merges (``<<``); each node once, before merging puts merged keys beside its own."""
    if id(node) in loader._keys_checked:
        return
    loader._keys_checked.add(id(node))
    seen: set = set()
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:  # yaml.SafeLoader's flatten_mapping refuses a non-mapping
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [
                value_node]
            for source in sources:
                if isinstance(source, yaml.MappingNode):
                    _check_keys(loader, source)
            continue
        if not isinstance(key_node, yaml.ScalarNode):  # unhashable: a TypeError had escaped
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain scalar (a name), not a list or mapping",
                key_node.start_mark)
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    _check_keys(loader, node)
    return loader.construct_mapping(node, deep=deep)  # SafeConstructor's: merges ``<<`` keys


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_mapping(path: Path) -> dict:
    """The YAML file ``path``'s top-level mapping, read with :class:`_UniqueKeyLoader`;
    YamlInputError naming the file (and line) where it is too large, not UTF-8, not YAML, not
    a mapping or beyond the bounds."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # refused unread: a log or an image named .yaml
            raise YamlInputError(f"{path}: {size / 2**20:.1f} MB is too large for a protocol file "
                                f"(at most {MAX_FILE_BYTES / 2**20:g} MB; a protocol is a few KB)")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlInputError(f"{path}: cannot read protocol: {exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise YamlInputError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line "
                            f"{line}); save it as UTF-8") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlInputError(f"{path}: YAML error: {where}{problem}") from exc
    except RecursionError:  # MAX_NESTING is below it; a deeper Python stack in use, say
        raise YamlInputError(f"{path}: YAML error: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise YamlInputError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data
