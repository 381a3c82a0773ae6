"""The former name of pytriatt.evaluation.recall: importing it gives that same module."""

import sys

from .evaluation import recall

sys.modules[__name__] = recall
