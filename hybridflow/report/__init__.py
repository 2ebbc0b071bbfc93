"""Reports: read run dirs and the simulator's predictions; write Markdown, CSV and PNG plots.

Nothing here recomputes what the simulator predicts or what a run measured.
"""
