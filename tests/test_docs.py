"""The user's guide and the docs point at things that exist.

The README is the entry point and sends readers to ``docs/`` for every measurement, option and
curve; a moved or renamed file would leave a dead link that nothing else notices.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Markdown links and images: [text](target) / ![alt](target); external and in-page ones are skipped.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Options written as `model.x` / `data.x` in the options guide.
OPTION = re.compile(r"`(model|data)\.([a-z_]+)")


def _local_targets(page: Path) -> list[str]:
    targets = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_local_links_resolve(page: Path) -> None:
    missing = [t for t in _local_targets(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_readme_links_every_docs_page() -> None:
    linked = {Path(t).name for t in _local_targets(ROOT / "README.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_options_guide_names_real_options() -> None:
    """Every ``model.*`` / ``data.*`` key in docs/options.md is an argument of the module or data module."""
    import inspect

    from metarl_lightning.data import MetaTaskDataModule
    from metarl_lightning.module import MetaRLModule

    accepted = {
        "model": set(inspect.signature(MetaRLModule.__init__).parameters),
        "data": set(inspect.signature(MetaTaskDataModule.__init__).parameters),
    }
    named = set(OPTION.findall((ROOT / "docs" / "options.md").read_text()))
    unknown = sorted(f"{group}.{name}" for group, name in named if name not in accepted[group])
    assert not unknown, f"docs/options.md names options that do not exist: {unknown}"
    assert len(named) > 30
