"""The dashboard's files: shipped in the wheel, self-contained, every import resolvable."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from taskq.web.ui import STATIC
from tests.support import ROOT


def test_package_data_ships_every_dashboard_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["taskq.web"]
    files = [p.relative_to(STATIC.parent.parent).as_posix() for p in STATIC.iterdir()]
    assert "static/ui/index.html" in files
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        # No CDN, no web fonts, no analytics: only the w3.org SVG namespace is named.
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{path.name}: {urls}"


def test_every_local_reference_exists() -> None:
    index = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#][^"]*)"', index)
    assert "app.js" in refs and "style.css" in refs
    for ref in refs:
        assert (STATIC / ref).is_file(), ref
    for script in STATIC.glob("*.js"):
        for module in re.findall(r'from "\./([^"]+)"|import\("\./([^"]+)"\)', script.read_text()):
            name = module[0] or module[1]
            assert (STATIC / name).is_file(), f"{script.name} imports {name}"


def test_ids_the_scripts_look_up_exist_in_the_page() -> None:
    index = (STATIC / "index.html").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', index))
    for script in STATIC.glob("*.js"):
        for wanted in re.findall(r'getElementById\("([^"]+)"\)', script.read_text()):
            assert wanted in ids, f"{script.name} looks up #{wanted}"
