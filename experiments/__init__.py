"""Experiments between model versions.

Built so far: the statistics engine (``experiments.stats``) and its validation
(``python -m experiments.validate``, ``make validate-stats``). Experiment state,
traffic assignment, outcomes and the worker integration are still to come.
"""
