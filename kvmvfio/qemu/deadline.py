"""Deadlines: how many seconds a step that waits on QEMU (or a guest) may take.

Every wait kvmvfio makes on the outside world has one, and a deadline that
is not a plain number of seconds is refused where it is given: ``nan``
compares false with every clock reading, so a retry loop bounded by it
never ends, and ``inf`` (or ``1e400``, which is ``inf`` once parsed)
waits for ever.
"""

from __future__ import annotations

import math

from kvmvfio.errors import UsageError, shown

#: The longest any one step may be given, in seconds (a week).
MAX_SECONDS = 7 * 24 * 3600


def seconds(value: object, what: str, *, positive: bool = False, given: str | None = None) -> float:
    """``value`` as a deadline: finite, at least 0 (more than 0 if ``positive``), at most a week.

    Raises :class:`~kvmvfio.errors.UsageError` naming ``what`` (and
    ``given``, the value as the user wrote it) otherwise.
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        assert isinstance(value, int | float)
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
        ok = ok and value <= MAX_SECONDS
    if not ok:
        low = "more than 0" if positive else "at least 0"
        said = shown(given if given is not None else repr(value), 40)
        raise UsageError(
            f"{what} must be a number of seconds, {low} and at most {MAX_SECONDS} (a week), "
            f"not {said}"
        )
    assert isinstance(value, int | float)
    return float(value)


def parse_seconds(text: str, what: str, *, positive: bool = False) -> float:
    """:func:`seconds` of a number given as text (a command-line argument)."""
    try:
        value: object = float(text)
    except ValueError:
        value = None
    return seconds(value, what, positive=positive, given=text)
