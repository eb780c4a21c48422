"""The docs: README is short, every relative link resolves, docs/config.md is what the code says."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# [text](target) not preceded by "!" (images count too, but none are used); targets with a scheme
# or only an anchor are not files.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_doc", ROOT / "tools/gen_config_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_doc"] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_readme_is_under_250_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_docs_pages_exist() -> None:
    for name in ("config", "api", "operations", "monitoring", "architecture"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path) -> None:
    text = CODE.sub("", page.read_text(encoding="utf-8"))  # a link inside code is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, an anchor in the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_config_reference_is_current() -> None:
    assert gen.main(["--check"]) == 0, (
        "docs/config.md is stale: run `python tools/gen_config_doc.py` and commit it"
    )


def test_every_config_key_is_documented() -> None:
    page = (DOCS / "config.md").read_text(encoding="utf-8")
    for table in gen.collect(gen.SCHEMA):
        assert f"## `{table.name}`" in page
        for key in table.keys:
            assert f"| `{key.name}` |" in page, f"{table.name} {key.name}"
    # ...and fields the parser fills in are not presented as keys
    assert "| `digest` |" not in page and "| `source` |" not in page
    assert "| `name` |" not in page
    canary = page.split("## `[models.X.canary]`")[1].split("## ")[0]
    assert "| `canary` |" not in canary


def _modified_schema(tmp_path: Path, old: str, new: str) -> Path:
    source = gen.SCHEMA.read_text(encoding="utf-8")
    assert source.count(old) == 1, old
    copy = tmp_path / "schema.py"
    copy.write_text(source.replace(old, new), encoding="utf-8")
    return copy


def test_check_fails_when_a_default_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.md"
    assert gen.main(["--output", str(out)]) == 0
    assert gen.main(["--check", "--output", str(out)]) == 0
    schema = _modified_schema(tmp_path, "    port: int = 8081\n", "    port: int = 9091\n")
    assert gen.main(["--check", "--schema", str(schema), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "is stale" in err and "tools/gen_config_doc.py" in err
    assert "+| `port` | integer | `9091` |" in err  # the diff shows what changed
    assert "| `port` | integer | `9091` |" in gen.generate(schema)


def test_check_fails_when_a_comment_changes(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    out.write_text(gen.generate(gen.SCHEMA), encoding="utf-8")
    schema = _modified_schema(
        tmp_path,
        "    # Most rows in one onnxruntime run. Must be > 0.\n",
        "    # The largest batch, in rows.\n",
    )
    assert "The largest batch, in rows." in gen.generate(schema)
    assert gen.main(["--check", "--schema", str(schema), "--output", str(out)]) == 1


def test_a_field_without_a_comment_is_refused(tmp_path: Path) -> None:
    schema = _modified_schema(
        tmp_path,
        "    # Most rows in one onnxruntime run. Must be > 0.\n",
        "",
    )
    with pytest.raises(SystemExit, match=r"BatchingConfig\.max_batch_size has no comment"):
        gen.generate(schema)


def test_check_fails_when_the_page_is_missing(tmp_path: Path) -> None:
    assert gen.main(["--check", "--output", str(tmp_path / "absent.md")]) == 1


# `path` and `url` are exactly-one-of: leaving out a local version's `path` is an error, though
# neither key is required on its own (the page says "none" for both, and why).
EITHER_OR = {("[models.X.versions.V]", "path")}


def _defaults() -> list[object]:
    """(table, key, dataclass default) for every documented key that has a dataclass default."""
    from proxy.config import schema  # the classes the parser builds, so values compare equal

    comments = gen.read_comments(gen.SCHEMA.read_text(encoding="utf-8"))
    rows: list[object] = []
    for cls in vars(schema).values():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or cls is schema.Config:
            continue
        table, _ = gen._table_name(cls)
        for f in dataclasses.fields(cls):
            if comments[(cls.__name__, f.name)].startswith(gen.DERIVED):
                continue
            if (table, f.name) in EITHER_OR:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue
            rows.append(pytest.param(table, f.name, default, id=f"{table}.{f.name}"))
    return rows


@pytest.mark.parametrize(("table", "key", "default"), _defaults())
def test_a_key_left_out_gets_the_documented_default(table: str, key: str, default: object) -> None:
    """The page shows the dataclass default; the parser must give a key left out that value."""
    assert gen.parser_default(table, key) == default


def test_required_keys_are_refused_when_missing() -> None:
    assert gen.parser_default("[models.X]", "stable") == gen.REQUIRED
    assert gen.parser_default("[models.X.canary]", "weights") == gen.REQUIRED
    assert gen.parser_default("[models.X]", "mode") == "single"  # no dataclass default
    assert gen.parser_default("[models.X.blue_green]", "active") == "blue"
