"""`pipeline serve`'s configuration: a read-only web app over an extract output and what sits beside it."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator

from pipeline.config import MAX_BYTES, MAX_PIXELS, ConfigError, StrictModel

LOOPBACK_NAMES = ("localhost",)
TOKEN_ENV = "PIPELINE_SERVE_TOKEN"  # the CLI's default --token


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds the loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeConfig(StrictModel):
    """`pipeline serve OUTPUT`: search, duplicates, clusters, probe and heads, runs of one extract output.

    ``index``/``dedup``/``probe``/``head`` default to the folders found beside OUTPUT (``OUTPUT-index`` or
    ``OUTPUT/index``, and so on); ``source_map`` rewrites the start of the ``source`` URIs the table records
    (``{"s3://bucket/photos": "/data/photos"}``) when the images moved after extraction.
    """

    output: str = Field(description="an extract OUTPUT (local or s3://)")
    index: str | None = Field(None, description="an index folder (default: OUTPUT-index or OUTPUT/index when "
                              "one is there; else exact search over the table)")
    dedup: str | None = Field(None, description="a dedup output (default: OUTPUT-dedup or OUTPUT/dedup)")
    probe: str | None = Field(None, description="a probe output with probe.json (default: OUTPUT-probe)")
    head: str | None = Field(None, description="a head folder with head.json (default: OUTPUT/head or "
                             "OUTPUT-head)")
    host: str = Field("127.0.0.1", description="address to bind; other than loopback needs a token")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    token: str | None = Field(None, description="required on every request (Authorization: Bearer T, or "
                              "?token=T once per browser); also from PIPELINE_SERVE_TOKEN")
    source_map: dict[str, str] = Field(default_factory=dict, description="prefix rewrites of recorded "
                                       "source URIs, old -> new")
    k: int = Field(12, ge=1, le=200, description="neighbours per search (the page may ask for up to 200)")
    max_bytes: int = Field(MAX_BYTES, ge=1, description="largest upload, in bytes (as source.max_bytes)")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="largest upload, in pixels (as runtime.max_pixels)")
    thumbnail_px: int = Field(192, ge=32, le=1024, description="longest side of a thumbnail")
    cache_thumbnails: int = Field(4096, ge=0, description="thumbnails kept in memory")

    @field_validator("token")
    @classmethod
    def _token_length(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 16:
            raise ValueError("the token must be at least 16 characters: e.g. `python -c \"import secrets; "
                             "print(secrets.token_urlsafe())\"`")
        return v

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ServeConfig:
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(f"--host {self.host} exposes the page beyond this machine: give --token T (or "
                              "PIPELINE_SERVE_TOKEN), or keep the default --host 127.0.0.1")
        return self
