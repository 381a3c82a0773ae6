"""The former name of pytriatt.evaluation.runner: importing it gives that same module."""

import sys

from .evaluation import runner

sys.modules[__name__] = runner
