"""The job lifecycle as named steps the tasks call; see ``runner.JobRunner``."""

from workers.lifecycle.common import Next
from workers.lifecycle.runner import JobRunner

__all__ = ["JobRunner", "Next"]
