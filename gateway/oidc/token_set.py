"""The tokens one token response gave (authorization code or refresh grant), and their form
inside a session record. Pure: never imports aiohttp.web."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    id_token: str
    refresh_token: str | None = None
    expires_at: float | None = None
    issued_at: float | None = None  # when the token response came: expires_at - issued_at is
    # the lifetime the IdP granted (refresh timing depends on it)

    def to_dict(self) -> dict[str, object]:
        return {"access_token": self.access_token, "id_token": self.id_token,
                "refresh_token": self.refresh_token, "expires_at": self.expires_at,
                "issued_at": self.issued_at}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TokenSet:
        expires_at = data.get("expires_at")
        issued_at = data.get("issued_at")
        refresh = data.get("refresh_token")
        return cls(
            access_token=str(data["access_token"]),
            id_token=str(data["id_token"]),
            refresh_token=refresh if isinstance(refresh, str) else None,
            expires_at=float(expires_at) if isinstance(expires_at, int | float) else None,
            issued_at=float(issued_at) if isinstance(issued_at, int | float) else None,
        )
