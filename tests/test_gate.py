"""The watch's gate: evaluations share it, the supervisor closing a watch's descriptors
takes it alone; the last evaluation out wakes a waiting supervisor."""

from __future__ import annotations

import threading

from sessionguard.watchstate import Gate


def test_the_exclusive_holder_waits_for_every_shared_one_and_the_last_out_wakes_it() -> None:
    gate = Gate()
    inside = threading.Event()

    def close_descriptors() -> None:
        with gate.exclusive():
            inside.set()

    t = threading.Thread(target=close_descriptors)
    with gate.shared():
        with gate.shared():  # re-entrant: a restore that evaluates
            t.start()
            assert not inside.wait(0.2)
        assert not inside.wait(0.1)
    assert inside.wait(10), "the last shared holder out did not wake the waiting exclusive one"
    t.join(10)


def test_shared_holders_wait_while_the_exclusive_one_is_in() -> None:
    gate = Gate()
    held, release, evaluated = threading.Event(), threading.Event(), threading.Event()

    def close_descriptors() -> None:
        with gate.exclusive():
            held.set()
            release.wait(10)

    def evaluate() -> None:
        with gate.shared():
            evaluated.set()

    closer, evaluator = threading.Thread(target=close_descriptors), threading.Thread(target=evaluate)
    closer.start()
    assert held.wait(10)
    evaluator.start()
    assert not evaluated.wait(0.2)
    release.set()
    assert evaluated.wait(10)
    closer.join(10)
    evaluator.join(10)
    with gate.exclusive():  # nobody left inside: taken at once
        pass
