"""The ``streamserve`` command: one command line over every package.

Each package contributes its subcommands (``register(subparsers)``); commands
whose package needs an extra that is not installed say which extra to install.
"""
