"""The former name of pytriatt.benchmark (`pytriatt bench`): importing it gives that same package."""

import sys

from . import benchmark

sys.modules[__name__] = benchmark
