"""Which adapters live on the device (model/adapters/policy.py), as pure bookkeeping: at most the
cap, least recently used out, never one a running image uses nor one an older waiting image is
owed, and a request nobody asks about any more lapses instead of holding the device."""

from __future__ import annotations

import pytest

from model.adapters import Plan, Residency


def serve(policy: Residency, names: tuple[str, ...], pinned: tuple[str, ...] = ()) -> list[Plan]:
    """An image asks for ``names``, their files are read, and an install pass runs."""
    assert not policy.ready(names)
    policy.want(names)
    return policy.plan(read=set(names), pinned=set(pinned))


def test_the_least_recently_used_adapter_leaves_first() -> None:
    policy = Residency(2)
    assert serve(policy, ("a",)) == [Plan(("a",), (), ("a",))]
    assert serve(policy, ("b",)) == [Plan(("b",), (), ("b",))]
    assert policy.ready(("a",))  # a is used again: b is now the least recent
    assert serve(policy, ("c",)) == [Plan(("c",), ("b",), ("c",))]
    assert policy.resident == ("a", "c")
    assert serve(policy, ("b", "d")) == [Plan(("b", "d"), ("a", "c"), ("b", "d"))]
    assert len(policy.resident) <= policy.cap


def test_an_adapter_in_use_is_never_evicted_and_the_request_waits() -> None:
    policy = Residency(1)
    serve(policy, ("a",))
    assert serve(policy, ("b",), pinned=("a",)) == []  # a's image still runs
    assert policy.resident == ("a",)
    assert policy.waiting
    assert not policy.ready(("b",))  # asked again: still owed
    assert policy.plan(read={"b"}, pinned=set()) == [Plan(("b",), ("a",), ("b",))]
    assert policy.ready(("b",))
    assert not policy.waiting


def test_a_set_is_installed_whole_once_all_its_files_are_read() -> None:
    policy = Residency(3)
    policy.want(("a", "b"))
    assert policy.plan(read={"a"}, pinned=set()) == []
    assert policy.resident == ()
    assert not policy.ready(("a", "b"))
    assert policy.plan(read={"a", "b"}, pinned=set()) == [Plan(("a", "b"), (), ("a", "b"))]


def test_older_requests_keep_what_they_are_owed() -> None:
    policy = Residency(1)
    policy.want(("a",))
    policy.want(("b",))
    # both read in the same pass: the older gets the only place, the younger waits (no thrashing)
    assert policy.plan(read={"a", "b"}, pinned=set()) == [Plan(("a",), (), ("a",))]
    assert policy.ready(("a",))  # its image is admitted: a is in use from now on
    assert not policy.ready(("b",))
    assert policy.plan(read={"b"}, pinned={"a"}) == []
    assert not policy.ready(("b",))
    assert policy.plan(read={"b"}, pinned=set()) == [Plan(("b",), ("a",), ("b",))]


def test_the_resident_part_of_an_older_set_stays_while_the_rest_is_read() -> None:
    policy = Residency(2)
    serve(policy, ("a",))
    serve(policy, ("x",))
    assert policy.ready(("a",)) and policy.ready(("x",))  # x is now the most recent
    policy.want(("a", "b"))  # b's file is still being read
    policy.want(("c",))
    assert policy.plan(read={"c"}, pinned=set()) == [Plan(("c",), ("x",), ("c",))]
    assert policy.resident == ("a", "c")


def test_a_request_nobody_asks_about_any_more_lapses() -> None:
    policy = Residency(1)
    serve(policy, ("a",))
    assert policy.ready(("a",))
    policy.want(("b",))  # its image is cancelled before its file is read
    assert policy.plan(read=set(), pinned=set()) == []
    assert policy.plan(read={"b"}, pinned=set()) == []  # not asked since the last pass: gone
    assert not policy.waiting
    assert policy.resident == ("a",)
    policy.want(("c",))  # and a lapsed request never blocks a younger one
    assert policy.plan(read={"c"}, pinned=set()) == [Plan(("c",), ("a",), ("c",))]


def test_a_failed_injection_is_forgotten() -> None:
    policy = Residency(2)
    serve(policy, ("a",))
    policy.forget("a")
    assert policy.resident == ()
    assert not policy.ready(("a",))


@pytest.mark.parametrize("cap", [0, -1])
def test_the_cap_holds_at_least_one(cap: int) -> None:
    with pytest.raises(ValueError, match="at least one adapter"):
        Residency(cap)


def test_a_set_larger_than_the_cap_never_evicts_anything() -> None:
    """The engine refuses such a request with 422 first; the policy alone does no harm either."""
    policy = Residency(1)
    serve(policy, ("a",))
    assert serve(policy, ("b", "c")) == []
    assert policy.resident == ("a",)
