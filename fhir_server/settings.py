"""The one settings object. Every value comes from a `CXR_` environment variable (or .env)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    ood_gate: bool | Literal["warn"] = Field(
        True, description="Refuse images that are not frontal chest X-rays (true); false: no gate; warn (issue 11): "
        "analyse them anyway and flag the result (legacy `warnings`, FHIR OperationOutcome warning + report note)"
    )
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
    # ---- schema migrations (issue 13)
    db_auto_upgrade: bool = Field(
        True, description="Run the database migrations at start-up (turn off where a `cxr db upgrade` job runs them, "
        "e.g. Kubernetes; a replica whose schema is behind then reports not ready)"
    )

    # ---- durable job queue (issue 13)
    queue_worker: bool = Field(True, description="Run queued jobs in this process (false: API only; run `cxr worker` elsewhere)")
    queue_lease_s: float = Field(60.0, gt=0, description="A running job's lease; a dead worker's jobs are resumed after it")
    queue_poll_s: float = Field(1.0, gt=0, description="How often an idle worker looks for new jobs")
    queue_shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, running jobs get this long to finish; the rest go back to the queue at once"
    )

    # ---- DICOM node: receiving studies from the PACS (issue 12)
    dicom_port: int | None = Field(
        None, ge=0, le=65535, description="Listen for DICOM (C-ECHO, C-STORE) on this port; unset = no DICOM listener"
    )
    dicom_host: str | None = Field(None, description="Address the DICOM listener binds (default: CXR_HOST)")
    dicom_ae_title: str = Field("CXR", min_length=1, max_length=16, description="Our AE title (Called AE)")
    dicom_allowed_aes: list[str] = Field(
        default_factory=list, description="Calling AE titles allowed to associate (empty = any); JSON list"
    )
    dicom_study_settle_s: float = Field(
        10.0, ge=0, description="A study is analysed once no instance has arrived for this many seconds"
    )
    dicom_max_instance_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Largest accepted instance; bigger ones are refused (0xA700)"
    )
    dicom_storage_dir: Path | None = Field(None, description="Where received instances are kept (default: <data_dir>/dicom)")
    # ---- DICOM / HL7 result delivery (issue 12)
    dicom_destination: str | None = Field(
        None, description="AE@host:port: C-STORE the SR and heatmap Secondary Captures of every analysed study here"
    )
    dicom_timeout_s: float = Field(30.0, gt=0, description="Association, DIMSE and network timeout when sending DICOM")
    dicomweb_stow_url: str | None = Field(
        None, description="DICOMweb base URL (.../dicom-web): STOW-RS the SR and SCs here; its host must be in fetch_allowed_hosts"
    )
    hl7_destination: str | None = Field(None, description="host:port: send an HL7 v2.5.1 ORU^R01 over MLLP per report")
    hl7_ack_timeout_s: float = Field(10.0, gt=0, description="How long to wait for the HL7 ACK before retrying")
    hl7_sending_application: str = Field("CXR-FHIR", description="MSH-3")
    hl7_sending_facility: str = Field("", description="MSH-4")
    hl7_receiving_application: str = Field("", description="MSH-5")
    hl7_receiving_facility: str = Field("", description="MSH-6")
    delivery_max_attempts: int = Field(
        500, ge=1, description="Attempts per destination before a delivery is marked failed (with back-off: days)"
    )
    delivery_backoff_s: float = Field(5.0, gt=0, description="First retry delay of a delivery; doubles per attempt")
    delivery_backoff_max_s: float = Field(600.0, gt=0, description="Longest delay between delivery attempts")

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
        None, description="Public URL of this server's token endpoint (POST /auth/token), the `aud` client assertions "
        "must carry; derived from the request when unset (set it behind a proxy)"
    )

    # ---- auth (issue 10): SMART Backend Services, rate limits, logs ----
    auth_dev_static_tokens: bool = Field(
        False, description="DEVELOPMENT ONLY: also accept the static CXR_AUTH_TOKENS map as bearer tokens (logged as such)"
    )
    auth_signing_key_file: Path | None = Field(
        None, description="Private JWK (EC P-384) that signs access tokens; generated on first use "
        "(default: <data_dir>/auth/signing-key.jwk)"
    )
    auth_token_lifetime_s: int = Field(300, ge=30, le=300, description="Lifetime of issued access tokens (at most 5 minutes)")
    auth_jku_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts a client's registered JWKS URL (jku) may be fetched from"
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per client id (per address when unauthenticated); 0 = no limit"
    )
    rate_limit_burst: int = Field(20, ge=1, description="Requests a client may send at once before the per-minute rate applies")
    rate_limit_storage_uri: str = Field(
        "memory://", description="`limits` storage: memory:// (per process) or e.g. redis://host:6379 (shared by workers)"
    )
    log_format: str = Field("json", pattern="^(json|text)$", description="`cxr serve` log lines: json (structured) or text")

    @property
    def signing_key_path(self) -> Path:
        return self.auth_signing_key_file or self.data_dir / "auth" / "signing-key.jwk"
    # ---- models (issue 11)
    models_base_url: str | None = Field(
        None, description="Where `cxr models pull` fetches release files (a mirror); default: the catalog's "
        "TorchXRayVision release URL",
    )
    lone_batch_all_cores: bool = Field(
        True, description="A batch that starts while every other inference worker idles runs its ONNX forward "
        "passes on all cores (single-request latency); concurrent batches use cores // workers each",
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
    def dicom_dir(self) -> Path:
        return self.dicom_storage_dir or self.data_dir / "dicom"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'cxr.sqlite3'}"
