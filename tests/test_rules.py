"""The pure rules as tables: loss, intent, "replaced", the restore candidate — and the counting they rest on."""

from __future__ import annotations

import json

import orjson
import pytest

from sessionguard import count as count_mod
from sessionguard.count import CountSpec, Parsed, decoded_messages, diff, message_key, parse
from sessionguard.naming import Version
from sessionguard.rules import (
    Identity,
    classify,
    intent_changed,
    is_loss,
    latest_change,
    loss_reason,
    most_messages,
    overtaken,
    replaced,
    restore_candidate,
)

KEY = CountSpec.parse("messages")


def doc(*msgs: object, **meta: object) -> Parsed:
    return parse(orjson.dumps({**meta, "messages": list(msgs)}), KEY)


def msg(i: int, text: str = "") -> dict[str, object]:
    return {"role": "user" if i % 2 == 0 else "assistant", "content": text or f"message {i}"}


def conv(n: int, *, first: str = "", last: str = "") -> Parsed:
    """n messages; *first*/*last* change the first/last message's text."""
    msgs = [msg(i) for i in range(n)]
    if n and first:
        msgs[0] = msg(0, first)
    if n and last:
        msgs[-1] = msg(n - 1, last)
    return doc(*msgs)


# -- loss and intent -------------------------------------------------------------------

@pytest.mark.parametrize(
    "before, after, exists, lost",
    [
        (10, 9, True, True),
        (10, 0, True, True),
        (10, 10, True, False),
        (10, 11, True, False),
        (0, 0, True, False),
        (10, None, True, True),  # unparseable now
        (10, 10, False, True),  # deleted
        (0, None, False, True),  # an empty session deleted: still a loss of the file
        (None, 0, True, False),  # nothing countable to lose
        (None, None, False, False),
    ],
)
def test_is_loss(before: int | None, after: int | None, exists: bool, lost: bool) -> None:
    assert is_loss(before, after, exists=exists) is lost


@pytest.mark.parametrize("after, exists, reason", [(3, True, "shrink"), (0, True, "shrink"),
                                                   (None, True, "unparseable"), (None, False, "deleted"),
                                                   (5, False, "deleted")])
def test_loss_reason(after: int | None, exists: bool, reason: str) -> None:
    assert loss_reason(after, exists=exists) == reason


@pytest.mark.parametrize(
    "new, cls",
    [
        (None, "deleted"),
        (Parsed(None, "invalid JSON"), "unparseable"),
        (conv(0), "wipe"),
        (conv(2), "truncate"),
        (conv(2, first="other"), "rewrite"),
        (doc(msg(1), msg(2)), "rewrite"),
    ],
)
def test_classify(new: Parsed | None, cls: str) -> None:
    assert classify(conv(3), new) == cls


@pytest.mark.parametrize(
    "old, new, keys, changed",
    [
        ({"g": "a"}, {"g": "b"}, ("g",), True),
        ({}, {"g": "b"}, ("g",), True),  # first marker ever written
        ({"g": "a"}, {"g": "a"}, ("g",), False),
        ({"g": "a"}, {}, ("g",), False),  # a metadata-only save that dropped the key: not a marker
        ({"g": "a", "h": 1}, {"g": "a", "h": 2}, ("g", "h"), True),
        ({"g": "a"}, {"g": "b"}, (), False),
        ([1], {"g": "b"}, ("g",), False),
        ({"g": "a"}, None, ("g",), False),
    ],
)
def test_intent_changed(old: object, new: object, keys: tuple[str, ...], changed: bool) -> None:
    assert intent_changed(old, new, keys) is changed


# -- "replaced": O(1) content check of a write that kept or grew the count ----------------

@pytest.mark.parametrize(
    "new, is_replaced",
    [
        (conv(5), False),  # the same
        (conv(5, last="streaming more"), False),  # streaming rewrite of the LAST message
        (conv(6), False),  # appended
        (conv(6, last="streaming"), False),  # appended, the new last still streaming
        (conv(5, first="another conversation"), True),  # a changed first message
        (doc(*[msg(i) for i in range(3)], msg(3, "edited"), msg(4)), True),  # the one before the pinned last
        (doc(*[msg(i) for i in range(3)], msg(3, "edited"), msg(4), msg(5)), True),
        (doc(*[msg(i + 100) for i in range(8)]), True),  # another session saved over this one
        (conv(4), False),  # fewer: a loss, which is another rule's business
        (conv(4, first="other"), False),
        (conv(0), False),
        (Parsed(None, "bad"), False),
    ],
)
def test_replaced(new: Parsed, is_replaced: bool) -> None:
    pinned = Identity.of(conv(5))
    assert pinned is not None and pinned.count == 5
    assert replaced(pinned, new) is is_replaced
    ident = Identity.of(new)  # the daemon passes the key of the new first message it has taken
    if ident is not None:
        assert replaced(pinned, new, ident.first) is is_replaced
    if ident is not None and ident.count >= 5:  # the key given is the one compared, not recomputed
        assert replaced(pinned, new, pinned.first ^ 1) is True


