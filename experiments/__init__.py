"""Experiments between model versions.

Built so far: the statistics engine (``experiments.stats``) and its validation
(``python -m experiments.validate``, ``make validate-stats``), experiment state
(``experiments.store``), sticky assignment (``experiments.assignment``); bots
report outcomes with ``Client.record_outcome``; ``experiments.analysis`` turns
per-arm data into a decision. The worker does not serve two versions yet, and
the loop that feeds the analysis, applies decisions, and the CLI are to come.
"""
