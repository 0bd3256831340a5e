"""Flower shows jobs, not only tasks: checked in a real headless Chromium (Debian's ``chromium``,
driven by Playwright) against a real Flower, the session's sim worker and Redis.

Three jobs: one runs, one fails for capacity (a full region), one fails its deadline (the VM boots
slower than the deadline allows). Flower's Failed filter lists exactly the two that failed, with
their error; a search by VM name, provider or error code finds them; the job that ran shows
``SUCCESS`` with its name and IP. Nothing of the startup script reaches Flower.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from bench.harness import sim_spec
from bench.probes import Flower, wait_for
from vmqueue.models import JobState

pytestmark = pytest.mark.system

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECRET = "MARKER-flower-never-shows-this"


@pytest.fixture
def flower(test_env, provisioner, tmp_path) -> Iterator[Flower]:
    server = Flower(test_env, tmp_path).wait_ready(60)
    try:
        server.wait_events(provisioner)  # probe jobs until its event receiver shows one
        yield server
    finally:
        server.stop()


def _rows(page) -> str:
    """The task table's text once DataTables has drawn it after the last action."""
    page.wait_for_selector("#tasks-table_processing", state="hidden")
    page.wait_for_timeout(400)  # the search box is debounced (300 ms)
    page.wait_for_selector("#tasks-table_processing", state="hidden")
    return page.inner_text("#tasks-table tbody")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_flower_lists_failed_jobs_and_finds_them_by_name_provider_and_error(
    sim_worker, provisioner, sim, ssh_key, flower, tmp_path
):
    from playwright.sync_api import sync_playwright

    sim.configure(boot_s=2, full_regions="sim-full")
    script = f"#!/bin/sh\necho {SECRET}\n"
    ran = provisioner.create_vm(sim_spec("fl-ran"), ssh_key, script)
    full = provisioner.create_vm(sim_spec("fl-full", region="sim-full"), ssh_key, script)
    late = provisioner.create_vm(sim_spec("fl-late"), ssh_key, script, deadline_s=0.5)
    jobs = {job.id: provisioner.wait(job.id, timeout_s=30) for job in (ran, full, late)}
    assert jobs[ran.id].state == JobState.running
    assert jobs[full.id].error.code == "capacity" and jobs[late.id].error.code == "deadline_exceeded"

    # Flower's own record of each job's task (its JSON API), once the final events arrived.
    def final() -> dict | None:
        tasks = flower.get("/api/tasks").json()
        mine = {i: tasks.get(i) for i in jobs}
        return mine if all(t and t["state"] in ("SUCCESS", "FAILURE") for t in mine.values()) else None

    tasks = wait_for(final, 20, "Flower shows each job's final state", 0.3)
    vm = jobs[ran.id].vm
    assert tasks[ran.id]["state"] == "SUCCESS" and tasks[ran.id]["result"] == f"running fl-ran {vm.public_ipv4}"
    assert tasks[full.id]["state"] == "FAILURE" and tasks[full.id]["exception"].startswith("capacity: ")
    assert tasks[late.id]["state"] == "FAILURE" and tasks[late.id]["exception"].startswith("deadline_exceeded: ")
    # The job that ran waited ~2 s for its VM, read by the batched tick every 0.3 s: no message of
    # its own per read (at most the one first read when no tick chain was alive yet), yet its row
    # ended SUCCESS when the VM ran. Polling itself, it would have retried about 5 times.
    assert tasks[ran.id]["retries"] <= 1

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(http_credentials={"username": flower.auth[0], "password": flower.auth[1]})
        page = context.new_page()
        page.goto(f"{flower.url}/tasks")
        page.click("button.task-state-filter[data-task-state='FAILURE']")  # Flower's "Failed" filter
        failed = _rows(page)
        page.screenshot(path=str(tmp_path / "flower-failed.png"), full_page=True)
        assert full.id in failed and late.id in failed and ran.id not in failed
        assert "capacity: " in failed and "deadline_exceeded: " in failed
        assert "create sim fl-full job=" in failed and "create sim fl-late job=" in failed  # retries keep args

        page.click("button.task-state-filter[data-task-state='']")  # All
        search = page.locator("#tasks-table_filter input")
        for query, expected, absent in (
            ("fl-full", {full.id}, {ran.id, late.id}),  # the VM's name
            ("capacity", {full.id}, {ran.id, late.id}),  # the error code
            ("deadline_exceeded", {late.id}, {ran.id, full.id}),
            ("fl-ran", {ran.id}, {full.id, late.id}),
            ("create sim", set(jobs), set()),  # kind and provider
        ):
            search.fill(query)
            shown = _rows(page)
            assert all(i in shown for i in expected) and not any(i in shown for i in absent), (query, shown)
        search.fill("fl-ran")
        assert f"running fl-ran {vm.public_ipv4}" in _rows(page) and "SUCCESS" in _rows(page)

        page.goto(f"{flower.url}/task/{full.id}")
        detail = page.inner_text("body")
        assert "FAILURE" in detail and "capacity: " in detail and "fl-full" in detail
        pages = [page.content()]
        page.goto(f"{flower.url}/tasks")
        pages.append(page.content())
        browser.close()
    assert not any(SECRET in text for text in [*pages, flower.get("/api/tasks").text])
