"""What kvmvfio's libvirt hook costs a domain event that is not kvmvfio's.

libvirt runs every hook of ``hooks/qemu.d/`` for every event of every QEMU
domain, so what counts is the no-op path. The installed front (``kvmvfio
hook install``) is timed against, in the same run and interleaved:

- a shell hook that only reads its stdin (``#!/bin/sh`` + ``cat >/dev/null``),
  the least a hook that looks at the XML can do;
- a bare ``python3 -c pass`` (this interpreter), the least a hook written in
  Python costs.

Each is spawned as libvirt does (fork, exec of the hook file, which the
kernel hands to ``/bin/sh`` by its ``#!`` line; argv ``NAME OP SUBOP
EXTRA``; a minimal environment; a ~6 KB libvirt domain XML without kvmvfio
metadata written to a pipe on stdin) and timed from the spawn to the reap.
The front is timed twice: for ``prepare begin`` (it reads the XML and finds
no kvmvfio namespace) and for ``started begin`` (an event it ignores without
reading stdin). The front's interpreter is a stand-in that writes a file if
it is ever started: the bench checks that it never was, and that it is
started once the XML does carry the namespace.

Run from the repository root::

    python bench/bench_hook.py               # the figures in docs/BENCHMARKS.md
    python bench/bench_hook.py --runs 50
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from kvmvfio.libvirt.install import install  # noqa: E402

#: What libvirt leaves a hook (virCommandAddEnvPassCommon): PATH, the locale, no PYTHONPATH.
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
NAMESPACE = "urn:kvmvfio:libvirt:1"
GOAL = 1.1  # the front's no-op path may cost at most this many times the shell hook (issue 19)

#: A q35 domain as libvirt 11 formats it for a hook (``virsh dumpxml`` shape), no kvmvfio.
DOMAIN_XML = """<domain type='kvm' id='7'>
  <name>web1</name>
  <uuid>0d4a8d0e-6f1c-4b6e-9a3d-2f8a1c5e7b90</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <firmware>
      <feature enabled='no' name='enrolled-keys'/>
      <feature enabled='yes' name='secure-boot'/>
    </firmware>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <vmport state='off'/>
    <smm state='on'/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm>
    <suspend-to-mem enabled='no'/>
    <suspend-to-disk enabled='no'/>
  </pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web1.qcow2' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'>
      <alias name='pcie.0'/>
    </controller>
{root_ports}    <controller type='sata' index='0'>
      <alias name='ide'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <alias name='virtio-serial0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default' portid='8c1d1f2e-2b8a-4f65-9a0c-3e2d1b0a9f87' bridge='virbr0'/>
      <target dev='vnet6'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/3'>
      <source path='/dev/pts/3'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/7-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='tablet' bus='usb'>
      <alias name='input0'/>
      <address type='usb' bus='0' port='1'/>
    </input>
    <input type='mouse' bus='ps2'>
      <alias name='input1'/>
    </input>
    <input type='keyboard' bus='ps2'>
      <alias name='input2'/>
    </input>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <audio id='1' type='none'/>
    <video>
      <model type='virtio' heads='1' primary='yes'/>
      <alias name='video0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/>
    </video>
    <memballoon model='virtio'>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <alias name='rng0'/>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>
    </rng>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-0d4a8d0e-6f1c-4b6e-9a3d-2f8a1c5e7b90</label>
    <imagelabel>libvirt-0d4a8d0e-6f1c-4b6e-9a3d-2f8a1c5e7b90</imagelabel>
  </seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+994</label>
    <imagelabel>+64055:+994</imagelabel>
  </seclabel>
</domain>
"""

ROOT_PORT = """    <controller type='pci' index='{n}' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='{n}' port='0x{port:x}'/>
      <alias name='pci.{n}'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x{fn:x}'{multi}/>
    </controller>
