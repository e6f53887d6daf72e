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
    inference_workers: int = Field(
        0, ge=0, description="Concurrent inference workers (0 = one per core); each gets cores // workers threads "
        "(measured on 2 cores: 2 workers x 1 thread serve 1.4-1.7x more than 1 x 2 at 8 clients)"
    )
    inference_queue: int | None = Field(
        None, ge=0, description="Analyses that may wait beyond the running ones before 503 + Retry-After "
        "(default: max(4 x workers, 2 x workers x batch size))"
    )
    batch_max_size: int = Field(8, ge=1, le=64, description="Most requests sharing one forward pass")
    batch_max_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="Longest a request waits for others to share its forward pass"
    )
    engine: str = Field(
        "onnx", pattern="^(torch|onnx)$",
        description="Inference engine: onnx (ONNX Runtime, exported once and checked against torch; falls back "
        "to torch when the check fails) or torch",
    )
    precision: str = Field(
        "fp32", pattern="^(fp32|int8)$",
        description="int8: the ONNX model quantized and validated by `cxr quantize` (AUROC drop <= 0.005); "
        "fp32 is served when no accepted int8 model exists",
    )
    engine_cache_dir: Path | None = Field(
        None, description="Where exported ONNX models are cached (default: <data_dir>/onnx-cache)"
    )

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

    # ---- request shape limits (issue 10: bodies checked before any model is built) ----------------
    json_max_depth: int = Field(64, ge=2, description="Deepest JSON nesting a request body may have (400 beyond)")
    json_max_elements: int = Field(200_000, ge=1, description="Most JSON values (objects, arrays, leaves) in one request body (413 beyond)")
    json_max_string_length: int = Field(
        1_048_576, ge=1, description="Longest JSON string in a request body, base64 `data` excepted (FHIR's own 1 MB bound; 413 beyond)"
    )
    bundle_max_entries: int = Field(1_000, ge=1, description="Most entries in a transaction / batch Bundle (413 beyond)")

    @property
    def onnx_cache_dir(self) -> Path:
        return self.engine_cache_dir or self.data_dir / "onnx-cache"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'cxr.sqlite3'}"
