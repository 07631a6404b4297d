"""docs/configuration.md documents exactly the keys of the train config, with their types and
defaults as the dataclasses declare them, so the page and the code cannot drift apart.

The page's format: every table row whose first cell is a backticked dotted key (`train.loss_chunk`)
is one key; its next cells are the type (backticked), the default (backticked, or plain words such
as "required" where there is no default to compare) and the meaning.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import typing

import pytest
import yaml

from imitation_jax.train.config import Config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
_ROW = re.compile(r"^\|\s*`([A-Za-z_][\w.]*)`\s*\|(.*)\|\s*$")


def _unwrap_optional(tp):
    """(inner type, whether it was Optional)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        name = f"list[{_type_name(item)}]"
    else:
        name = inner.__name__
    return f"Optional[{name}]" if optional else name


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def config_keys(cls=Config, prefix: str = "") -> dict[str, tuple[str, object]]:
    """Every leaf key of the config as dotted name -> (type name, default), walking nested
    dataclass fields, Optional ones (model.rope_scaling) included."""
    keys: dict[str, tuple[str, object]] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        inner, _ = _unwrap_optional(tp)
        name = prefix + field.name
        if dataclasses.is_dataclass(inner):
            keys.update(config_keys(inner, name + "."))
        else:
            default = _default(field)
            if isinstance(default, str) and default == "???":  # omegaconf.MISSING
                default = dataclasses.MISSING
            keys[name] = (_type_name(tp), default)
    return keys


def documented_keys(text: str) -> dict[str, tuple[str, str, str]]:
    """Dotted key -> (type cell, default cell, meaning cell) from the page's tables."""
    rows: dict[str, tuple[str, str, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _ROW.match(line.strip())
        if not m:
            continue
        key = m.group(1)
        # Split on pipes that are not escaped (\|) and not inside backticks.
        cells, cell, in_code, rest = [], "", False, m.group(2)
        i = 0
        while i < len(rest):
            ch = rest[i]
            if ch == "\\" and i + 1 < len(rest) and rest[i + 1] == "|":
                cell += "|"
                i += 2
                continue
            if ch == "`":
                in_code = not in_code
            if ch == "|" and not in_code:
                cells.append(cell.strip())
                cell = ""
            else:
                cell += ch
            i += 1
        cells.append(cell.strip())
        assert len(cells) == 3, f"configuration.md:{lineno}: `{key}` needs | type | default | meaning |"
        assert key not in rows, f"configuration.md:{lineno}: `{key}` is documented twice"
        rows[key] = (cells[0], cells[1], cells[2])
    return rows


def _code(cell: str) -> str | None:
    """The text of a cell that is one backticked value, else None."""
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else None


def _same_default(doc: str, expected) -> bool:
    if expected is None:
        return doc == "null"
    if isinstance(expected, bool):
        return doc in ("true", "false") and (doc == "true") == expected
    if isinstance(expected, str):
        return doc.strip("'\"") == expected
    if isinstance(expected, (int, float)):
        try:
            return float(doc) == float(expected)
        except ValueError:
            return False
    return yaml.safe_load(doc) == expected


@pytest.fixture(scope="module")
def doc_rows():
    assert CONFIG_DOC.is_file(), f"{CONFIG_DOC} is missing"
    return documented_keys(CONFIG_DOC.read_text())


def test_walk_finds_nested_and_optional_keys():
    keys = config_keys()
    for key in ("run_dir", "train.loss_chunk", "data.cleaning.dedup", "model.rope_scaling.factor",
                "optim.lr", "mesh.fsdp", "checkpoint.keep", "distributed.coordinator"):
        assert key in keys, key
    assert keys["run_dir"][1] is dataclasses.MISSING
    assert keys["model.num_kv_heads"][0] == "Optional[int]"
    assert keys["eval.tasks"] == ("list[str]", [])


def test_configuration_doc_lists_every_key_and_nothing_else(doc_rows):
    expected, documented = set(config_keys()), set(doc_rows)
    missing, unknown = sorted(expected - documented), sorted(documented - expected)
    assert not missing and not unknown, (
        "docs/configuration.md is out of step with imitation_jax.train.config.Config:\n"
        f"  keys in the config but not documented: {', '.join(missing) or '-'}\n"
        f"  keys documented but not in the config: {', '.join(unknown) or '-'}\n"
        "Add or remove a table row `| `key` | `type` | `default` | meaning |` in the key's section.")


def test_configuration_doc_types_defaults_and_meanings(doc_rows):
    keys = config_keys()
    wrong = []
    for key, (type_cell, default_cell, meaning) in doc_rows.items():
        if key not in keys:
            continue  # reported by the test above
        type_name, default = keys[key]
        if _code(type_cell) != type_name:
            wrong.append(f"{key}: type {type_cell!r}, the dataclass says `{type_name}`")
        doc_default = _code(default_cell)
        if doc_default is not None:
            if default is dataclasses.MISSING:
                wrong.append(f"{key}: documented default {default_cell}, but the key has none (required)")
            elif not _same_default(doc_default, default):
                wrong.append(f"{key}: default {default_cell}, the dataclass says {default!r}")
        if not meaning:
            wrong.append(f"{key}: no meaning given")
    assert not wrong, "docs/configuration.md disagrees with the config dataclasses:\n  " + "\n  ".join(wrong)


def test_readme_test_command_is_make_test():
    """CI runs the README's test command through `make test`; the front page must keep it."""
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert len(readme.splitlines()) < 200


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lower case, punctuation dropped, spaces -> -)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_docs_links_resolve():
    """Every relative link in README.md and docs/*.md points at a file that exists, and at a
    heading of it where the link names one."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)