def test_identity_of_short_and_unparseable_sessions() -> None:
    assert Identity.of(Parsed(None, "bad")) is None
    empty = Identity.of(conv(0))
    assert empty == Identity(0, 0, 0)
    assert empty is not None and not replaced(empty, conv(3, first="anything"))  # nothing was pinned to lose
    one = Identity.of(conv(1))
    assert one is not None and one.prev == 0
    assert not replaced(one, conv(2))
    # a one-message pin's only message may still be streaming: rewriting it is no replacement
    assert not replaced(one, doc(msg(9), msg(1)))


def test_identity_ignores_key_order_but_not_content() -> None:
    """Two writers that order a message's keys differently write the same conversation."""
    a = parse(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', KEY)
    b = parse(b'{"messages": [{"content": "hi", "role": "user"}, {"content": "yo", "role": "assistant"}]}', KEY)
    ident = Identity.of(a)
    assert ident is not None and ident == Identity.of(b) and not replaced(ident, b)
    c = parse(b'{"messages": [{"content": "hi!", "role": "user"}, {"content": "yo", "role": "assistant"}]}', KEY)
    assert replaced(ident, c)


@pytest.mark.parametrize(
    "new, over",
    [
        (conv(5), False),
        (conv(7), False),  # grew and still starts with every old message
        (conv(7, first="x"), True),  # grew, but messages were dropped or changed unseen
        (doc(*[msg(i) for i in range(5) if i != 2], msg(5), msg(6)), True),
        (conv(5, last="streamed"), True),  # a full comparison: even the last message counts
        (Parsed(None, "bad"), False),
    ],
)
def test_overtaken(new: Parsed, over: bool) -> None:
    assert overtaken(conv(5), new) is over
    assert not overtaken(conv(0), new)


# -- which version "restore" means ------------------------------------------------------

def v(t: float, count: int | None, reason: str, name: str = "") -> Version:
    return Version(name or f"{t:016.0f}", "s", t, count, 100, reason, "daemon", "copy", name or f"v{t}.version")


UNDO_THEN_WIPE = [v(1, 1000, "intended"), v(2, 998, "shrink")]


@pytest.mark.parametrize(
    "versions, expected",
    [
        ([], None),
        ([v(1, 1000, "shrink")], 1),
        (UNDO_THEN_WIPE, 2),  # the post-undo state, never the 1000 the user undid
        ([v(1, 1000, "shrink"), v(2, 998, "intended")], None),  # the last change was meant
        ([v(1, 1000, "shrink"), v(2, 0, "pre-restore")], 1),  # a restore in between
        ([v(1, 1000, "shrink"), v(2, 0, "pre-restore"), v(3, 1000, "intended"), v(4, 5, "shrink")], 4),
        ([v(1, 10, "shrink"), v(2, None, "unparseable")], 1),  # unparseable content is never picked
        ([v(1, None, "deleted")], None),
        ([v(1, 7, "deleted")], 1),
        ([v(1, 7, "replaced"), v(2, 3, "shrink")], 2),
        ([v(1, 7, "shrink"), v(2, 9, "pre-restore")], 1),  # pre-restore content is not a loss
        ([v(1, 7, "pre-restore")], None),
        ([v(1, 1000, "shrink"), v(2, 998, "intended"), v(3, 0, "pre-restore")], None),  # a loss before the intent
        ([v(1, 5, "intended"), v(1, 6, "shrink", "b.version")], None),  # same second as the intent: newest wins
    ],
)
def test_restore_candidate(versions: list[Version], expected: float | None) -> None:
    got = restore_candidate(versions)
    assert (got.created if got else None) == expected
    assert restore_candidate(list(reversed(versions))) == got  # order of the listing does not matter


def test_most_messages_and_latest_change() -> None:
    vs = [v(1, 1000, "intended"), v(2, 998, "shrink"), v(3, 1000, "pre-restore"), v(4, None, "unparseable")]
    best = most_messages(vs)
    assert best is not None and best.created == 3  # the most, then the newest
    last = latest_change(vs)
    assert last is not None and last.created == 4
    assert most_messages([v(1, None, "deleted")]) is None
    assert latest_change([]) is None


# -- counting what servers write ------------------------------------------------------------

LENIENT = [
    (b'{"messages": [{"v": NaN}, {"v": Infinity}, {"v": -Infinity}]}', 3),  # Python's json.dump default
    (b'{"messages": [{"content": "\\ud800 lone"}, {"content": "ok"}]}', 2),  # json.dumps / JSON.stringify
    (b'\xef\xbb\xbf{"messages": [{"content": "bom"}]}', 1),  # an editor's UTF-8 BOM
    (b'\xef\xbb\xbf{"messages": [{"v": NaN, "c": "\\udfff"}]}', 1),
]


@pytest.mark.parametrize("data, n", LENIENT)
def test_what_orjson_refuses_is_counted_like_the_server_reads_it(data: bytes, n: int) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data)
    parsed = parse(data, KEY)
    assert parsed.ok and parsed.count == n
    keys = [message_key(m) for m in parsed.messages or []]
    assert all(isinstance(k, int) and 0 <= k < 2**64 for k in keys)
    assert keys == [message_key(m) for m in json.loads(data.decode("utf-8-sig"))["messages"]]
    assert decoded_messages(data, KEY) == parsed.messages
    assert Identity.of(parsed) is not None


