"""The former name of pytriatt.testing.synth: importing it gives that same module, and
`python -m pytriatt.synth` still runs it."""

import sys

from .testing import synth

if __name__ == "__main__":
    sys.exit(synth.main())
sys.modules[__name__] = synth
