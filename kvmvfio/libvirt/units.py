"""systemd units for the agent and for recovery at boot, for libvirtd or virtqemud alike.

libvirt's QEMU driver runs in the monolithic ``libvirtd`` or, with the
modular daemons, in ``virtqemud``; a host has one or the other (often
socket-activated). The units order themselves against both and require
neither: ``After=``/``Before=`` a unit that is not installed is a no-op,
whereas ``Wants=libvirtd.service`` on a modular host would start the
monolithic daemon beside virtqemud. The agent needs no daemon to start:
it connects to libvirt itself and retries until libvirt answers (its
socket, if socket-activated, starts the daemon).

No install path is written into a unit: ``ExecStart`` names the
interpreter the unit was checked with (``python -m kvmvfio``), and the
command that prints a unit checks that this interpreter imports this
kvmvfio as systemd will start it (:mod:`kvmvfio.cli.libvirt_cmds`).
"""

from __future__ import annotations

__all__ = ["AGENT", "RECOVER", "UNITS", "unit_text"]

#: What each unit is for, by the name of the command that prints it.
AGENT = "agent"
RECOVER = "recover"

_AGENT = """\
{header}[Unit]
Description=kvmvfio agent: hand PCI devices to libvirt domains by file descriptor
# libvirt's QEMU driver is in libvirtd or in virtqemud: after either, requiring neither
# (the agent connects, and reconnects, to libvirt by itself); after kvmvfio's recovery.
After=libvirtd.service virtqemud.service kvmvfio-recover.service

[Service]
{environment}ExecStart={python} -m kvmvfio agent
Restart=on-failure
RestartSec=2s
# Its log: journalctl -t kvmvfio-agent
SyslogIdentifier=kvmvfio-agent

[Install]
WantedBy=multi-user.target
"""

_RECOVER = """\
{header}[Unit]
Description=kvmvfio recover: put back what dead owners left (drivers, VF counts, mdevs)
# Before libvirt's QEMU driver (libvirtd or virtqemud) and the agent claim anything.
Before=libvirtd.service virtqemud.service kvmvfio-agent.service
# kvmvfio's records are in /run, which a reboot empties (and a reboot puts every device
# back on its driver): after a real boot there is nothing to recover and the unit is
# skipped. It acts when /run/kvmvfio outlived the processes that wrote it.
ConditionPathIsDirectory=/run/kvmvfio

[Service]
Type=oneshot
{environment}ExecStart={python} -m kvmvfio recover
# Its log: journalctl -t kvmvfio-recover
SyslogIdentifier=kvmvfio-recover

[Install]
WantedBy=multi-user.target
"""

#: The template of each unit.
UNITS = {AGENT: _AGENT, RECOVER: _RECOVER}


def unit_text(kind: str, python: str, pythonpath: str | None = None, about: str = "") -> str:
    """The systemd unit ``kind`` (:data:`AGENT` or :data:`RECOVER`) for ``python``.

    With ``pythonpath``, the unit sets ``PYTHONPATH`` (for an interpreter
    that does not import kvmvfio by itself); ``about`` is a comment line on
    top (which kvmvfio and Python the unit was checked with).
    """
    environment = ""
    if pythonpath is not None:
        # systemd's quoting: C escapes inside double quotes, % doubled (specifiers).
        quoted = pythonpath.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        environment = f'Environment="PYTHONPATH={quoted}"\n'
    header = f"# {about}\n" if about else ""
    return UNITS[kind].format(python=python, environment=environment, header=header)
