"""config/escrowd.service: the directives operators rely on, and systemd-analyze verify."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

UNIT = Path(__file__).resolve().parent.parent / "config" / "escrowd.service"


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_unit_has_notify_watchdog_credentials_and_hardening() -> None:
    unit = _directives()
    expected = {
        "Type": "notify",
        "Restart": "on-failure",
        "User": "escrowd",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "escrowd",
        "ExecStart": "/opt/escrowd/bin/escrowd run",
        "LoadCredential": "keystore-passphrase:/etc/escrowd/keystore-passphrase",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["WatchdogSec"][0].rstrip("s").isdigit()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("systemd-analyze is not installed (apt-get install systemd)")
        return
    # verify checks that ExecStart exists: point it at this environment's escrowd.
    escrowd = Path(sys.executable).parent / "escrowd"
    assert escrowd.exists(), "install the project (pip install -e .) for the escrowd script"
    unit = tmp_path / "escrowd.service"
    unit.write_text(UNIT.read_text().replace("/opt/escrowd/bin/escrowd", str(escrowd)))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "escrowd.service" not in done.stderr, done.stderr


TEMPLATE = UNIT.with_name("escrowd@.service")


def test_template_unit_runs_the_instance_role_and_differs_only_there() -> None:
    template = TEMPLATE.read_text()
    assert "ExecStart=/opt/escrowd/bin/escrowd run --role %i\n" in template
    assert "NotifyAccess=main\n" in template and "KillMode=mixed\n" in template
    # Everything operators rely on in the single unit holds for each role too.
    single = {line for line in UNIT.read_text().splitlines() if line and line[0] not in "#["}
    split = {line for line in template.splitlines() if line and line[0] not in "#["}
    assert {line.split("=", 1)[0] for line in single ^ split} == {"Description", "ExecStart"}


@pytest.mark.parametrize("role", ["api", "worker", "all"])
def test_template_instances_pass_systemd_analyze_verify(tmp_path: Path, role: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("systemd-analyze is not installed (apt-get install systemd)")
        return
    escrowd = Path(sys.executable).parent / "escrowd"
    assert escrowd.exists(), "install the project (pip install -e .) for the escrowd script"
    (tmp_path / TEMPLATE.name).write_text(
        TEMPLATE.read_text().replace("/opt/escrowd/bin/escrowd", str(escrowd))
    )
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / f"escrowd@{role}.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Problems in the file are warnings on stderr naming it, with exit 0.
    assert "escrowd@" not in done.stderr, done.stderr
