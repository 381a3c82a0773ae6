"""`pytriatt eval`: what a KV policy keeps of the model's quality, at each memory budget.

    common                          result rows, intervals, models, contexts with a policy attached,
                                    greedy decoding under a policy
    nll, passkey, agree, dfs, recall, ruler
                                    one module per task; each run_* function returns result rows
    runner                          evaluate(): one task over policies and budgets; the table, the plot
"""

from .runner import DEFAULT_METRIC, SHIFT_POLICIES, TASKS, evaluate, format_table, plot_rows

__all__ = ["DEFAULT_METRIC", "SHIFT_POLICIES", "TASKS", "evaluate", "format_table", "plot_rows"]
