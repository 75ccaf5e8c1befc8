"""kvmvfio against libvirt's managed hostdev and a hand-written hook, in one lab run (inside L1).

    make compare     # = kvmvfio lab run -- python3 bench/compare.py

The task: a libvirt domain of type kvm gets the lab's e1000e NIC when it
starts and the host gets it back when it stops. Three ways:

``kvmvfio``   kvmvfio's hook, the domain's kvmvfio metadata, ``<hostdev managed='no'>``;
              the hook runs a copy of the package with its bytecode compiled, as
              pip installs it (L1's checkout is read-only and has none, so a hook
              run from it would compile every module at every start); no agent
              runs, so the hook's front starts Python at each event
``kvmvfio+agent``  the same, with ``kvmvfio agent`` running (from the same copy): the
              front hands both events to it and starts no Python (timing only:
              the checks are the same code, measured in the ``kvmvfio`` column)
``libvirt``   ``<hostdev managed='yes'>``: libvirt detaches and reattaches itself
``hook.sh``   the hook script people write (below): driver_override, unbind,
              drivers_probe at ``prepare begin``, the reverse at ``release end``

For each: the time to start and to get the NIC back (median of RUNS);
what it checks before acting (a group with another member on a host
driver; the NIC carrying the host's default route; a coherency demand);
and what is left after a failure half-way: libvirtd and the VM's QEMU
killed while the VM runs, libvirtd started again. For the two hooks also:
the hook itself killed right after it unbound the NIC. Prints markdown;
writes JSON to /mnt/job/compare.json. ``--time-only``: the times alone
(the checks and failures are what the code does, and change less often);
``--runs N``: N runs of the task per way (default RUNS); ``--ways A,B``: those
ways only, in that order (default WAYS). ``--stamps``: a hook ``00-stamp``
that only notes when libvirt calls it (first in ``qemu.d``, for every way)
tells, per stop, how long libvirt took to reach ``stopped end`` and
``release end``: what no ``release end`` hook can be faster than.
``--settle S``: S seconds of rest after each stop, so that what a stop
leaves running (a hook process's exit, the agent's reconcile of the
stopped domain) does not overlap the next start.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from labkit import driver, lab_topology

import kvmvfio
from kvmvfio.lab.libvirtd import Libvirtd, domain_xml, virsh
from kvmvfio.libvirt import install
from kvmvfio.libvirt.metadata import NAMESPACE
from kvmvfio.libvirt.monitor import qemu_pid
from kvmvfio.prepare import recover, status

PCI = Path("/sys/bus/pci/devices")
HOOKS = Path("/etc/libvirt/hooks")
WORK = Path("/run/kvmvfio-compare")
RUNS = 3
WAYS = ("kvmvfio", "kvmvfio+agent", "libvirt", "hook.sh")
AGENT_LOG = WORK / "agent.log"
AGENT_PIDFILE = Path("/run/kvmvfio/hook/agent")
STAMP_HOOK = HOOKS / "qemu.d" / "00-stamp"
STAMPS = WORK / "stamps"

#: Notes "OP SUBOP seconds-since-boot" for every event; reads no input, prints nothing.
STAMP_SCRIPT = f"""#!/bin/sh
read -r up _ </proc/uptime
printf '%s %s %s\\n' "$2" "$3" "$up" >>{STAMPS}
exit 0
"""

HAND_HOOK = """#!/bin/sh
# A typical hand-written libvirt hook (the pattern found in passthrough guides).
[ "$1" = vm ] || exit 0
DEV=@DEV@
if [ "$2" = prepare ] && [ "$3" = begin ]; then
    echo vfio-pci > /sys/bus/pci/devices/$DEV/driver_override
    [ -e /sys/bus/pci/devices/$DEV/driver ] && echo $DEV > /sys/bus/pci/devices/$DEV/driver/unbind
    [ -n "$KILL_AFTER_UNBIND" ] && kill -9 $$   # the bench's failure injection, not in the original
    echo $DEV > /sys/bus/pci/drivers_probe
elif [ "$2" = release ] && [ "$3" = end ]; then
    [ -e /sys/bus/pci/devices/$DEV/driver ] && echo $DEV > /sys/bus/pci/devices/$DEV/driver/unbind
    echo > /sys/bus/pci/devices/$DEV/driver_override
    echo $DEV > /sys/bus/pci/drivers_probe
