"""Start and stop Azurite (the official storage emulator, installed from npm into devtools/node_modules)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Azurite:
    """An Azurite process with blob, queue and table services on loopback."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        blob_port: int = 0,
        queue_port: int = 0,
        table_port: int = 0,
        in_memory: bool = True,
        location: Path | None = None,
    ):
        self.host = host
        self.blob_port = blob_port or free_port(host)
        self.queue_port = queue_port or free_port(host)
        self.table_port = table_port or free_port(host)
        # A given location keeps the data across restarts (make run); otherwise a temporary folder
        # (or memory) that stop() removes.
        self.location = Path(location) if location is not None else None
        self.in_memory = in_memory and self.location is None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def connection_string(self) -> str:
        base = f"http://{self.host}"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={base}:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint={base}:{self.queue_port}/{ACCOUNT};"
            f"TableEndpoint={base}:{self.table_port}/{ACCOUNT};"
        )

    def start(self, timeout: float = 30.0) -> Azurite:
        if not AZURITE_BIN.exists():
            raise RuntimeError(f"Azurite is not installed at {AZURITE_BIN}: run `make setup` (npm install in devtools/)")
        if self.location is not None:
            self.location.mkdir(parents=True, exist_ok=True)
            self._workdir = str(self.location)
        self._workdir = self._workdir or tempfile.mkdtemp(prefix="azurite-")
        command = [
            str(AZURITE_BIN),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            "--disableProductStyleUrl",
            "--blobHost",
            self.host,
            "--blobPort",
            str(self.blob_port),
            "--queueHost",
            self.host,
            "--queuePort",
            str(self.queue_port),
            "--tableHost",
            self.host,
            "--tablePort",
            str(self.table_port),
        ]
        command += ["--inMemoryPersistence"] if self.in_memory else ["--location", self._workdir]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self._workdir, start_new_session=True
        )
        for port in (self.table_port, self.queue_port, self.blob_port):
            if not _wait_for_port(self.host, port, timeout):
                stderr = self._process.stderr
                exited = self._process.poll() is not None
                error = stderr.read().decode(errors="replace") if exited and stderr is not None else ""
                self.stop()
                raise RuntimeError(f"Azurite did not start on port {port}: {error[-2000:]}")
        return self

    def _terminate(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None

    def stop(self) -> None:
        self._terminate()
        if self._workdir and self.location is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Storage is down (connections refused) inside the block; data survives (needs in_memory=False)."""
        if self.in_memory:
            raise RuntimeError("an outage needs Azurite started with in_memory=False to keep its data")
        self._terminate()
        try:
            yield
        finally:
            self.start()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
