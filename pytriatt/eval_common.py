"""The former name of pytriatt.evaluation.common: importing it gives that same module."""

import sys

from .evaluation import common

sys.modules[__name__] = common
