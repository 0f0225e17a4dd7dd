"""Local paths and ``s3://`` URIs behind one fsspec interface.

S3 goes through s3fs with the usual AWS environment variables; ``AWS_ENDPOINT_URL`` (or ``MERMED_S3_ENDPOINT``)
points it at any S3-compatible store. The filesystem object is built on the driver and shipped to Ray tasks, so
workers started before the variables were set still reach the same endpoint.
"""

from __future__ import annotations

import os
import posixpath

import fsspec
import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    if uri.startswith("s3://"):
        import s3fs

        endpoint = os.environ.get("MERMED_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs)
        return fs, uri[len("s3://") :].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") if path != "/" else path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem for pyarrow and Ray (``read_parquet``, Ray Train's storage)."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of ``filesystem``: a path inside ``fs`` as a URI the user can pass back."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"
