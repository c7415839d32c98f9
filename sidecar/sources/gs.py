"""``gs://bucket/prefix``: Google Cloud Storage through its S3-compatible XML API.

Cloud Storage answers ListObjectsV2 (``list-type=2``) and ranged GETs at
``https://storage.googleapis.com/<bucket>`` (path-style) and accepts AWS SigV4 signatures
made with an HMAC key of a service account, so the S3 source does the work
(``sidecar.sources.s3.S3Source``); only where the bucket is and which keys sign differ.

Environment (its own names, so a pod that holds AWS keys for S3 never sends them to Google):

``GCS_ACCESS_KEY_ID``, ``GCS_SECRET_ACCESS_KEY``
    The HMAC key (access ID and secret). Without them requests are anonymous (public
    buckets).
``GCS_ENDPOINT_URL``
    Default ``https://storage.googleapis.com``; tests point it at an S3 stand-in.
``GCS_REGION``
    The SigV4 signing region; default ``auto``, which Cloud Storage accepts for any bucket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from botocore.credentials import Credentials

from sidecar.sources.s3 import S3Access, S3Source

DEFAULT_ENDPOINT: Final = "https://storage.googleapis.com"
DEFAULT_REGION: Final = "auto"
#: The environment variables this source reads (the webhook forwards these from the app).
ENV_VARS: Final = ("GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY", "GCS_ENDPOINT_URL", "GCS_REGION")


def gcs_access(bucket: str, env: Mapping[str, str] | None = None) -> S3Access:
    env = os.environ if env is None else env
    endpoint = (env.get("GCS_ENDPOINT_URL") or DEFAULT_ENDPOINT).rstrip("/")
    key_id = env.get("GCS_ACCESS_KEY_ID")
    secret = env.get("GCS_SECRET_ACCESS_KEY")
    return S3Access(
        f"{endpoint}/{bucket}",
        env.get("GCS_REGION") or DEFAULT_REGION,
        Credentials(key_id, secret) if key_id and secret else None,
        service="Cloud Storage",
        key_vars=("GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY"),
        session_var=None,
        permissions="grant their service account storage.objects.list and "
        "storage.objects.get on the bucket (roles/storage.objectViewer)",
    )


def open_gs(
    bucket: str, prefix: str, *, read_timeout: float, env: Mapping[str, str] | None = None
) -> S3Source:
    """Every object under ``gs://bucket/prefix``."""
    return S3Source(
        bucket, prefix, read_timeout=read_timeout, access=gcs_access(bucket, env), scheme="gs"
    )
