"""The README's first command, exactly as written, works on a fresh copy of the project."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORES = shutil.ignore_patterns(
    ".git", ".venv", "venv", "node_modules", "*.egg-info", "build", "__pycache__",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", ".escrowd-dev",
)  # fmt: skip


def first_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Try it", 1)[1]
    match = re.search(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert match, "the README's Try it section has no sh block"
    return match.group(1).strip()


def test_readme_first_command_installs_and_completes_the_demo(tmp_path: Path) -> None:
    command = first_command()
    assert "escrowd dev --demo" in command
    project = tmp_path / "escrowd"
    shutil.copytree(ROOT, project, ignore=COPY_IGNORES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESCROWD_", "VIRTUAL_ENV"))}
    env["HOME"] = str(tmp_path / "home")
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo complete: 11 steps ran" in result.stdout
    for step in ("pay the worker out on chain: ok", "audit verify: ok", "ledger check: ok"):
        assert step in result.stdout
