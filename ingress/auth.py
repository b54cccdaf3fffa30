"""Webhook URL tokens: each token maps to one project."""

from __future__ import annotations

import hmac


class TokenMap:
    def __init__(self, project_by_token: dict[str, str]) -> None:
        self._entries = [(token.encode(), project) for token, project in project_by_token.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def project_for(self, token: str) -> str | None:
        """The project of a token, compared in constant time against every known token."""
        candidate = token.encode()
        found = None
        for known, project in self._entries:
            if hmac.compare_digest(known, candidate):
                found = project
        return found
