"""`mobilenetv2 serve` started for real on a free loopback port, for the serving tests."""

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import cli_process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        handle, self.stderr = tempfile.mkstemp(prefix="serve-stderr-")
        os.close(handle)
        # its own process (forked from one that imported torch once; one thread, as the xdist workers run)
        self.process = cli_process(["serve", "--checkpoint", str(checkpoint), "--port", str(self.port), *extra],
                                   Path(self.stderr))
        deadline = time.time() + 120
        while time.time() < deadline:
            if not self.process.is_alive():
                raise AssertionError(f"server exited: {Path(self.stderr).read_text()[-2000:]}")
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready in 120 s")

    def request(self, path, data=None, headers=None, method=None):
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def get(self, path):
        status, body, _ = self.request(path)
        return status, body

    def json(self, path, payload=None, raw=None):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
        status, body, headers = self.request(path, data, {"Content-Type": "application/json"} if data else {})
        return status, json.loads(body), headers

    def stop(self):
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(20)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        Path(self.stderr).unlink(missing_ok=True)
