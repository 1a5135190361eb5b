"""Agents by external id, remembered by the process that looked them up.

An agent's id and external id never change once registered, and agents are never removed,
so one looked up stays valid for naming the parties of escrow work. Its display name can be
given again (register_agent), so a remembered agent's name is not to be shown.
"""

from __future__ import annotations

from collections.abc import Callable

from escrowd.models import Agent

AGENT_CACHE_SIZE = 10_000


class AgentCache:
    """Bounded, so a long-lived process does not grow: when full it starts over. Shared by
    threads: each lookup reads or replaces whole entries."""

    def __init__(self, size: int = AGENT_CACHE_SIZE) -> None:
        self._size = size
        self._by_external_id: dict[str, Agent] = {}
        self._external_ids: dict[int, str] = {}

    def get(self, external_id: str, load: Callable[[str], Agent]) -> Agent:
        """The agent, loaded with `load` (a detached, loaded Agent, or AgentNotFound) the
        first time."""
        agent = self._by_external_id.get(external_id)
        if agent is None:
            agent = load(external_id)
            if len(self._by_external_id) >= self._size:
                self._by_external_id.clear()
                self._external_ids.clear()
            self._by_external_id[external_id] = agent
            self._external_ids[agent.id] = agent.external_id
        return agent

    def external_id(self, agent_id: int) -> str | None:
        """The external id of an agent this cache has loaded, else None."""
        return self._external_ids.get(agent_id)
