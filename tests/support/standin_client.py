"""The tests' view of a running Dify stand-in: what it was asked, through its call log."""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests


@dataclass
class StandIn:
    url: str

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def calls(self) -> list[dict]:
        return requests.get(f"{self.root}/_standin/calls", timeout=5).json()

    def chats(self) -> list[dict]:
        return [c for c in self.calls() if c["path"] == "/v1/chat-messages"]

    def stops(self) -> list[dict]:
        return [c for c in self.calls() if c["path"].endswith("/stop")]

    def chat(self, key: str, knobs: dict, query: str = "hi") -> bytes:
        """Ask the stand-in directly, as the proxy would, and return its streamed body."""
        response = requests.post(
            f"{self.url}/chat-messages",
            json={
                "query": query,
                "inputs": {"_standin": knobs},
                "user": "direct",
                "response_mode": "streaming",
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.content

    def reset(self) -> None:
        requests.post(f"{self.root}/_standin/reset", timeout=5)

    def wait_for(self, predicate, seconds: float = 10) -> list[dict]:
        """Poll the call log until `predicate(calls)` holds; returns the calls."""
        deadline = time.monotonic() + seconds
        while True:
            calls = self.calls()
            if predicate(calls) or time.monotonic() > deadline:
                return calls
            time.sleep(0.05)
