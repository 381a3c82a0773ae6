"""The former home of the nll, passkey, agree and dfs tasks of `pytriatt eval`, now one module each in
pytriatt.evaluation (their shared helpers in pytriatt.evaluation.common); the names stay importable here."""

from .evaluation.agree import *  # noqa: F401,F403
from .evaluation.common import POLICY_KW, greedy, model_detokenize, prefill  # noqa: F401
from .evaluation.dfs import *  # noqa: F401,F403
from .evaluation.nll import *  # noqa: F401,F403
from .evaluation.passkey import *  # noqa: F401,F403
