"""``kvmvfio hook install|uninstall|show``: kvmvfio's libvirt qemu hook.

See :mod:`kvmvfio.libvirt.install`: the installed file is a shell front that
lets libvirt's other events pass without starting Python.
"""

from __future__ import annotations

import argparse
import sys

# kvmvfio.libvirt is imported by the handlers only: make_parser() registers
# every command family for every command, and the libvirt package may import
# what the other commands must not need (libvirt-python). The same defaults
# as kvmvfio.libvirt.install's (a unit test holds them equal).
DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
DEFAULT_NAME = "kvmvfio"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``hook`` command family to the top-level subparsers."""
    hook = sub.add_parser(
        "hook",
        help="install or remove kvmvfio's libvirt qemu hook",
        description=(
            "libvirt runs every executable in HOOKS_DIR/qemu.d/ for every event of every QEMU "
            "domain. kvmvfio's hook is a POSIX shell front that ignores, without starting "
            "Python, every event but `prepare begin` and `release end` of domains carrying "
            "kvmvfio's metadata, and runs `python -m kvmvfio.libvirt.hook` for those, with the "
            "interpreter and PYTHONPATH fixed at install time."
        ),
    )
    hooksub = hook.add_subparsers(
        dest="hook_command", metavar="HOOK_COMMAND", parser_class=type(hook)
    )
    hooksub.required = True

    ins = hooksub.add_parser(
        "install",
        help="write HOOKS_DIR/qemu.d/kvmvfio (atomically; replaces an older kvmvfio hook)",
        description=(
            "Check that the interpreter imports kvmvfio's hook (and cffi, qemu.qmp) as "
            "libvirt will run it, from this kvmvfio's folder (warning when that folder is a "
            "source checkout rather than an installed package), then write the hook front to "
            "HOOKS_DIR/qemu.d/kvmvfio, mode 0755, atomically. An older kvmvfio hook is "
            "replaced; any other file there is left alone unless --force. "
            "Exit status: 0 installed, 1 refused, 2 bad arguments."
        ),
    )
    _hooks_dir(ins)
    _python(ins)
    ins.add_argument(
        "--force", action="store_true", help="overwrite a file at that path kvmvfio did not write"
    )
    ins.set_defaults(handler=_install)

    uni = hooksub.add_parser(
        "uninstall",
        help="remove HOOKS_DIR/qemu.d/kvmvfio (only if kvmvfio wrote it)",
    )
    _hooks_dir(uni)
    uni.set_defaults(handler=_uninstall)

    show = hooksub.add_parser("show", help="print the hook front as `install` would write it")
    _python(show)
    show.set_defaults(handler=_show)


def _hooks_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hooks-dir",
        default=DEFAULT_HOOKS_DIR,
        metavar="DIR",
        help="libvirt's hooks folder (default: %(default)s)",
    )


def _python(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--python",
        default=sys.executable,
        metavar="PATH",
        help="absolute path of the interpreter the hook runs (default: this one, %(default)s)",
    )


def _install(args: argparse.Namespace) -> int:
    from kvmvfio.libvirt.install import (  # noqa: PLC0415 (see the top)
        check_imports,
        checkout_warning,
        install,
        is_source_checkout,
    )

    found = check_imports(args.python)  # before anything is written
    res = install(args.hooks_dir, args.python, force=args.force)
    if res.replaced:
        what = f"replaced the kvmvfio hook {res.path}"
    elif res.forced:
        what = f"installed {res.path} over a file kvmvfio had not written"
    else:
        what = f"installed {res.path}"
    if res.restart_needed:
        print(
            f"{what}; restart libvirtd (or virtqemud) so that libvirt notices its first qemu "
            "hook (a reload is enough: libvirt looks for hooks again on SIGHUP)"
        )
    else:
        print(what)
    print(
        f"  runs {res.python} (Python {found.python_version}) -m kvmvfio.libvirt.hook "
        f"with PYTHONPATH={res.pythonpath}"
    )
    if is_source_checkout(res.pythonpath):
        print(f"kvmvfio: warning: {checkout_warning(res.pythonpath, 'the hook')}", file=sys.stderr)
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    target = f"{args.hooks_dir.rstrip('/')}/qemu.d/{DEFAULT_NAME}"
    from kvmvfio.libvirt.install import uninstall  # noqa: PLC0415 (see the top)

    if uninstall(args.hooks_dir):
        print(f"removed {target}")
    else:
        print(f"no kvmvfio hook at {target}: nothing to remove")
    return 0


def _show(args: argparse.Namespace) -> int:
    from kvmvfio.libvirt.install import render  # noqa: PLC0415 (see the top)

    sys.stdout.write(render(args.python))
    return 0
