"""Protocol YAML that is malformed, huge or hostile: one ProtocolError naming the file (and the
line where there is one), never a Python traceback, a hang or a message of megabytes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from recon_plugin.config import protocol as P
from recon_plugin.config import yaml_input

HEAD = "name: t\nextends: default\n"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(P.ENV_VAR, raising=False)


def write(folder: Path, text: str) -> Path:
    path = folder / "t.yaml"
    path.write_text(text)
    return path


def refused(folder: Path, text: str) -> str:
    """The ProtocolError message of loading ``text`` as protocol ``t`` from ``folder``."""
    path = write(folder, text)
    with pytest.raises(P.ProtocolError) as err:
        P.load_protocol("t", [folder])
    msg = str(err.value)
    assert msg.startswith(f"{path.resolve()}: "), msg
    return msg


@pytest.mark.parametrize(("body", "where"), [
    ("? [a, b]\n: 1\n", "line 3, column 3"),
    ("guard: {[a]: 1}\n", "line 3, column 9"),
    ("guard: {? {a: 1} : 1}\n", "line 3, column 11"),
])
def test_a_key_that_is_a_list_or_a_mapping_is_refused_naming_the_line(tmp_path, body, where):
    """A key YAML reads as a list or mapping had ended in ``TypeError: unhashable type``."""
    msg = refused(tmp_path, HEAD + body)
    assert f"YAML error: {where}: a key must be a plain scalar" in msg, msg


def test_a_huge_value_is_shown_cut_short(tmp_path):
    """The ``got ...`` of a validation message had repeated the whole input (megabytes)."""
    msg = refused(tmp_path, HEAD + "description: [" + ", ".join(["12345"] * 20_000) + "]\n")
    assert "description: Input should be a valid string, got [12345, 12345, " in msg, msg
    assert msg.endswith("...") and len(msg) < 300, msg[:500]
    msg = refused(tmp_path, HEAD + "model: {variant: '../" + "models/" * 2_000 + "mine'}\n")
    assert "model.variant: a path to a model must name its .safetensors file" in msg, msg[:500]
    assert len(msg) < 500, msg[:500]


def test_many_problems_are_counted_not_all_listed(tmp_path):
    msg = refused(tmp_path, HEAD + "adaptive: {variants: [" + ", ".join(["1"] * 5000) + "]}\n")
    assert "adaptive.variants[0]: Input should be a mapping, got 1" in msg
    assert msg.count("\n") < 30 and re.search(r"and 49\d\d more problems", msg), msg[-300:]


def test_a_file_over_1_mb_is_refused_before_it_is_parsed(tmp_path):
    """Real protocols are < 2 KB; a huge file (a wrong file, a log) is refused by its size
    (not read as YAML: the unclosed bracket is not what the message is about)."""
    msg = refused(tmp_path, HEAD + "description: [" + "x, " * 400_000 + "\n")
    assert re.search(r"t\.yaml: 1\.1 MB is too large for a protocol file \(at most 1 MB", msg), msg


def _bomb(levels: int, width: int = 10) -> str:
    """A "billion laughs": ``width ** levels`` nodes from a few lines of anchors and aliases."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]"
              for i in range(1, levels)]
    return "\n".join(lines) + f"\ndescription: *a{levels - 1}\n"


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    """Nested aliases (a "billion laughs") had been expanded in the validation message (tens of
    MB for 10^6 nodes, minutes and gigabytes for more)."""
    t0 = time.monotonic()
    msg = refused(tmp_path, HEAD + _bomb(5))
    assert re.search(r"YAML error: line 6, column \d+: its aliases \(\*name\) expand it by more "
                     r"than 10000 nodes", msg), msg[:500]
    assert refused(tmp_path, HEAD + _bomb(9)) == msg  # 10^9 nodes: refused as fast
    assert time.monotonic() - t0 < 10
    msg = refused(tmp_path, HEAD + "description: &a [*a]\n")
    assert "YAML error: line 3, column 18: an alias (*a) refers to a node that contains it" \
        in msg, msg


def test_a_few_aliases_are_fine(tmp_path):
    write(tmp_path, HEAD + "adaptive:\n  variants:\n    - &light {model: unrolled-lean-0.7, "
          "max_difficulty: 0.3}\n    - {model: unrolled-base}\n")
    assert P.load_protocol("t", [tmp_path]).adaptive["variants"][0]["model"] \
        == "unrolled-lean-0.7"


def test_deep_nesting_is_refused_naming_the_file(tmp_path, monkeypatch):
    """5000 nested lists had ended in ``maximum recursion depth exceeded``, naming no file."""
    msg = refused(tmp_path, HEAD + "description: " + "[" * 5000 + "\n")
    assert "YAML error: line 3, column 113: nested more than 100 levels deep" in msg, msg
    # aliases nest too: 14 lists 95 deep, each in the next (deepcopy had run out of stack)
    lines = ["a0: &a0 " + "[" * 95 + "1" + "]" * 95]
    lines += [f"a{i}: &a{i} " + "[" * 95 + f"*a{i - 1}" + "]" * 95 for i in range(1, 14)]
    msg = refused(tmp_path, HEAD + "\n".join(lines) + "\ndescription: *a13\n")
    assert "YAML error: line 4, column 104: with *a0 expanded, nested more than 100 levels " \
        "deep" in msg, msg
    # were the limit higher, Python's recursion limit: the same kind of message
    monkeypatch.setattr(yaml_input, "MAX_NESTING", 10**6)
    msg = refused(tmp_path, HEAD + "description: " + "[" * 5000 + "\n")
    assert msg.endswith("YAML error: nested too deeply to parse"), msg


def test_merge_keys_merge_and_duplicate_keys_are_still_refused(tmp_path):
    """``<<: *anchor`` (a YAML merge key) had been refused with ``could not determine a
    constructor for the tag 'tag:yaml.org,2002:merge'``."""
    write(tmp_path, HEAD + "guard: {<<: {margin: 0.2, significance: 2.0}, margin: 0.1}\n"
          "adaptive:\n  variants:\n    - &light {model: unrolled-lean-0.7, max_difficulty: 0.3}\n"
          "    - {<<: *light, max_difficulty: 0.5}\n    - {model: unrolled-base}\n")
    p = P.load_protocol("t", [tmp_path])
    assert (p.guard.margin, p.guard.significance) == (0.1, 2.0)  # the mapping's own key wins
    assert p.adaptive["variants"][1] == {"model": "unrolled-lean-0.7", "max_difficulty": 0.5}
    # an anchored mapping that merges is merged again elsewhere without a false duplicate
    assert "refine.margin: unknown key" in refused(tmp_path, HEAD + "guard: &g {<<: {margin: "
                                                   "0.2}, margin: 0.1}\nrefine: {<<: *g}\n")
    for body, key in [("guard: {<<: {margin: 0.2}, margin: 0.1, margin: 0.3}\n", "'margin'"),
                      ("guard: {<<: {margin: 0.2, margin: 0.3}}\n", "'margin'"),
                      ("guard: {<<: [{enabled: true}, {margin: 0.2, margin: 0.3}]}\n", "'margin'")]:
        assert f"duplicate key {key}" in refused(tmp_path, HEAD + body)
    assert "expected a mapping or list of mappings for merging" in refused(
        tmp_path, HEAD + "guard: {<<: 3}\n")
