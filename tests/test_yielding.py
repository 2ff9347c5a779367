"""worker.runtime.yielding: the rules by which background work gives way inside a worker
(the whole behaviour, on a real stack, is in tests/test_priorities.py)."""

from __future__ import annotations

import threading
import time

from shared.protocol import ChatMessage, Job, TextPart
from worker.runtime.yielding import WorkClasses


def _job(job_id: str, *, background: bool = False, yields_for_s: float = 60.0) -> Job:
    now = time.time()
    return Job(
        job_id=job_id,
        model="m",
        messages=[ChatMessage(role="user", content=[TextPart(text="q")])],
        enqueued_at=now,
        start_deadline=now + 60,
        priority="background" if background else "interactive",
        yields_until=now + yields_for_s if background else None,
    )


def test_background_intake_closes_while_interactive_work_runs_and_when_its_slots_are_full() -> None:
    classes = WorkClasses(background_slots=1)
    assert classes.accepts_background()
    clinician, title = _job("interactive-1"), _job("background-1", background=True)
    assert classes.try_start(clinician)
    assert not classes.accepts_background()
    assert not classes.try_start(title)  # delivered anyway: refused, nothing counted
    classes.ended(clinician)
    assert classes.try_start(title)
    assert not classes.accepts_background()  # its one slot is taken
    assert not classes.try_start(_job("background-2", background=True))
    colleague = _job("interactive-2")
    assert classes.try_start(colleague)  # interactive work always is taken
    for job in (title, colleague):
        classes.ended(job)
    assert classes.accepts_background() and classes.running == 0


def test_promoted_background_work_goes_beside_clinicians_but_only_in_its_slots() -> None:
    classes = WorkClasses(background_slots=1)
    clinician = _job("interactive-1")
    assert classes.try_start(clinician)
    promoted = _job("background-1", background=True).model_copy(update={"promoted": True})
    late = _job("background-2", background=True).model_copy(update={"yields_until": 0.0})
    assert not classes.accepts_background() and classes.accepts_promoted()
    assert not classes.try_start(late)  # not promoted (a copy left in line): it still waits
    assert classes.try_start(promoted)  # beside the clinician, into the background slot
    assert not classes.accepts_promoted()  # which is now taken
    again = _job("background-3", background=True).model_copy(update={"promoted": True})
    assert not classes.try_start(again)
    assert classes.try_start(_job("interactive-2"))  # clinicians still find room
    assert classes.must_yield(promoted)  # running, it still pauses for them, up to its share


def test_background_work_pauses_while_interactive_work_runs_for_its_share_in_all() -> None:
    now = [1000.0]
    classes = WorkClasses(background_slots=2, clock=lambda: now[0])
    title = _job("background-1", background=True, yields_for_s=10.0)  # its share: 10 s
    assert classes.try_start(title)
    assert not classes.must_yield(title)  # nobody to give way to
    clinician = _job("interactive-1")
    assert classes.try_start(clinician)
    assert classes.must_yield(title) and not classes.must_yield(clinician)

    def pause() -> threading.Event:
        resumed = threading.Event()

        def paused() -> None:
            classes.wait_for_room(title, stopped=lambda: False)
            resumed.set()

        threading.Thread(target=paused).start()
        return resumed

    first = pause()
    assert not first.wait(0.3)  # held while the clinician's job runs
    now[0] += 6
    assert not first.wait(0.5)  # 6 s of its 10
    classes.ended(clinician)
    assert first.wait(5)  # no interactive work left: it resumes
    colleague = _job("interactive-2")
    assert classes.try_start(colleague)
    assert classes.must_yield(title)
    second = pause()
    assert not second.wait(0.3)
    now[0] += 5  # 11 s paused in all: its share is spent
    assert second.wait(5)
    assert not classes.must_yield(title)  # it runs beside the clinician now: nothing starves


def test_an_interactive_job_goes_ahead_of_the_batch_only_when_everyone_else_pauses_for_it() -> None:
    classes = WorkClasses(background_slots=2)
    clinician = _job("interactive-1")
    assert classes.try_start(clinician)
    assert not classes.others_yield(clinician)  # alone here anyway: nobody to go ahead of
    classes.ended(clinician)
    title, tags = _job("background-1", background=True), _job("background-2", background=True)
    assert classes.try_start(title) and classes.try_start(tags)
    assert classes.try_start(clinician)
    assert classes.others_yield(clinician)  # both pause for it: it decodes alone
    assert not classes.others_yield(title)  # background work never goes ahead
    colleague = _job("interactive-2")
    assert classes.try_start(colleague)
    assert not classes.others_yield(colleague)  # another clinician's job does not pause
    classes.ended(colleague)
    classes.ended(tags)
    late = _job("background-3", background=True, yields_for_s=0.0)  # no share: never pauses
    assert classes.try_start(late.model_copy(update={"promoted": True}))
    assert not classes.others_yield(clinician)
    for job in (clinician, title, late):
        classes.ended(job)
    assert classes.running == 0 and not classes.others_yield(_job("interactive-3"))
