"""The get step: one read of one VM."""

from __future__ import annotations

from vmqueue.models import Job, JobState, Phase
from workers.calls import ProviderCalls
from workers.lifecycle.common import Next, Steps
from workers.providers.errors import ProviderError


class GetSteps(Steps):
    """A get job: one read, then ``done``."""

    def _get(self, job: Job) -> Next | None:
        if job.state != JobState.queued:
            return None
        calls = ProviderCalls(job.provider, self.limit, self.settings)
        try:
            vm = calls(self.providers(job.provider).get_vm, job.instance_id)
        except ProviderError as exc:
            return self._call_failed(job, exc, calls.count, Phase.get)
        self.store.transition(
            job.id, JobState.done, f"status {vm.status}", vm=vm, api_calls=job.api_calls + calls.count
        )
        return None
