"""Experiment tracking at the edge of the system: training code talks to a `RunLogger`,
never to MLflow directly, so the same loop runs tracked (rank 0) or silent (other ranks, tests)."""

from uhg.tracking.logger import NullLogger, RunLogger

__all__ = ["NullLogger", "RunLogger"]
