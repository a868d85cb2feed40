"""Logging set-up for every streamserve process (the CLI and each supervised worker)."""

from __future__ import annotations

import logging

OUR_PACKAGES = ("protocol", "producer", "registry", "experiments", "worker", "lab", "modeltools",
                "streamserve")


def configure_logging(verbose: bool) -> None:
    """Our packages at INFO (DEBUG with -v); third-party libraries only at WARNING."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