"""


def domain_xml() -> bytes:
    """Return the benchmark's domain XML (about 6 KB, with 6 PCIe root ports)."""
    ports = "".join(
        ROOT_PORT.format(
            n=n, port=0x10 + n - 1, fn=n - 1, multi=" multifunction='on'" if n == 1 else ""
        )
        for n in range(1, 7)
    )
    return DOMAIN_XML.replace("{root_ports}", ports).encode()


def spawn(argv: list[str], xml: bytes) -> float:
    """Run ``argv`` with ``xml`` on a pipe as its stdin, as libvirt does; return seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )
    _, err = proc.communicate(xml)  # a hook that does not read: EPIPE ignored, like libvirt
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {proc.returncode}: {err.decode(errors='replace')}")
    return elapsed


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[8]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs of each hook (interleaved)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument(
        "--vfork",
        action="store_true",
        help="let subprocess use vfork (default: fork then exec, as libvirt does)",
    )
    args = parser.parse_args()
    if not args.vfork and hasattr(subprocess, "_USE_VFORK"):
        subprocess._USE_VFORK = False  # libvirt's virExec forks

    xml = domain_xml()
    assert NAMESPACE.encode() not in xml
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        started = base / "python-started"
        stand_in = base / "python3"
        stand_in.write_text(f"#!/bin/sh\n: > {shlex.quote(str(started))}\ncat >/dev/null\n")
        stand_in.chmod(0o755)
        (base / "libvirt").mkdir()
        front = str(install(base / "libvirt" / "hooks", str(stand_in)).path)
        shell_hook = base / "shell-hook"
        shell_hook.write_text("#!/bin/sh\ncat >/dev/null\n")
        shell_hook.chmod(0o755)

        tail = ["web1", "prepare", "begin", "-"]
        cases = {
            "front, `prepare begin` (reads the XML: no kvmvfio namespace)": [front, *tail],
            "front, `started begin` (ignored, stdin not read)": [
                front,
                "web1",
                "started",
                "begin",
                "-",
            ],
            "shell hook `cat >/dev/null`": [str(shell_hook), *tail],
            f"`python3 -c pass` ({sys.executable})": [sys.executable, "-c", "pass"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        order = list(cases)
        rng = random.Random(1)
        for i in range(args.warmup + args.runs):
            rng.shuffle(order)  # interleaved, in a new order each round
            for name in order:
                t = spawn(cases[name], xml)
                if i >= args.warmup:
                    times[name].append(t)
        if started.exists():
            raise SystemExit("the front started its interpreter on the no-op path")
        with_ns = xml.replace(b"<metadata>", f'<metadata><k:x xmlns:k="{NAMESPACE}"/>'.encode())
        spawn([front, *tail], with_ns)
        if not started.exists():
            raise SystemExit("the front did not start its interpreter for a kvmvfio domain")

    sh = os.path.realpath("/bin/sh")
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Linux {platform.release()}, /bin/sh is {sh}; {len(xml)} bytes of XML on stdin; "
        f"{args.runs} runs each, interleaved, after {args.warmup} warm-up rounds; "
        f"{'vfork' if args.vfork else 'fork'} + exec"
    )
    print()
    names = list(cases)
    front_noop, front_ignored, shell, python = names
    med = {n: statistics.median(times[n]) for n in names}
    print("| hook | median | p90 | / shell hook | / `python3 -c pass` |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in names:
        print(
            f"| {n} | {med[n] * 1e3:.2f} ms | {p90(times[n]) * 1e3:.2f} ms "
            f"| {med[n] / med[shell]:.2f}x | {med[n] / med[python]:.3f}x |"
        )
    print()
    ratio = med[front_noop] / med[shell]
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(
        f"front no-op / shell hook: {ratio:.2f}x (goal: at most {GOAL:g}x, {verdict}); "
        f"front no-op / python3 -c pass: {med[front_noop] / med[python]:.3f}x; "
        f"front ignored op / shell hook: {med[front_ignored] / med[shell]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
