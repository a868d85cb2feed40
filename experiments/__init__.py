"""Experiments between model versions.

``store`` (experiment state), ``assignment`` (sticky split by unit), ``outcomes``
(the bots' reports, untrusted), ``data`` (one row per exposure), ``summary`` (what
an analysis at time t may read: matured outcomes per cluster and arm), ``stats``
(cluster-robust effects, always-valid sequences, the group-sequential design),
``analysis`` (the decision), ``replay`` and ``simulate`` (the same decision on a
table, offline), ``runner`` (the decision on the journal in Redis, the audit
trail), ``validate`` (``make validate-stats``), ``cli``.
"""
