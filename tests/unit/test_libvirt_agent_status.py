"""The agent's status file as input: written, read back, refused when it is not the agent's.

And ``kvmvfio agent status``: its exit statuses, its table, its JSON (as
docs/cli-json.md documents it), and the units ``agent --unit`` and
``recover --unit`` print. The agent writing the file is in
tests/unit/test_libvirt_agent.py; a real agent's file in the lab
(tests/lab/test_libvirt.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvmvfio.cli import run
from kvmvfio.errors import KvmvfioError, UntrustedFile
from kvmvfio.host.procs import start_time
from kvmvfio.libvirt import units
from kvmvfio.libvirt.errors import StatusFileInvalid
from kvmvfio.libvirt.status import (
    MAX_STATUS,
    Action,
    AgentStatus,
    DeviceStatus,
    DomainStatus,
    Refusal,
    StatusFile,
    agent_report,
    parse_status,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"
NOW = 1_780_000_000.0


def sample(pid: int | None = None, start: int | None = None) -> AgentStatus:
    pid = os.getpid() if pid is None else pid
    start = start_time(pid) if start is None else start
    refusal = Refusal("IOMMU group 5 cannot have enforced ...", "CoherencyRefused", NOW, NOW + 60)
    return AgentStatus(
        pid=pid,
        pid_start=start,
        started=NOW - 100,
        updated=NOW,
        uri="qemu:///system",
        connected=True,
        resync=60.0,
        domains=(
            DomainStatus(
                "vm1",
                "9f0c5a2e-0000-4000-8000-000000000001",
                True,
                NOW,
                (
                    DeviceStatus("0000:04:00.0", "agent", "cdev", True, True, Action.ATTACHED, NOW),
                    DeviceStatus(
                        "0000:05:00.0", "agent", "cdev", True, False, Action.REFUSED, NOW, refusal
                    ),
                ),
            ),
            DomainStatus("vm2", None, False, NOW, refusal=refusal),
        ),
    )


def _put(root: Path, data: bytes | str) -> Path:
    folder = root / "status"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "agent.json"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


def _doc(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(sample().to_json())), **changes}


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- the file -------------------------------------------------------------------------------


def test_the_status_round_trips(tmp_path: Path) -> None:
    file = StatusFile(tmp_path)
    assert file.read() is None
    file.write(sample())
    assert file.read() == sample()
    assert file.path == tmp_path / "status" / "agent.json"
    assert file.path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in file.path.parent.iterdir() if p.name != "agent.json"]  # renamed
    file.remove()
    file.remove()
    assert file.read() is None


def _refusal_of(raw: bytes | str, tmp_path: Path) -> str:
    _put(tmp_path, raw)
    with pytest.raises(StatusFileInvalid) as refused:
        StatusFile(tmp_path).read()
    assert refused.value.path == tmp_path / "status" / "agent.json"
    return str(refused.value)


def _with(path: list[Any], value: Any) -> str:
    doc = _doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{not json", "it is not JSON"),
        (b"\xff\xfe", "it is not UTF-8 text"),
        ("[]", "the document is not an object"),
        ("[" * 100_000, "not"),  # too deep for json: RecursionError
        (_with(["schema"], 2), "its 'schema' is not 1"),
        (_with(["pid"], "1"), "the 'pid' of the document is not a whole number"),
        (_with(["pid"], True), "the 'pid' of the document is not a whole number"),
        (_with(["pid"], 0), "the 'pid' of the document is not a whole number"),
        (_with(["pid_start"], -1), "the 'pid_start' of the document"),
        (_with(["started"], float("nan")), "the 'started' of the document is not a time"),
        (_with(["updated"], True), "the 'updated' of the document is not a time"),
        (_with(["uri"], 5), "the 'uri' of the document is not a string"),
        (_with(["uri"], "x" * 5000), "the 'uri' of the document is not a string of at most"),
        (_with(["connected"], "yes"), "the 'connected' of the document is not true or false"),
        (_with(["domains"], {}), "the 'domains' of the document is not a list"),
        (_with(["domains"], [{}] * 5000), "is not a list of at most 4096"),
        (_with(["domains", 0], "vm1"), "domain 0 is not an object"),
        (_with(["domains", 0, "name"], KeyError), "domain 0 has no 'name'"),
        (_with(["domains", 0, "running"], 1), "the 'running' of domain 'vm1' is not true"),
        (
            _with(["domains", 0, "devices", 0, "address"], "../../etc"),
            "domain 'vm1' lists '../../etc', not a PCI address or mdev UUID",
        ),
        (
            _with(["domains", 0, "devices", 0, "address"], "4:0.0"),
            "domain 'vm1' lists '4:0.0', not a PCI address",
        ),
        (
            _with(["domains", 0, "devices", 0, "action"], "rm -rf"),
            "the 'action' of device 0000:04:00.0 of domain 'vm1' is not one of attached,",
        ),
        (
            _with(["domains", 0, "devices", 1, "refusal", "retry_at"], "soon"),
            "the 'retry_at' of the refusal of device 0000:05:00.0 of domain 'vm1' is not a time",
        ),
        (_with(["domains", 1, "refusal"], []), "the refusal of domain 'vm2' is not an object"),
    ],
)
def test_a_file_the_agent_never_writes_is_refused_saying_why(
    tmp_path: Path, raw: bytes | str, says: str
) -> None:
    text = _refusal_of(raw, tmp_path)
    assert text.startswith(f"{tmp_path}/status/agent.json is not a status the kvmvfio agent ")
    assert says in text
    assert "\n" not in text


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    text = _refusal_of(b" " * (MAX_STATUS * 4), tmp_path)
    assert f"it is larger than {MAX_STATUS} bytes" in text


def test_unknown_fields_are_ignored() -> None:
    doc = _doc(future=1)
    doc["domains"][0]["future"] = [1, 2]
    assert parse_status(json.dumps(doc).encode()) == sample()


def test_a_link_a_fifo_or_another_mode_is_not_read(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(_doc()))
    folder = tmp_path / "run" / "status"
    folder.mkdir(parents=True, mode=0o700)
    (tmp_path / "run").chmod(0o700)
    (folder / "agent.json").symlink_to(target)
    with pytest.raises(UntrustedFile, match="is a symbolic link"):
        StatusFile(tmp_path / "run").read()
    (folder / "agent.json").unlink()
    os.mkfifo(folder / "agent.json", 0o600)
    with pytest.raises(UntrustedFile, match="is a FIFO"):
        StatusFile(tmp_path / "run").read()
    (folder / "agent.json").unlink()
    _put(tmp_path / "run", json.dumps(_doc())).chmod(0o644)
    with pytest.raises(UntrustedFile, match="has mode 0644"):
        StatusFile(tmp_path / "run").read()


# -- is its writer alive ----------------------------------------------------------------------


def test_the_agent_runs_while_its_pid_has_its_start_time(tmp_path: Path) -> None:
    StatusFile(tmp_path).write(sample())
    report = agent_report(tmp_path)
    assert (report.running, report.why) == (True, f"pid {os.getpid()} runs")


def test_a_reused_pid_or_a_gone_one_is_not_the_agent(tmp_path: Path) -> None:
    start = start_time(os.getpid())
    assert start is not None
    StatusFile(tmp_path).write(sample(start=start + 1))
    report = agent_report(tmp_path)
    assert not report.running
    assert report.why == f"pid {os.getpid()} now belongs to another process"
    StatusFile(tmp_path).write(sample(pid=(1 << 22) + 7, start=5))  # above pid_max
    report = agent_report(tmp_path)
    assert (report.running, report.why) == (False, f"process {(1 << 22) + 7} has exited")
    assert report.status is not None  # the last status is still shown


def test_no_start_time_is_not_taken_for_the_agent(tmp_path: Path) -> None:
    _put(tmp_path, json.dumps(_doc(pid_start=None)))
    report = agent_report(tmp_path)
    assert not report.running
    assert "records no start time" in report.why


# -- kvmvfio agent status ---------------------------------------------------------------------


def test_cli_running_prints_a_table_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    StatusFile(tmp_path).write(sample())
    code, out, err = _cli(["agent", "status", "--root", str(tmp_path)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"agent running: pid {os.getpid()} since ")
    assert "connected to qemu:///system" in lines[0]
    assert re.split(r"\s{2,}", lines[1]) == [
        "DOMAIN", "STATE", "DEVICE", "HANDOFF", "PATH", "QEMU", "LAST ACTION"
    ]  # fmt: skip
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(NOW))
    assert re.split(r"\s{2,}", lines[2]) == [
        "vm1", "running", "0000:04:00.0", "agent", "cdev", "holds", f"attached {when}"
    ]  # fmt: skip
    assert re.split(r"\s{2,}", lines[3])[5:] == ["-", f"refused {when}"]
    assert re.split(r"\s{2,}", lines[4]) == ["vm2", "stopped", "-", "-", "-", "-", "-"]
    assert lines[5] == "refusals waiting for a retry:"
    assert lines[6].startswith("  vm1 0000:05:00.0: IOMMU group 5 cannot have enforced")
    assert lines[6].endswith("tried again by " + _at(NOW + 60) + ")")
    assert lines[7].startswith("  vm2: IOMMU group 5")


def _at(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def test_cli_json_is_the_documented_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    StatusFile(tmp_path).write(sample())
    code, out, _ = _cli(["agent", "status", "--json", "--root", str(tmp_path)], capsys)
    assert code == 0
    doc = json.loads(out)
    assert (doc["schema"], doc["running"], doc["file"]) == (
        1,
        True,
        f"{tmp_path}/status/agent.json",
    )
    agent = doc["agent"]
    assert agent["domains"][0]["devices"][1]["refusal"]["error"] == "CoherencyRefused"
    # Every field is in docs/cli-json.md's table.
    section = DOC.read_text().split("## `kvmvfio agent status --json`", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    domain = agent["domains"][0]
    device = domain["devices"][1]
    keys = set(doc) | set(agent) | set(domain) | set(device) | set(device["refusal"])
    assert keys == documented, keys ^ documented
    assert {a.value for a in Action} <= set(re.findall(r"`([a-z]+)`", section))


def test_cli_not_running_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["agent", "status", "--root", str(tmp_path)], capsys)
    assert (code, err) == (3, "")
    assert out == f"agent not running: there is no status file {tmp_path}/status/agent.json\n"
    code, out, _ = _cli(["agent", "status", "--json", "--root", str(tmp_path)], capsys)
    assert code == 3
    assert json.loads(out)["agent"] is None
    StatusFile(tmp_path).write(sample(pid=(1 << 22) + 7, start=5))
    code, out, _ = _cli(["agent", "status", "--root", str(tmp_path)], capsys)
    assert code == 3
    assert out.startswith(f"agent not running: process {(1 << 22) + 7} has exited; its last ")
    assert "vm1" in out
    code, out, _ = _cli(["agent", "status", "--json", "--root", str(tmp_path)], capsys)
    assert (code, json.loads(out)["running"]) == (3, False)


@pytest.mark.parametrize("raw", ["{not json", json.dumps(_doc(pid="1"))])
def test_cli_bad_file_is_one_sentence_naming_it_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: str
) -> None:
    _put(tmp_path, raw)
    code, out, err = _cli(["agent", "status", "--root", str(tmp_path)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"kvmvfio: {tmp_path}/status/agent.json is not a status the kvmvfio ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_untrusted_file_is_refused_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _put(tmp_path, json.dumps(_doc())).chmod(0o666)
    code, out, err = _cli(["agent", "status", "--root", str(tmp_path)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"kvmvfio: {tmp_path}/status/agent.json has mode 0666;")


def test_cli_escapes_what_the_file_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc(uri="qemu:///\x1b[2Jsystem")
    doc["domains"][0]["name"] = "vm\x1b]0;owned\x07"
    doc["domains"][1]["refusal"]["message"] = "bad\nline\x1b[31m"
    _put(tmp_path, json.dumps(doc))
    code, out, _ = _cli(["agent", "status", "--root", str(tmp_path)], capsys)
    assert code == 0
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "vm\\x1b]0;owned\\x07" in out
    assert "bad\\nline\\x1b[31m" in out
    assert len(out.splitlines()) == 8


def test_status_of_an_unwritable_root_is_a_kvmvfio_error(tmp_path: Path) -> None:
    (tmp_path / "status").mkdir(mode=0o755)
    with pytest.raises(KvmvfioError, match="has mode 0755"):
        agent_report(tmp_path)


# -- the units --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [units.AGENT, units.RECOVER])
def test_units_fit_libvirtd_and_virtqemud_and_name_their_log(kind: str) -> None:
    text = units.unit_text(kind, "/venv/bin/python3")
    lines = text.splitlines()
    assert f"ExecStart=/venv/bin/python3 -m kvmvfio {kind}" in lines
    assert f"SyslogIdentifier=kvmvfio-{kind}" in lines
    order = next(li for li in lines if li.startswith(("After=", "Before=")))
    assert {"libvirtd.service", "virtqemud.service"} <= set(order.split("=", 1)[1].split())
    # Neither daemon is pulled in: a modular host must not get libvirtd started.
    assert not any(li.startswith(("Wants=", "Requires=", "BindsTo=")) for li in lines)
    assert "WantedBy=multi-user.target" in lines


def test_recovery_runs_before_libvirt_and_the_agent_after_it() -> None:
    agent = units.unit_text(units.AGENT, "/p").splitlines()
    recover = units.unit_text(units.RECOVER, "/p").splitlines()
    assert "After=libvirtd.service virtqemud.service kvmvfio-recover.service" in agent
    assert "Before=libvirtd.service virtqemud.service kvmvfio-agent.service" in recover
    assert "Type=oneshot" in recover
    assert "ConditionPathIsDirectory=/run/kvmvfio" in recover


def test_recover_unit_is_checked_like_the_agents(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(["recover", "--unit"], capsys)
    assert code == 0
    assert out.splitlines()[0].endswith("checked by `kvmvfio recover --unit`")
    assert f"ExecStart={sys.executable} -m kvmvfio recover" in out.splitlines()


# -- the hook's log identifier ----------------------------------------------------------------


def test_the_hook_logs_to_syslog_under_its_identifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from kvmvfio.libvirt import hook  # noqa: PLC0415

    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    monkeypatch.setattr(hook, "SYSLOG_SOCKET", str(path))
    root = logging.getLogger("kvmvfio")
    before, level = list(root.handlers), root.level
    try:
        hook._setup_logging()
        assert len([h for h in root.handlers if h not in before]) == 1
        logging.getLogger("kvmvfio.libvirt.hook").info("domain vm1: a decision")
        got = server.recv(4096)
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
        server.close()
    # <14>: facility user, level info; the tag journald files as SYSLOG_IDENTIFIER.
    assert got == f"<14>kvmvfio-hook[{os.getpid()}]: domain vm1: a decision\x00".encode()
