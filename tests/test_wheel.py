"""The built wheel: one import name, every module and data file, and usable next to a
backend's own `models` and `config` modules.

The wheel is built once for the module (without build isolation, with the test
environment's setuptools) and installed with --no-deps into a fresh virtualenv whose
dependencies come from the test environment's site-packages (a .pth line: the editable
escrowd there is not loaded, since .pth files of a path added that way are not read).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from escrowd import __version__

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
DIST_INFO = f"escrowd-{__version__}.dist-info"

# A Flask-style backend's own top-level modules, named like parts of escrowd.
APP_MODELS = "OWNER = 'the backend'\nclass Job:\n    pass\n"
APP_CONFIG = "OWNER = 'the backend'\nDATABASE_URL = 'sqlite:///app.db'\n"
CHECK = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    from pathlib import Path

    import config, models  # the backend's own
    assert models.OWNER == config.OWNER == "the backend", (models.__file__, config.__file__)

    import escrowd
    imported = []
    for info in pkgutil.walk_packages(escrowd.__path__, "escrowd."):
        # Alembic's own scripts (run by alembic, not importable): upgrade_to_head below.
        if info.name.startswith(("escrowd.migrations.env", "escrowd.migrations.versions.")):
            continue
        importlib.import_module(info.name)
        imported.append(info.name)

    from escrowd.client import AsyncEscrowdClient, EscrowdClient, parse_event, verify_webhook
    from escrowd.daemon.api import create_app
    from escrowd.daemon.cli import main
    from escrowd.escrow import AsyncEscrowService, EscrowService
    from escrowd.migrations.runner import upgrade_to_head
    from escrowd.models.db import make_engine

    # The migrations ship in the wheel: an in-process backend can set up its database.
    engine = make_engine("sqlite:///" + str(Path("escrowd.db").resolve()))
    upgrade_to_head(engine)
    service = EscrowService(engine)
    agent = service.register_agent("agent-1", "First")
    assert (agent.id, agent.name, service.balances("agent-1")) == ("agent-1", "First", [])
    service.close()

    assert models.OWNER == config.OWNER == "the backend"
    print(json.dumps({
        "escrowd": escrowd.__file__,
        "imported": imported,
        "top_level": sorted({name.split(".")[0] for name in sys.modules}),
    }))
    """
)


def _expected_files() -> set[str]:
    """Every module and data file of the package folders, as wheel paths."""
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    expected = set()
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT / folder)
            if "__pycache__" in relative.parts or path.is_dir() or path.is_symlink():
                continue
            owner = ".".join([package, *relative.parts[:-1]])
            patterns = data.get(owner, [])
            if path.suffix == ".py" or any(path.match(p) for p in patterns):
                expected.add("/".join([*package.split("."), *relative.parts]))
    return expected


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, source / folder, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", *build, "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [built] = out.glob("escrowd-*.whl")
    return built


def test_wheel_holds_only_the_escrowd_package_and_all_of_it(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"escrowd", DIST_INFO}
    files = {name for name in names if not name.startswith(DIST_INFO)}
    missing = _expected_files() - files
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "escrowd/client/sync.py" in files
    assert "escrowd/migrations/script.py.mako" in files
    assert "escrowd/config/escrowd.example.toml" in files
    entry_points = zipfile.ZipFile(wheel).read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "escrowd = escrowd.daemon.cli:main" in entry_points


def test_installed_wheel_works_beside_a_backends_models_and_config(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "test-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    app = tmp_path / "app"
    app.mkdir()
    (app / "models.py").write_text(APP_MODELS)
    (app / "config.py").write_text(APP_CONFIG)
    (app / "check.py").write_text(CHECK)

    done = subprocess.run(
        [str(python), "check.py"], cwd=app, capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["escrowd"].startswith(str(venv)), report["escrowd"]
    assert {"escrowd.client.sync", "escrowd.escrow.interface"} <= set(report["imported"])
    # Nothing of escrowd outside its one name: the backend's models/config are its own.
    assert not {"escrow", "indexer", "wallets", "daemon", "devnet", "migrations"} & set(
        report["top_level"]
    )
    version = subprocess.run(
        [str(venv / "bin" / "escrowd"), "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in version.stdout
