"""The systemd units in ``deploy/systemd/`` pass ``systemd-analyze verify``.

``verify`` checks that each ``ExecStart`` binary exists, so the test copies the units to a
temporary directory with ``/usr/local/bin/`` rewritten to this venv's binaries. It reports
unknown or misspelt settings as warnings with exit status 0, so any line naming a VMMem unit
fails the test too. Needs ``systemd-analyze`` (Debian package ``systemd``): without it the
test skips, and with ``CI=true`` it fails, since ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import procs

UNITS = procs.ROOT / "deploy" / "systemd"
INSTALLED_BIN = "/usr/local/bin/"


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason} (CI=true, so this is a failure)")
        pytest.skip(reason)
    return path


def _copy_units(dest: Path) -> list[Path]:
    """The units with ExecStart pointing at this venv's binaries, which verify requires."""
    out = []
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text()
        assert INSTALLED_BIN in text, f"{unit.name}: ExecStart should use {INSTALLED_BIN}"
        target = dest / unit.name
        target.write_text(text.replace(INSTALLED_BIN, f"{procs.BIN}/"))
        out.append(target)
    return out


def verify(tmp: Path) -> subprocess.CompletedProcess[str]:
    units = _copy_units(tmp)
    # The template is verified through an instance too: %i expands in it then.
    instance = tmp / "vmmem-vmm@vm1.service"
    return subprocess.run(
        [_analyze(), "verify", "--man=no", *map(str, units), str(instance)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp,
    )


@pytest.mark.timeout(30)
def test_units_verify(short_tmp: Path) -> None:
    """Both units (and an instance of the agent's template) verify without a complaint."""
    res = verify(short_tmp)
    complaints = [
        line for line in (res.stdout + res.stderr).splitlines() if "vmmem" in line.lower()
    ]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


@pytest.mark.timeout(10)
def test_units_shape() -> None:
    """What the issue asks of the units, which verify alone does not check."""
    platform = (UNITS / "vmmem-platform.service").read_text()
    agent = (UNITS / "vmmem-vmm@.service").read_text()
    for line in (
        "Type=notify",
        "RuntimeDirectory=vmmem",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
    ):
        assert line in platform.splitlines(), line
    assert "--socket /run/vmmem/vmmem.sock" in platform
    assert "BindsTo=vmmem-platform.service" in agent.splitlines()
    assert "After=vmmem-platform.service" in agent.splitlines()
    assert "--config /etc/vmmem/vm-%i.toml" in agent
    assert "--socket /run/vmmem/vmmem.sock" in agent


@pytest.mark.timeout(10)
def test_units_flags_parse() -> None:
    """Each ExecStart's flags are ones the daemon's own parser accepts (verify does not
    look at them; a misspelt flag would only show when the unit starts)."""
    from platform_daemon.cli import build_parser as platform_parser
    from vmm_agent.cli import build_parser as agent_parser

    for unit, parser in (
        ("vmmem-platform.service", platform_parser()),
        ("vmmem-vmm@.service", agent_parser()),
    ):
        (line,) = [x for x in (UNITS / unit).read_text().splitlines() if x.startswith("ExecStart=")]
        argv = shlex.split(line.removeprefix("ExecStart=").replace("%i", "vm1"))
        assert argv[0].startswith(INSTALLED_BIN)
        parser.allow_abbrev = False  # systemd passes the words as written
        parser.parse_args(argv[1:])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[vm]\nmemory = "1GiB"\n', "unknown table [vm]"),  # the whole table would be lost
        ('[vmm]\nmemroy = "1GiB"\n', "memroy"),
    ],
)
def test_vm_config_file_mistakes(short_tmp: Path, text: str, named: str) -> None:
    """A unit's /etc/vmmem/vm-NAME.toml with a misspelt table or key: the agent refuses to
    start (exit 2) with one message naming it, before it connects to anything."""
    path = short_tmp / "vm-vm1.toml"
    path.write_text(text)
    res = subprocess.run(
        [str(procs.BIN / "vmmem-vmm"), "--config", str(path), "--socket", str(short_tmp / "s")],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert named in res.stderr and "invalid configuration" in res.stderr, res.stderr
