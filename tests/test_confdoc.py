"""docs/configuration.md is generated from conf/'s comments (`python -m p2prl.confdoc`): the parse
misses no key of any file, reads the values PyYAML reads, and the committed reference is up to date."""
from pathlib import Path

import pytest
import yaml

from p2prl import confdoc
from p2prl.config import conf_dir, flatten

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p.relative_to(conf_dir()) for p in conf_dir().rglob("*.yaml"))


def test_the_committed_reference_is_up_to_date():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == confdoc.render(), ("docs/configuration.md is stale: regenerate it with "
                                           "`python -m p2prl.confdoc > docs/configuration.md`")


def _expected_keys(path: Path) -> dict:
    """PyYAML's view of a file: its keys as the command line names them, and their values."""
    raw = yaml.safe_load((conf_dir() / path).read_text()) or {}
    raw.pop("defaults", None)
    text = (conf_dir() / path).read_text()
    prefix = "" if path.parent == Path(".") or text.startswith("# @package _global_") else f"{path.parent}."
    return {prefix + k: v for k, v in flatten(raw).items()}


@pytest.mark.parametrize("path", FILES, ids=str)
def test_every_key_of_every_file_is_in_the_reference_with_its_value(path):
    group = "" if path.parent == Path(".") else f"{path.parent}."
    option = confdoc.parse((conf_dir() / path).read_text(), f"conf/{path}", group)
    parsed = {e.key: e.value for e in option.entries}
    expected = _expected_keys(path)
    assert set(parsed) == set(expected)
    for key, value in expected.items():
        assert yaml.safe_load(parsed[key]) == value, key
    assert all(e.comment for e in option.entries)


def test_the_parse_reads_comments_beside_or_above_and_hashes_inside_quotes():
    text = "\n".join([
        "# The file's description,",
        "# on two lines.",
        "defaults:",
        "  - base",
        "  - _self_",
        "a: 1                 # beside",
        "outer:",
        "  # above, line one",
        "  # and line two",
        "  inner: 'x # not a comment'",
        "  deep:",
        "    leaf: [1, 2]     # a | pipe, <a tag>, `<code>`",
        "b: \"#x\"             # after a quoted hash",
    ])
    option = confdoc.parse(text, "conf/g/o.yaml", "g.")
    assert option.about == "The file's description, on two lines." and option.bases == ["base"]
    assert option.entries == [
        confdoc.Entry("g.a", "1", "beside"),
        confdoc.Entry("g.outer.inner", "'x # not a comment'", "above, line one and line two"),
        confdoc.Entry("g.outer.deep.leaf", "[1, 2]", "a | pipe, <a tag>, `<code>`"),
        confdoc.Entry("g.b", '"#x"', "after a quoted hash"),
    ]
    assert "| `g.outer.deep.leaf` | `[1, 2]` | a \\| pipe, &lt;a tag&gt;, `<code>` |" in confdoc.table(option.entries)


def test_a_key_without_a_comment_stops_the_generator_naming_its_line():
    with pytest.raises(ValueError, match=r"conf/g/o.yaml:3: `b: 2` has no comment"):
        confdoc.parse("# about\na: 1  # fine\nb: 2\n", "conf/g/o.yaml", "g.")
