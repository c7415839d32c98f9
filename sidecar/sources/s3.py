"""``s3://bucket/prefix``: ListObjectsV2 (paginated) and ranged GetObject over aiohttp.

Requests are signed with botocore's own SigV4 signer (``botocore.auth.S3SigV4Auth``) rather
than a hand-written one: the canonical-request rules are subtle and botocore is already a
dependency. No boto3 client: aiohttp gives us streaming ranged reads on the same event loop
as every other source.

Environment (the standard AWS names): ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
(custom endpoints use path-style addressing), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``
(default ``us-east-1``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``. Without keys, requests are anonymous (public buckets).

``gs://`` sources reuse this class with Cloud Storage's endpoint and HMAC keys
(``sidecar.sources.gs``): the class takes an :class:`S3Access` instead of reading the AWS
variables, and list responses are read whatever their XML namespace (Cloud Storage answers
in its own).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from sidecar.layout import UnsafePathError, safe_relpath
from sidecar.sources import (
    RemoteFile,
    SourceAccessError,
    SourceError,
    SourceForbiddenError,
    SourceNotFoundError,
    SourceUnauthorizedError,
)
from sidecar.sources._http import HttpClient

#: S3 error codes that mean "these credentials are wrong", whatever the HTTP status.
_BAD_CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
)


def _q(value: str, safe: str = "-_.~") -> str:
    return quote(value, safe=safe)


@dataclass(frozen=True)
class S3Access:
    """Where a bucket is, how requests to it are signed, and what error advice names."""

    base: str  # the bucket's URL, no trailing slash
    region: str
    credentials: Credentials | None
    service: str = "S3"
    #: the variables the keys come from, as error messages name them
    key_vars: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    session_var: str | None = "AWS_SESSION_TOKEN"
    #: what a valid key needs to be granted to read a model
    permissions: str = "allow s3:ListBucket and s3:GetObject for them in the IAM or bucket policy"


def aws_access(bucket: str, env: Mapping[str, str] | None = None) -> S3Access:
    """The bucket on AWS S3 (or ``AWS_ENDPOINT_URL*``), keys from the ``AWS_*`` variables of
    ``env`` (default ``os.environ``; the node plugin passes each pod's own)."""
    env = os.environ if env is None else env
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        base = f"{endpoint.rstrip('/')}/{bucket}"
    elif "." in bucket:
        # dotted bucket names break virtual-host TLS certificates: path-style instead
        base = f"https://s3.{region}.amazonaws.com/{bucket}"
    else:
        base = f"https://{bucket}.s3.{region}.amazonaws.com"
    key_id = env.get("AWS_ACCESS_KEY_ID")
    secret = env.get("AWS_SECRET_ACCESS_KEY")
    creds = Credentials(key_id, secret, env.get("AWS_SESSION_TOKEN")) if key_id and secret else None
    return S3Access(base, region, creds)


class S3Source:
    """Every object under ``s3://bucket/prefix`` (or another S3-compatible store's)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        read_timeout: float,
        page_size: int | None = None,
        access: S3Access | None = None,
        scheme: str = "s3",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.bucket = bucket
        self.page_size = page_size
        self.prefix = prefix
        self.uri = f"{scheme}://{bucket}/{prefix}"
        access = access or aws_access(bucket, env)
        self.region = access.region
        self.base = access.base
        self._creds = access.credentials
        self.access = access
        self.uses_credentials = self._creds is not None
        self.http = HttpClient(self.uri, read_timeout=read_timeout, advice=self._advice)
        self._etags: dict[str, str] = {}

    def _advice(self, status: int, code: str, body: str) -> tuple[type[SourceAccessError], str]:
        a = self.access
        keys = " and ".join(a.key_vars)
        every = ", ".join([*a.key_vars, *([a.session_var] if a.session_var else [])])
        if code in _BAD_CREDENTIAL_CODES or status == 401:
            return SourceUnauthorizedError, (
                f"{a.service} rejects the credentials ({every}); set valid ones in the pod "
                "from a Secret"
            )
        if status == 404 or code in ("NoSuchBucket", "NoSuchKey"):
            return SourceNotFoundError, f"check the bucket and prefix of {self.uri}"
        if not self.uses_credentials:
            return SourceForbiddenError, (
                f"anonymous access is refused; set {keys} in the pod from a Secret"
            )
        return SourceForbiddenError, (
            f"the credentials are valid but may not read {self.uri}; {a.permissions}"
        )

    def _signed(self, url: str) -> tuple[URL, dict[str, str]]:
        if self._creds is None:
            return URL(url, encoded=True), {}
        req = AWSRequest(method="GET", url=url)
        S3SigV4Auth(self._creds, "s3", self.region).add_auth(req)
        return URL(url, encoded=True), {k: str(v) for k, v in req.headers.items()}

    async def list_files(self) -> list[RemoteFile]:
        files: list[RemoteFile] = []
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": self.prefix}
            if token:
                params["continuation-token"] = token
            if self.page_size:
                params["max-keys"] = str(self.page_size)
            query = "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted(params.items()))
            url, headers = self._signed(f"{self.base}/?{query}")
            body, _ = await self.http.get_bytes(url, "ListObjectsV2", headers=headers)
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                raise SourceError(f"{self.uri}: ListObjectsV2 returned malformed XML") from None
            # AWS answers in its 2006-03-01 namespace, Cloud Storage in its own: take the
            # namespace from the root element
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for item in root.iter(f"{ns}Contents"):
                key = item.findtext(f"{ns}Key") or ""
                size_text = item.findtext(f"{ns}Size") or ""
                if key.endswith("/"):
                    continue  # "directory" marker objects
                rel = key[len(self.prefix) :] if key.startswith(self.prefix) else key
                try:
                    path = safe_relpath(rel)
                except UnsafePathError as exc:
                    raise SourceError(f"{self.uri}: {exc}") from None
                if not size_text.isdigit():
                    raise SourceError(f"{self.uri}: {key}: listing has no valid size")
                self._etags[path] = (item.findtext(f"{ns}ETag") or "").strip('"')
                files.append(RemoteFile(path, int(size_text)))
            truncated = (root.findtext(f"{ns}IsTruncated") or "false").lower() == "true"
            token = root.findtext(f"{ns}NextContinuationToken")
            if not truncated:
                if not files:
                    raise SourceNotFoundError(
                        f"{self.uri}: not found (no object under prefix {self.prefix!r} in "
                        f"bucket {self.bucket!r}); check the bucket and prefix"
                    )
                return files
            if not token:
                raise SourceError(f"{self.uri}: truncated listing without a continuation token")

    def version(self, path: str) -> str | None:
        return self._etags.get(path)

    async def read_range(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        key = self.prefix + safe_relpath(path)
        url, headers = self._signed(f"{self.base}/{_q(key, safe='/-_.~')}")
        etag = self._etags.get(path)
        if etag:
            headers["If-Match"] = f'"{etag}"'  # a replaced object fails instead of mixing
        async for chunk in self.http.stream_range(url, path, start, end, headers=headers):
            yield chunk

    async def aclose(self) -> None:
        await self.http.aclose()
