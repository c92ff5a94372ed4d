"""Object storage for the tests: moto's S3 server and a plain HTTP server on 127.0.0.1, both in this process."""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

BUCKET = "flowmill-test"  # S3 bucket names need at least 3 characters
STORE_GROUP = "object-storage"  # xdist_group of the tests that share the servers: one worker starts them once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """moto's S3 API on 127.0.0.1 (it accepts any access key unless told to check them)."""

    endpoint: str
    server: ThreadedMotoServer

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point clients (s3fs, boto3, MLflow) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file of ``folder`` under ``s3://BUCKET/prefix/``; returns that URL."""
        client = self.client()
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
        return f"s3://{BUCKET}/{prefix}/"

    def keys(self, prefix: str) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))


def start_s3() -> S3Server:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(f"http://127.0.0.1:{port}", server)
    s3.client().create_bucket(Bucket=BUCKET)
    return s3


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Python's file server, which can drop a connection after some bytes of a file, once per request."""

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.gets.append(self.path)
        statuses = self.server.statuses.get(self.path)
        if statuses:
            self.send_error(statuses.pop(0))
            return
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        drops = self.server.drops.get(self.path)
        if not drops:
            return super().copyfile(source, outputfile)
        cut = drops.pop(0)
        outputfile.write(source.read(cut))
        outputfile.flush()
        # The headers promised the whole file: the client sees the connection end mid-body.
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@dataclass
class HTTPShardServer:
    """Serves ``root`` at ``url``. ``statuses[path]`` lists error statuses the next GETs of ``path``
    answer (one per GET), ``drops[path]`` byte counts after which the next GETs of ``path`` that
    get the file are cut off; ``gets`` records every GET's path."""

    root: Path
    url: str
    server: http.server.ThreadingHTTPServer
    statuses: dict[str, list[int]] = field(default_factory=dict)
    drops: dict[str, list[int]] = field(default_factory=dict)
    gets: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_http(root: Path) -> HTTPShardServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.daemon_threads = True
    shards = HTTPShardServer(root, f"http://127.0.0.1:{server.server_address[1]}", server)
    server.statuses, server.drops, server.gets = shards.statuses, shards.drops, shards.gets
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return shards