def test_non_finite_numbers_are_part_of_a_message_identity() -> None:
    """orjson writes NaN and ±Infinity as null; a lenient parse (the only one that can hold
    them) is identified through the standard library, which keeps them apart."""
    parsed = parse(LENIENT[0][0], KEY)
    assert parsed.messages is not None and parsed.lenient
    keys = {message_key(m, lenient=True) for m in [*parsed.messages, {"v": None}]}
    assert len(keys) == 4
    assert not parse(b'{"messages": [{"v": null}]}', KEY).lenient, "orjson-valid files keep the fast path"


def test_message_keys_are_the_values_pins_cache_holds() -> None:
    """Message keys outlive the process (``pins.cache`` keeps them across restarts, scan
    children compute them too): the same message keys alike everywhere, whatever order
    its writer gave its keys. A change that moves these values costs every session a pin
    read at its first write after the upgrade (``test_a_cache_with_message_keys_of_the_
    hash_before_costs_reads_not_versions``): make it on purpose, not by accident."""
    assert message_key({"role": "user", "content": "héllo"}) == 146924004021
    assert message_key({"content": "héllo", "role": "user"}) == 146924004021  # key order is the writer's
    assert message_key(b'  {"a": 1}\n') == 38581407383  # a JSONL line, as read
    assert message_key({"v": float("nan")}, lenient=True) == 44653209154
    assert message_key({"v": None}) == 43118144185


def test_the_message_diff_compares_content_not_keys() -> None:
    """An admin's diff counts duplicates, ignores key order, keeps NaN apart from null, and
    tells apart two messages whose keys collide (a pair of one length and one CRC-32, found
    by search: the key's documented once-in-2**32 chance)."""
    a, b = {"content": "NqLqaUORi0BD"}, {"content": "trmmxHpkSCs6"}
    assert message_key(a) == message_key(b)
    assert diff([a], [b]).missing == [(0, a)]
    version = [{"r": "u", "c": "hi"}, {"r": "u", "c": "hi"}, {"v": float("nan")}, {"c": "gone"}]
    live = [{"c": "hi", "r": "u"}, {"v": None}, {"c": "new"}]
    result = diff(version, live)
    assert result.missing == [(1, version[1]), (2, version[2]), (3, version[3])]
    assert result.added_count == 2


def test_lone_surrogate_messages_have_distinct_stable_keys() -> None:
    a = parse(b'{"messages": [{"c": "\\ud800"}, {"c": "\\ud801"}]}', KEY).messages
    assert a is not None and message_key(a[0]) != message_key(a[1])
    assert message_key(a[0]) == message_key({"c": "\ud800"})


def test_orjson_valid_files_never_take_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = json.loads

    def counting(text: str, *a: object, **kw: object) -> object:
        calls.append(text)
        return real(text, *a, **kw)

    monkeypatch.setattr(count_mod.json, "loads", counting)
    for data in (b'{"messages": [{"v": 1.5}, {"c": "\\ud83d\\ude00"}]}', b'{"messages": []}', b"{}"):
        assert parse(data, KEY).ok
    assert calls == []
    assert parse(LENIENT[0][0], KEY).count == 3
    assert len(calls) == 1  # the counter does see the fallback when it is taken
    assert not parse(b'{"messages": [1, 2', KEY).ok  # invalid for both: refused, never raised
    assert not parse(b"\xef\xbb\xbf", KEY).ok
