"""The configuration reference, generated from conf/'s own comments:
`python -m p2prl.confdoc > docs/configuration.md`.

Every key of every YAML file under conf/ with the value it sets and its comment (the one ending its
line, else the comment lines right above it), per group and option, in the order of the root config's
`defaults` list. The files are read as text, not through a YAML loader, because the loader drops
comments; `parse` refuses a line it does not understand, and a key without a comment, so that the
reference cannot silently miss one. tests/test_confdoc.py checks the parse against PyYAML's and
fails when docs/configuration.md is stale.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from p2prl.config import conf_dir

KEY = re.compile(r"^(?P<indent>\s*)(?P<item>- )?(?P<optional>optional )?(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")
ITEM = re.compile(r"^\s*- (?P<name>[\w]+)\s*$")  # a defaults entry naming an option of the same group


class Entry(NamedTuple):
    key: str  # the dotted path the command line uses (`algo.lr`)
    value: str  # as written in the file
    comment: str


class Option(NamedTuple):
    path: Path  # relative to conf/
    about: str  # the comment lines that open the file
    bases: list[str]  # the options of its own group it starts from (its `defaults` list)
    groups: list[Entry]  # the root config's `defaults`: group, default option, comment
    entries: list[Entry]


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of what follows a key's colon: a `#` after whitespace, outside quotes, starts
    the comment."""
    quote: Optional[str] = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def parse(text: str, where: str, prefix: str = "") -> Option:
    """The keys of one YAML file; `prefix` is its package (`algo.` for conf/algo/*.yaml, "" for a
    `# @package _global_` file or the root config)."""
    lines = text.splitlines()
    about: list[str] = []
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        if not lines[i].lstrip().startswith("# @package"):
            about.append(lines[i].lstrip()[1:].strip())
        i += 1
    if "# @package _global_" in lines[:1]:
        prefix = ""
    sections: list[tuple[int, str]] = []  # (indent, key) of the mappings the current line is inside
    above: list[str] = []  # comment lines right above the current line
    bases: list[str] = []
    groups: list[Entry] = []
    entries: list[Entry] = []
    for n, line in enumerate(lines[i:], i + 1):
        stripped = line.strip()
        if not stripped:
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped[1:].strip())
            continue
        # A list item belongs to the key above it even at that key's own indent (`defaults:` / `- ppo`).
        indent = len(line) - len(line.lstrip()) + line.lstrip().startswith("- ")
        while sections and sections[-1][0] >= indent:
            sections.pop()
        path = [key for _, key in sections]
        if path == ["defaults"] and (m := ITEM.match(line)):
            if m["name"] != "_self_":
                bases.append(m["name"])
            above = []
            continue
        m = KEY.match(line)
        if m is None:
            raise ValueError(f"{where}:{n}: cannot read `{stripped}`")
        value, comment = split_comment(m["rest"])
        comment = comment or " ".join(above)
        above = []
        if path == ["defaults"] and m["item"]:
            optional = "optional (only where the file exists): " if m["optional"] else ""
            groups.append(Entry(m["key"], value, optional + comment))
            continue
        if m["item"]:
            raise ValueError(f"{where}:{n}: a list item outside the defaults list: `{stripped}`")
        if not value:  # a mapping: the keys below it are its own
            sections.append((indent, m["key"]))
            continue
        if not comment:
            raise ValueError(f"{where}:{n}: `{stripped}` has no comment")
        entries.append(Entry(prefix + ".".join([*path, m["key"]]), value, comment))
    return Option(Path(where), " ".join(about), bases, groups, entries)


def groups_in_order(root: Option, conf: Path) -> list[str]:
    """The root's groups in its `defaults` order, then any other folder of conf/."""
    listed = [g.key for g in root.groups]
    others = sorted(p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    return [g for g in listed if (conf / g).is_dir()] + [g for g in others if g not in listed]


def load(conf: Path) -> tuple[Option, dict[str, list[Option]]]:
    """The root config and, per group, its options (the root's default first, then by name)."""
    root = parse((conf / "config.yaml").read_text(), "conf/config.yaml")
    defaults = {g.key: g.value for g in root.groups}
    out = {}
    for group in groups_in_order(root, conf):
        names = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        names.sort(key=lambda name: name != defaults.get(group))
        out[group] = [parse((conf / group / f"{name}.yaml").read_text(), f"conf/{group}/{name}.yaml", f"{group}.")
                      for name in names]
    return root, out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def prose(text: str) -> str:
    """A comment as Markdown text: a bare <env> would be read as an HTML tag and vanish (inside
    backticks it is shown as written)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def table(entries: list[Entry], head: tuple[str, str, str] = ("key", "default", "meaning")) -> list[str]:
    rows = [f"| {' | '.join(head)} |", "|---|---|---|"]
    rows += [f"| `{_cell(e.key)}` | `{_cell(e.value)}` | {_cell(prose(e.comment))} |" for e in entries]
    return rows


def _title(group: str, option: Option) -> str:
    if group == "tuned":
        algo, _, env = option.path.stem.partition("_")
        return f"`algo={algo} env={env}`"
    return f"`{group}={option.path.stem}`"


def render(conf: Optional[Path] = None) -> str:
    conf = conf or conf_dir()
    root, groups = load(conf)
    out = ["# Configuration reference", "",
           "Generated from the comments in `conf/` by `python -m p2prl.confdoc > docs/configuration.md`; do "
           "not edit it by hand (`tests/test_confdoc.py` fails when it and `conf/` disagree).", "",
           "A run composes `conf/config.yaml`, one option of each group (its `defaults` list, below; "
           "`group=option` on the command line picks another), the tuned preset of the algo/env pair when "
           "there is one, then the command line's `key=value` overrides; the later wins. The default column "
           "is the value the file itself sets (`${...}` is an interpolation, `???` a value you must give, "
           "`null` none).", "",
           "## `conf/config.yaml`", "", prose(root.about), "", "Groups:", "",
           *table(root.groups, ("group", "default option", "what it selects")), "", "Keys:", "",
           *table(root.entries)]
    for group, options in groups.items():
        out += ["", f"## `{group}` (`conf/{group}/`)", ""]
        if group == "tuned":
            out += ["Chosen by the `algo=X env=Y` pair (`conf/tuned/X_Y.yaml`), not on the command line: each "
                    "preset sets the keys below on top of the group defaults; command-line overrides still win.",
                    ""]
        for option in options:
            out += [f"### {_title(group, option)} (`{option.path.as_posix()}`)", ""]
            if option.about:
                out += [prose(option.about), ""]
            if option.bases:
                out += ["Starts from " + ", ".join(f"`{group}={b}`" for b in option.bases) + " and sets:", ""]
            out += [*table(option.entries), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