fi
exit 0
"""


#: kvmvfio's libvirt hook (its Python side, as the installed front runs it),
#: killed by SIGKILL right after its host change N (argv[1]).
KILLED_HOOK = """
import os, signal, sys
import kvmvfio.prepare
from kvmvfio.libvirt import hook
n = int(sys.argv[1])
kvmvfio.prepare.set_change_hook(lambda k: k == n and os.kill(os.getpid(), signal.SIGKILL))
sys.exit(hook.main(sys.argv[2:]))
"""


def override(addr: str) -> str:
    return (PCI / addr / "driver_override").read_text().strip() or "(empty)"


def wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):  # a driver link gone between two looks
            if check():
                return True
        time.sleep(0.05)
    return False


def installed_copy() -> Path:
    """kvmvfio as pip leaves it installed: the package with its bytecode compiled."""
    site = WORK / "site"
    if not (site / "kvmvfio").is_dir():
        shutil.copytree(
            Path(kvmvfio.__file__).parent,
            site / "kvmvfio",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        if not compileall.compile_dir(site / "kvmvfio", quiet=1):
            raise SystemExit(f"compileall failed on {site}")
    return site


def start_agent() -> subprocess.Popen[bytes]:
    """``kvmvfio agent`` from the installed copy, as its unit runs it; back once it serves."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(installed_copy())}
    with open(AGENT_LOG, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmvfio", "agent"], stdout=out, stderr=out, env=env, cwd="/"
        )
    if not wait(lambda: "serving the libvirt hook" in AGENT_LOG.read_text(), 120):
        proc.kill()
        raise SystemExit(f"the agent did not serve the hook: {AGENT_LOG.read_text()[-2000:]}")
    return proc


def stop_agent(proc: subprocess.Popen[bytes]) -> int:
    """Stop the agent (SIGINT: it removes its pid file); the hook events it served."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = AGENT_LOG.read_text(errors="replace")
    if "Traceback" in text:
        print(f"compare: the agent's log has a traceback:\n{text[-4000:]}", flush=True)
    return text.count(" served (status 0")


def agent_took(event: str) -> float | None:
    """The median time the agent's log says it spent serving ``event`` (its own work)."""
    took = re.findall(rf" {event} served \(status 0, ([0-9.]+) s\)", AGENT_LOG.read_text())
    return round(statistics.median(float(t) for t in took), 2) if took else None


class Way:
    def __init__(self, name: str, nic: str) -> None:
        self.name, self.nic = name, nic

    def install(self) -> None:
        (HOOKS / "qemu.d").mkdir(parents=True, exist_ok=True)
        if self.name.startswith("kvmvfio"):
            install.install(HOOKS, python=sys.executable, pythonpath=str(installed_copy()))
        elif self.name == "hook.sh":
            path = HOOKS / "qemu.d" / "passthrough"
            path.write_text(HAND_HOOK.replace("@DEV@", self.nic))
            path.chmod(0o755)

    def uninstall(self) -> None:
        install.uninstall(HOOKS)
        (HOOKS / "qemu.d" / "passthrough").unlink(missing_ok=True)
        STAMP_HOOK.unlink(missing_ok=True)

    def xml(self, devices: list[str], coherency: str = "warn") -> str:
        managed = self.name == "libvirt"
        meta = ""
        if self.name.startswith("kvmvfio"):
            items = "".join(f'<k:device address="{d}"/>' for d in devices)
            meta = f'<k:devices xmlns:k="{NAMESPACE}" coherency="{coherency}">{items}</k:devices>'
        text = domain_xml("vm", metadata=meta, hostdevs=devices)
        return text.replace("managed='no'", "managed='yes'") if managed else text


def note_stamps(
    what: str, since: float, events: tuple[str, ...], into: dict[str, list[float]]
) -> None:
    """Add, for each of ``events`` the stamp hook saw, its time after ``since`` (boot clock)."""
    for line in STAMPS.read_text().splitlines() if STAMPS.exists() else []:
        op, subop, at = line.split()
        if f"{op} {subop}" in events:
            into.setdefault(f"{what} to {op} {subop} hook s", []).append(float(at) - since)


