"""Database tables of the authorization server: registered clients and the assertion ids seen.

Both live in the FHIR database (SQLite or PostgreSQL) so every server process shares them: a
client registered with `cxr clients add` is known to all workers at once, and an assertion
replayed to another worker is still refused.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Text
from sqlmodel import Field, SQLModel


class OAuthClient(SQLModel, table=True):
    """A SMART Backend Services client (client-confidential-asymmetric)."""

    __tablename__ = "oauth_client"

    client_id: str = Field(primary_key=True, max_length=255)
    # Exactly one of jwks (inline JSON Web Key Set, public keys only) or jwks_url (fetched, allowlisted).
    jwks: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    jwks_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    scopes: str = Field(sa_column=Column(Text, nullable=False))  # space-separated, the most it may be granted
    created: int = Field(sa_column=Column(BigInteger, nullable=False))  # epoch seconds


class SeenAssertion(SQLModel, table=True):
    """A client assertion's `jti`, kept until the assertion expires (after that its exp refuses it)."""

    __tablename__ = "oauth_seen_jti"
    __table_args__ = (Index("ix_oauth_seen_jti_expires", "expires_at"),)

    # sha256(client_id NUL jti): fixed length whatever the client sends, and unique per client
    key: str = Field(primary_key=True, max_length=64)
    expires_at: int = Field(sa_column=Column(BigInteger, nullable=False))


AUTH_TABLES = [OAuthClient.__table__, SeenAssertion.__table__]
