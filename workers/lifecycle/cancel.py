"""The cancel check: a create whose owner took it back (``Job.cancel``, producer/control.py) ends here.

Called by the create steps at the points where a step is about to call the provider (the start of
every step, the moment before the create call) and right after the create call answered, so a VM
the provider made while the cancel landed has its id recorded and is destroyed by the job's
ordinary cleanup (``DestroySteps._cleanup``); a create cancelled before it sent anything never calls
the provider at all.
"""

from __future__ import annotations

from vmqueue.models import CleanupState, Job, JobState, utcnow
from workers.lifecycle.common import Next, Steps, log


class CancelSteps(Steps):
    """End a create job ``cancelled`` once its cancel was asked for."""

    def _cancelled(self, job: Job, count: int = 0) -> Next | None:
        """End ``job`` (which has ``cancel_pending``) ``cancelled``; a VM it has goes to the cleanup.

        A create that was submitting without a recorded instance id may have made a VM whose answer
        was lost (a crash mid-call): the sweeper finds it by its ownership labels.
        """
        has_vm = job.instance_id is not None and job.vm_destroyed_by is None
        # Always destroyed, whatever destroy_on_failure says: taking the request back means the VM too.
        cleanup = CleanupState.pending if has_vm else None
        asked = job.cancel
        job = self.store.transition(  # runs the hooks: reported
            job.id,
            JobState.cancelled,
            f"cancelled (asked by {asked.by} at {asked.at:%Y-%m-%d %H:%M:%S} UTC)"
            + (f"; destroying {job.instance_id}" if cleanup else ""),
            cleanup=cleanup,
            api_calls=job.api_calls + count,
            cancel=asked.model_copy(update={"reported_at": utcnow()}),
        )
        self.store.create_ended(job.id, vm_lives=False)
        self._unwatch(job)
        log.info("job=%s provider=%s cancelled by %s", job.id, job.provider, asked.by)
        return Next(0) if cleanup == CleanupState.pending else None

    def _report_cancel(self, job: Job) -> Job:
        """A job the producer cancelled while queued: run the transition hooks (webhook, metrics) here,
        in a worker, once (``CancelRequest.reported_at``)."""

        def reported(j: Job) -> None:
            fresh.clear()  # a retried compare-and-set runs this again on a fresher record
            if j.cancel is not None and j.cancel.reported_at is None:
                j.cancel = j.cancel.model_copy(update={"reported_at": utcnow()})
                fresh.append(j)

        fresh: list[Job] = []
        job = self.store.update(job.id, reported)
        if fresh:
            self.store.notify(job)
        return job
