"""The one settings object. Every value comes from a `CXR_` environment variable (or .env)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", extra="ignore")

    # Model
    model: str = Field("cxr:pneumonia-v1", description="Registry name of the model to serve")
    weights_dir: Path = Field(
        Path("~/.cxr/weights").expanduser(),
        description="Where TorchXRayVision weight files are looked up (never downloaded at run time)",
    )
    ood_gate: bool = Field(True, description="Refuse images that are not frontal chest X-rays")
    heatmap_top_k: int = Field(3, ge=1, le=18, description="Heatmaps for at most this many findings")

    # Input limits
    max_upload_bytes: int = Field(64 * 1024 * 1024, description="Largest accepted request body / image")
    max_pixels: int = Field(50_000_000, description="Largest accepted image (width x height)")

    # Server
    host: str = "127.0.0.1"
    port: int = 8000
    base_url: str | None = Field(None, description="Public FHIR base URL; derived from the request when unset")
    inference_workers: int = Field(1, ge=1, description="Concurrent inference jobs")

    # Storage
    data_dir: Path = Field(Path("~/.cxr/data").expanduser(), description="SQLite file and job data live here")
    database_url: str | None = Field(None, description="e.g. postgresql+psycopg://user:pw@host/db; SQLite when unset")

    # Fetching images by URL / DICOMweb
    fetch_allowed_hosts: list[str] = Field(default_factory=list, description="Hosts Media.content.url and DICOMweb may reach")
    fetch_timeout_s: float = 10.0
    fetch_max_bytes: int = 64 * 1024 * 1024

    # Authentication
    auth_enabled: bool = False
    auth_tokens: dict[str, str] = Field(
        default_factory=dict, description='JSON map of bearer token -> space-separated SMART scopes'
    )
    oauth_token_url: str | None = Field(
        None, description="Token endpoint of the authorization server issuing the bearer tokens (published in /fhir/metadata and /.well-known/smart-configuration)"
    )

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'cxr.sqlite3'}"
