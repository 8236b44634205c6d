"""thoxd/device/systemd.py and systemd/thoxd.service: the notify protocol against a real AF_UNIX
datagram socket standing in for systemd, the watchdog, the unit file, and the daemon as systemd
sees it."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Daemon
from thoxd.device.systemd import Systemd
from thoxd.settings import Settings, load_settings

UNIT = REPO / "systemd" / "thoxd.service"
UNIT_README = REPO / "systemd" / "README.md"
EXAMPLE_CONFIG = REPO / "systemd" / "thoxd.toml.example"


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, with the time it arrived."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def received(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.messages)

    def times(self, line: str) -> list[float]:
        return [t for t, text in self.received() if line in text.splitlines()]

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.times(line):
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no {line!r} within {timeout} s; got {self.received()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify.sock")
    listener = FakeSystemd(path)
    yield listener, path
    listener.close()


# -- the notify protocol -----------------------------------------------------------------------


def test_notify_sends_key_value_lines(fake: tuple[FakeSystemd, str]) -> None:
    listener, path = fake
    systemd = Systemd({"NOTIFY_SOCKET": path})
    assert systemd.enabled
    assert systemd.notify(READY=1, STATUS="serving gemma-3-270m on :8080")
    assert systemd.notify(STATUS="two\nlines")  # one field is one line
    assert systemd.notify(STOPPING=True)
    listener.wait_for("STOPPING=1", 2)
    texts = [text for _, text in listener.received()]
    assert texts == [
        "READY=1\nSTATUS=serving gemma-3-270m on :8080\n",
        "STATUS=two lines\n",
        "STOPPING=1\n",
    ]
    systemd.close()


def test_abstract_socket_names(tmp_path: Path) -> None:
    name = f"thoxd-test-{os.getpid()}-{tmp_path.name}"
    listener = FakeSystemd("\0" + name)
    try:
        systemd = Systemd({"NOTIFY_SOCKET": "@" + name})
        assert systemd.address == "\0" + name
        assert systemd.notify(READY=1)
        listener.wait_for("READY=1", 2)
    finally:
        listener.close()


def test_no_op_without_notify_socket() -> None:
    systemd = Systemd({"WATCHDOG_USEC": "1000000"})
    assert not systemd.enabled
    assert not systemd.notify(READY=1)
    assert systemd.watchdog_interval() is None
    asyncio.run(asyncio.wait_for(systemd.watchdog(), 1))  # returns at once
    assert not Systemd({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled  # not a socket we speak


def test_a_missing_systemd_is_logged_once_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    systemd = Systemd({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.DEBUG, logger="thoxd.systemd"):
        assert not systemd.notify(WATCHDOG=1)
        assert not systemd.notify(WATCHDOG=1)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]


def test_field_names_are_checked(fake: tuple[FakeSystemd, str]) -> None:
    with pytest.raises(ValueError):
        Systemd({"NOTIFY_SOCKET": fake[1]}).notify(**{"READY=1\nSTOPPING": 1})


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),  # meant for us
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval: float | None
) -> None:
    systemd = Systemd({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}, pid=4242)
    assert systemd.watchdog_interval() == interval


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(
    fake: tuple[FakeSystemd, str],
) -> None:
    listener, path = fake
    systemd = Systemd({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # a ping every 0.1 s
    block = 0.8
    marks: dict[str, float] = {}

    async def scenario() -> None:
        pinger = asyncio.create_task(systemd.watchdog())
        await asyncio.sleep(0.55)
        marks["blocked"] = time.monotonic()
        time.sleep(block)  # a stuck event loop: nothing else runs on it
        marks["unblocked"] = time.monotonic()
        await asyncio.sleep(0.55)
        pinger.cancel()

    asyncio.run(scenario())
    time.sleep(0.1)
    pings = listener.times("WATCHDOG=1")
    before = [t for t in pings if t < marks["blocked"]]
    during = [t for t in pings if marks["blocked"] + 0.1 < t < marks["unblocked"]]
    after = [t for t in pings if t > marks["unblocked"]]
    assert len(before) >= 2, pings  # ~6 at 0.1 s on an idle machine
    assert during == [], (marks, pings)  # a blocked loop cannot ping, however fast the box
    assert len(after) >= 2, pings  # the pings come back with the loop
    systemd.close()


# -- the unit file -----------------------------------------------------------------------------


def _unit_lines() -> list[tuple[str, str]]:
    lines = []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            lines.append((key, value))
    return lines


def test_the_unit_says_what_the_issue_asks() -> None:
    lines = _unit_lines()
    values = dict(lines)
    assert values["Type"] == "notify" and values["NotifyAccess"] == "main"
    assert values["WatchdogSec"] == "30" and values["Restart"] == "on-failure"
    # Every connection is a file: 1024 ran out (thoxd caps connections below this).
    assert int(values["LimitNOFILE"]) >= 65536
    assert values["ExecStart"] == "/opt/thoxd/.venv/bin/thoxd serve"
    assert values["DynamicUser"] == values["NoNewPrivileges"] == "yes"
    assert values["ProtectSystem"] == "strict"
    assert values["CapabilityBoundingSet"] == values["AmbientCapabilities"] == ""
    assert set(values["RestrictAddressFamilies"].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",  # zeroconf and psutil list interfaces over netlink
    }
    filters = [v for k, v in lines if k == "SystemCallFilter"]
    assert "@system-service" in filters
    # ggml sets thread affinity: @resources (in @system-service) must stay allowed.
    assert not any(v.startswith("~") and "@resources" in v for v in filters)
    assert values["DevicePolicy"] == "closed"  # GPU nodes pass through DeviceAllow=
    allowed = [v for k, v in lines if k == "DeviceAllow"]
    assert "char-nvidia* rw" in allowed and "char-drm rw" in allowed
    assert "PrivateDevices" not in values  # it would hide the GPUs
    assert "ProcSubset" not in values  # psutil reads /proc/stat, /proc/meminfo, ...


def test_the_readme_explains_every_line_of_the_unit() -> None:
    readme = UNIT_README.read_text()
    missing = sorted({key for key, _ in _unit_lines() if f"`{key}=" not in readme})
    assert missing == []


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


def test_the_unit_verifies(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # verify checks that ExecStart's program exists and is executable: point it at a stand-in
    # for /opt/thoxd/.venv/bin/thoxd; every other line is checked as written.
    program = tmp_path / "thoxd"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/thoxd/.venv/bin/thoxd ") == 1
    unit = tmp_path / "thoxd.service"
    unit.write_text(text.replace("ExecStart=/opt/thoxd/.venv/bin/thoxd ", f"ExecStart={program} "))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values too, with a warning: none may appear.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == result.stderr.strip() == ""


def test_the_unit_scores_at_most_2_exposure() -> None:
    analyze = _systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for thoxd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 2.0, result.stdout


def test_the_example_config_names_every_setting_with_a_valid_value(tmp_path: Path) -> None:
    # Each `# key = value` line, uncommented, must load; together they cover every setting.
    pattern = re.compile(r"^# (\w+) = (.+?)(?:\s+#.*)?$")
    found = [
        m.groups() for line in EXAMPLE_CONFIG.read_text().splitlines() if (m := pattern.match(line))
    ]
    assert sorted(key for key, _ in found) == sorted(Settings.model_fields)
    config = tmp_path / "thoxd.toml"
    config.write_text("".join(f"{key} = {value}\n" for key, value in found))
    settings = load_settings({}, config)
    assert settings.shutdown_grace_seconds == 10.0 and settings.port == 8080


def test_the_install_script_parses() -> None:
    script = REPO / "scripts" / "install"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


# -- the daemon as systemd sees it -------------------------------------------------------------

# Runs the daemon with the kernel's Memory-Deny-Write-Execute (prctl PR_SET_MDWE, Linux 6.3+),
# the protection the unit's MemoryDenyWriteExecute=yes asks for: llama.cpp must work under it.
_MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_SET_MDWE failed')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _mdwe_wrapper() -> list[str]:
    probe = subprocess.run([sys.executable, "-c", _MDWE_EXEC, "/bin/true"], check=False)
    return [sys.executable, "-c", _MDWE_EXEC] if probe.returncode == 0 else []


@pytest.mark.slow
def test_the_daemon_notifies_systemd(
    fake: tuple[FakeSystemd, str], tmp_path: Path, models_dir: Path
) -> None:
    listener, path = fake
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    daemon = Daemon(tmp_path, models_dir, env=env, wrapper=_mdwe_wrapper())
    try:
        ready = listener.wait_for("READY=1", 60)
        # READY=1 only once the socket is bound: /health answers at once (loading or ok).
        assert httpx.get(daemon.url + "/health", timeout=5).status_code in (200, 503)
        assert listener.times("STATUS=starting")[0] <= ready
        daemon.wait_ready()
        listener.wait_for(f"STATUS=serving smollm2-135m-instruct on :{daemon.port}", 10)
        body = {"model": "thox-coder", "prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(daemon.url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        # Pings keep coming from READY on (every 0.5 s: the interval is tested above).
        deadline = time.monotonic() + 30
        while len([t for t in listener.times("WATCHDOG=1") if t >= ready]) < 3:
            assert time.monotonic() < deadline, listener.received()
            time.sleep(0.05)
    finally:
        code = daemon.stop()  # SIGTERM, then wait for the exit
    stopping = listener.wait_for("STOPPING=1", 5)
    assert stopping > ready
    assert code == 0, daemon.log()
