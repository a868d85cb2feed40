"""The serving core: the worker loop and what it ties together, and the supervisor.

Public names: :class:`Worker`, :class:`Batcher`, :class:`Supervisor`.
"""

from worker.batcher import Batcher
from worker.supervisor import Supervisor
from worker.worker import Worker

__all__ = ["Batcher", "Supervisor", "Worker"]
