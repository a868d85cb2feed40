"""Bridges between streamserve's registry and other model registries (MLflow: ``streamserve[mlflow]``).

Nothing here is imported by the serving path: the worker image installs neither this
package's extra nor MLflow.
"""
