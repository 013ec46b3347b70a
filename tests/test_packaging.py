"""What ``pip install`` gives a user: a wheel built from this checkout ships the packages with
their ``py.typed`` markers (PEP 561), the Apache-2.0 license text and the version that
``runtime/version.py`` holds; the changelog's newest release is that version."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from cli_helpers import ROOT

from runtime.version import __version__

PACKAGES = ("runtime", "actors", "connectors", "state")
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", *PACKAGES)


def test_the_wheel_ships_typed_packages_the_license_and_the_version(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(path, source / name)
    wheel_command = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    built = subprocess.run(
        [sys.executable, "-m", *wheel_command, "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith(f"pyflow_runtime-{__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for package in PACKAGES:
            assert f"{package}/py.typed" in names
        [license_name] = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICENSE$", n)]
        license_text = archive.read(license_name).decode()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert f"\nVersion: {__version__}\n" in metadata
    assert not any(name.startswith("tests/") for name in names)


def test_every_package_is_marked_typed() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package


def test_the_changelog_starts_with_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, flags=re.MULTILINE)
    assert releases, "CHANGELOG.md has no '## X.Y.Z' release headings"
    assert releases[0] == __version__
