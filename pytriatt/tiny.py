"""The former name of pytriatt.testing.tiny: importing it gives that same module."""

import sys

from .testing import tiny

sys.modules[__name__] = tiny
