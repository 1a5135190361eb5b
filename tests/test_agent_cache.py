"""escrow.agent_cache: agents remembered by external id for naming escrow parties."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.errors import AgentNotFound
from escrowd.models import Agent


def _loader(known: dict[str, int], calls: list[str]) -> Callable[[str], Agent]:
    def load(external_id: str) -> Agent:
        calls.append(external_id)
        if external_id not in known:
            raise AgentNotFound(f"no agent {external_id!r}")
        return Agent(id=known[external_id], external_id=external_id, name=None)

    return load


def test_an_agent_is_loaded_once_and_its_external_id_found_by_id() -> None:
    cache, calls = AgentCache(), list[str]()
    load = _loader({"alice": 7}, calls)
    assert cache.external_id(7) is None
    first = cache.get("alice", load)
    assert cache.get("alice", load) is first
    assert calls == ["alice"]
    assert cache.external_id(7) == "alice"


def test_an_unknown_agent_is_not_remembered() -> None:
    cache, calls = AgentCache(), list[str]()
    known: dict[str, int] = {}
    load = _loader(known, calls)
    with pytest.raises(AgentNotFound):
        cache.get("dave", load)
    known["dave"] = 3
    assert cache.get("dave", load).id == 3
    assert calls == ["dave", "dave"]


def test_a_full_cache_starts_over() -> None:
    cache, calls = AgentCache(size=2), list[str]()
    load = _loader({"a": 1, "b": 2, "c": 3}, calls)
    for name in ("a", "b", "c", "a"):
        cache.get(name, load)
    # "c" found the cache full and emptied it, so "a" was loaded again.
    assert calls == ["a", "b", "c", "a"]
    assert cache.external_id(2) is None
    assert (cache.external_id(1), cache.external_id(3)) == ("a", "c")