def start(
    way: Way, xml: str, timeout: float = 120, stamps: dict[str, list[float]] | None = None
) -> tuple[bool, float, str]:
    path = WORK / "vm.xml"
    path.write_text(xml)
    STAMPS.unlink(missing_ok=True)
    t, b = time.monotonic(), boottime()
    try:
        done = virsh("create", str(path), "--paused", check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - t, f"did not start within {timeout:g} s"
    ok = done.returncode == 0
    if stamps is not None and ok:
        note_stamps("create", b, ("prepare begin", "start begin", "started begin"), stamps)
    said = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return ok, time.monotonic() - t, said


def boottime() -> float:
    """The clock of /proc/uptime (the stamp hook's), in seconds."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def stop(nic: str, original: str, stamps: dict[str, list[float]] | None = None) -> float:
    STAMPS.unlink(missing_ok=True)
    t, b = time.monotonic(), boottime()
    virsh("destroy", "vm", check=False)
    wait(lambda: driver(nic) == original, 30)
    took = time.monotonic() - t
    if stamps is not None:
        # /proc/uptime has 10 ms steps; an event not seen within the wait is left out.
        wait(lambda: STAMPS.exists() and "release end" in STAMPS.read_text(), 10)
        note_stamps("destroy", b, ("stopped end", "release end"), stamps)
    return took


def reset_host(daemon: Libvirtd, nic: str, original: str) -> None:
    """Between experiments: no domain, NIC on its driver, empty journal."""
    virsh("destroy", "vm", check=False)
    recover()
    if driver(nic) != original:
        if driver(nic) != "none":
            (PCI / nic / "driver" / "unbind").write_text(nic)
        (PCI / nic / "driver_override").write_text("\n")
        Path("/sys/bus/pci/drivers_probe").write_text(nic)
        wait(lambda: driver(nic) == original, 10)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    time_only = "--time-only" in args
    runs = int(args[args.index("--runs") + 1]) if "--runs" in args else RUNS
    ways = tuple(args[args.index("--ways") + 1].split(",")) if "--ways" in args else WAYS
    stamping = "--stamps" in args
    settle = float(args[args.index("--settle") + 1]) if "--settle" in args else 0.0
    topology = lab_topology()
    nic = topology.guest_address("nic0")
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    original = driver(nic)
    WORK.mkdir(parents=True, exist_ok=True)
    # libvirt's managed mode looks up VFIO variant drivers in modules.alias; the
    # lab's kernel has every driver built in and no /lib/modules at all.
    alias = Path(f"/lib/modules/{os.uname().release}/modules.alias")
    alias.parent.mkdir(parents=True, exist_ok=True)
    alias.touch()
    daemon = Libvirtd()
    results: dict[str, dict[str, object]] = {}
    for name in ways:
        way = Way(name, nic)
        way.install()
        if stamping:
            STAMP_HOOK.write_text(STAMP_SCRIPT)
            STAMP_HOOK.chmod(0o755)
        daemon.restart()  # libvirt looks for hooks when it starts (restart starts it too)
        r: dict[str, object] = {}
        agent = start_agent() if name == "kvmvfio+agent" else None
        # 1. The task, RUNS times.
        starts, stops, fails = [], [], []
        stamps: dict[str, list[float]] | None = {} if stamping else None
        for _ in range(runs):
            ok, took, said = start(way, way.xml([nic]), stamps=stamps)
            moved = driver(nic)
            if not ok:
                fails.append(said)
                reset_host(daemon, nic, original)
                daemon.restart()
                continue
            starts.append(took)
            stops.append(stop(nic, original, stamps))
            time.sleep(settle)  # what the stop left running ends before the next start
            r.setdefault("driver while running", moved)
        r["start s"] = round(statistics.median(starts), 2) if starts else None
        r["stop to NIC back s"] = round(statistics.median(stops), 2) if stops else None
        for key, values in (stamps or {}).items():
            r[key] = round(statistics.median(values), 2)
        r["start failures"] = fails
        r["NIC back after stop"] = driver(nic) == original
        reset_host(daemon, nic, original)
        if agent is not None:
            r["hook events the agent served"] = stop_agent(agent)
            r["agent's own work, prepare begin s"] = agent_took("prepare begin")
            r["agent's own work, release end s"] = agent_took("release end")
        if agent is not None or time_only:
            way.uninstall()
            results[name] = r
            print(f"compare: {name}: {json.dumps(r)}", flush=True)
            continue
        # 2. Checks before acting.
        # a) a group with another member on a host driver
        (PCI / edu3 / "driver_override").write_text("pci-pf-stub")
        Path("/sys/bus/pci/drivers_probe").write_text(edu3)
        way_grp = Way(name, edu2)
        if name == "hook.sh":
            way_grp.install()
        ok, _, said = start(way_grp, way_grp.xml([edu2]))
        r["group with a member on a host driver"] = {
            "started": ok,
            "said": said[-200:],
            "edu2 after": driver(edu2),
            "edu3 after": driver(edu3),
        }
        virsh("destroy", "vm", check=False)
        wait(lambda: driver(edu2) == "none", 10)
        recover()
        (PCI / edu3 / "driver" / "unbind").write_text(edu3)
        (PCI / edu3 / "driver_override").write_text("\n")
        if name == "hook.sh":
            way.install()
        # b) the NIC carries the host's default route
        iface = sorted(os.listdir(PCI / nic / "net"))[0]
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{iface}.disable_ipv6=1"], check=False)
        subprocess.run(["ip", "link", "set", iface, "up"], check=False)
        subprocess.run(["ip", "route", "add", "default", "dev", iface], check=False)
        ok, _, said = start(way, way.xml([nic]))
        r["NIC carries the default route"] = {
            "started": ok, "said": said[-200:], "NIC during": driver(nic)
        }  # fmt: skip
        virsh("destroy", "vm", check=False)
        reset_host(daemon, nic, original)
        subprocess.run(["ip", "route", "del", "default"], check=False)
        # c) coherency demanded (kvmvfio only has the notion)
        if name == "kvmvfio":
            ok, _, said = start(way, way.xml([nic], coherency="require"))
            r["coherency='require' on a non-snooping IOMMU"] = {"started": ok, "said": said[-200:]}
            virsh("destroy", "vm", check=False)
            reset_host(daemon, nic, original)
        # 3. Failure half-way: libvirtd and QEMU killed while the VM runs.
        ok, _, said = start(way, way.xml([nic]))
        if ok:
            pid = qemu_pid("vm")
            for p in subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True,
                                    text=True, check=False).stdout.split():  # fmt: skip
                os.kill(int(p), signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            time.sleep(1)
            daemon.stop()
            daemon.start()
            # libvirt finds the VM dead on reconnecting and runs its stop hooks:
            # give them time to finish (the driver comes back before the journal goes).
            wait(lambda: driver(nic) == original and not status(), 20)
            r["libvirtd and QEMU killed, libvirtd restarted"] = {
                "NIC": driver(nic),
                "driver_override": override(nic),
                "journal": [f"group {s.group} ({s.owner})" for s in status()],
            }
        reset_host(daemon, nic, original)
        # 4. The hook itself killed right after the unbind (hooks only).
        if name in ("kvmvfio", "hook.sh"):
            hook = HOOKS / "qemu.d" / ("kvmvfio" if name == "kvmvfio" else "passthrough")
            env = {**os.environ, "KILL_AFTER_UNBIND": "1"}
            # kvmvfio's hook is killed through its test seam (after host change 2, the
            # unbind); the shell hook through the line the bench adds to it.
            argv = [sys.executable, "-c", KILLED_HOOK, "2"] if name == "kvmvfio" else [str(hook)]
            subprocess.run([*argv, "vm", "prepare", "begin", "-"], input=way.xml([nic]),
                           text=True, env=env, capture_output=True, check=False)  # fmt: skip
            left = {"NIC": driver(nic), "driver_override": override(nic)}
            left["journal"] = [f"group {s.group} ({s.owner})" for s in status()]  # type: ignore[assignment]
            # What the way itself offers to repair it: kvmvfio recover; the script's release branch.
            if name == "kvmvfio":
                subprocess.run(["kvmvfio", "recover"], capture_output=True, check=False)
            else:
                subprocess.run([str(hook), "vm", "release", "end", "-"], input="",
                               text=True, capture_output=True, check=False)  # fmt: skip
            wait(lambda: driver(nic) == original, 10)
            left["after its own repair"] = f"{driver(nic)}, override {override(nic)}"
            r["hook killed after the unbind"] = left
        reset_host(daemon, nic, original)
        way.uninstall()
        results[name] = r
        print(f"compare: {name}: {json.dumps(r)}", flush=True)
    daemon.stop()
    print("\n| | " + " | ".join(ways) + " |")
    print("| --- " * (len(ways) + 1) + "|")
    keys = [k for n in ways for k in results[n]]
    for key in dict.fromkeys(keys):
        cells = [json.dumps(results[n].get(key, "n/a")) for n in ways]
        print(f"| {key} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    job = Path(os.environ.get("KVMVFIO_LAB_JOB", "/tmp"))
    (job / "compare.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
