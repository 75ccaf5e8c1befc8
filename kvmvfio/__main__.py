"""``python -m kvmvfio``: the same as the ``kvmvfio`` command."""

import sys

from kvmvfio.cli import run

sys.exit(run())
