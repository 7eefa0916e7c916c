"""Images/s of one loader worker (here: the one process, one thread) reading the same ImageNet-like JPEGs as tar
shards and as files, through the training pipeline (each image under its own seed, decoded, the seed's augmentation,
collated; files in a shuffled order, shards through a shuffle buffer), from three sources:

- warm: local disk, the page cache holding everything;
- cold: local disk, the page cache dropped before each pass (root: /proc/sys/vm/drop_caches; without it the row says
  so and is warm);
- slow: an HTTP server in a network namespace whose link adds `--latency-ms` to every round trip (tc netem), files
  fetched one GET each over a kept-alive connection (as an object store's SDK does), shards streamed by
  webdataset's opener. Where the kernel has no netem (or there is no root), a proxy process on loopback delays every
  chunk by half the latency in each direction instead (the same added round trip, throughput untouched), and the
  row says which.

    python benchmarks/shards.py [--images 1200] [--size 500x375] [--latency-ms 20] [--http-files 200] [--rounds 4]

Goals (issue 23): from the slow source, shards >= 3x files per worker; warm, shards within 10 % of files.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mobilenetv2.config import Preprocess
from mobilenetv2.data import shards, streams
from mobilenetv2.data.folders import DECODE_ERRORS, collate_skipping, image_folder
from mobilenetv2.data.shard_source import find_shard_splits
from mobilenetv2.data.synthetic import write_synthetic
from mobilenetv2.data.transforms import train_transform
from mobilenetv2.training.tasks import _Positioned, _SeededSamples
from timing import cpu_line

NAMESPACE, HOST_SIDE, NS_SIDE = "mnv2-bench", "mnv2-h", "mnv2-n"
HOST_IP, SERVER_IP, PORT = "10.213.0.1", "10.213.0.2", 8713
BATCH = 32
PROXY = """
import asyncio, sys, time
listen, target, half = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 2000
async def pipe(reader, writer):
    queue = asyncio.Queue()
    async def send():
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()
    sender = asyncio.create_task(send())
    while True:
        data = await reader.read(1 << 16)
        queue.put_nowait((time.monotonic() + half, data))
        if not data:
            break
    await sender
async def handle(client_reader, client_writer):
    server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    await server.serve_forever()
asyncio.run(main())
"""
SERVER = """
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per reader, as object-store clients keep
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])),
                                functools.partial(Handler, directory=sys.argv[3])).serve_forever()
"""


class HttpFiles(Dataset):
    """Each image fetched by its own GET over one kept-alive connection per process, then decoded and augmented."""

    def __init__(self, base: str, samples: list[tuple[str, int]], pipeline):
        self.base, self.samples, self.pipeline, self.connection = urlparse(base), samples, pipeline, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.base.hostname, self.base.port, timeout=30)
        self.connection.request("GET", f"{self.base.path.rstrip('/')}/{path}")
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise OSError(f"GET {path}: {response.status}")
        try:
            return self.pipeline.finish(self.pipeline.decode(io.BytesIO(data))), label
        except DECODE_ERRORS:
            return None


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def count_images(batches) -> int:
    return sum(len(labels) for _images, labels, _skipped in streams.checked(batches))


def timed(make_batches, cold: bool = False) -> tuple[float, float, bool]:
    """Images per second of wall time and per second of this process's CPU time (the worker's cost on its core,
    which a VM's stolen time does not blur), and whether the page cache was dropped first."""
    dropped = drop_page_cache() if cold else False
    start, cpu = time.perf_counter(), time.process_time()
    images = count_images(make_batches())
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu), dropped


def file_batches(root: Path, pipeline, limit: int | None = None):
    """Files as training reads them: each image under its own seed (tasks._SeededSamples), in a shuffled order."""
    folder = image_folder(root / "train", pipeline)
    if limit:
        folder.samples = folder.samples[:limit]
    dataset = _SeededSamples(folder, seed=0, rank=0)
    order = _Positioned(RandomSampler(folder, generator=torch.Generator().manual_seed(0)))
    return lambda: iter(DataLoader(dataset, batch_size=BATCH, sampler=order, num_workers=0,
                                   collate_fn=collate_skipping))


def shard_batches(source: str, pipeline, limit: int | None = None):
    splits = find_shard_splits(source)
    samples = min(limit or splits.train.num_samples, splits.train.num_samples)
    steps, batch = streams.steps_and_batch(samples, 1, BATCH)
    stream = streams.ShardStream(splits.train, len(splits.classes), streams.PilItem(pipeline), collate_skipping,
                                 batch, training=True, steps=steps, streams=1,
                                 shuffle_buffer=min(1000, samples // 4))  # a buffer fill beyond the pass: unfair
    return lambda: iter(streams.stream_loader(stream, 0))


def http_file_batches(base: str, root: Path, pipeline, limit: int):
    folder = image_folder(root / "train", None)
    samples = [(os.path.relpath(path, root), label) for path, label in folder.samples[:limit]]
    dataset = HttpFiles(base, samples, pipeline)
    return lambda: iter(DataLoader(dataset, batch_size=BATCH, num_workers=0, collate_fn=collate_skipping))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlowServer:
    """An HTTP server for `directory` behind `latency_ms` of added round trip: a netns link with netem where root and
    the kernel allow, else a delaying proxy on loopback. `how` says which."""

    def __init__(self, directory: Path, latency_ms: float, use_netns: bool):
        self.directory, self.latency_ms, self.use_netns = directory, latency_ms, use_netns
        self.processes, self.netns, self.how = [], False, ""

    def _ip(self, *args, namespace: bool = False):
        prefix = ["ip", "netns", "exec", NAMESPACE] if namespace else []
        subprocess.run([*prefix, *args], check=True, capture_output=True)

    def _try_netns(self) -> bool:
        if not (self.use_netns and os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")):
            return False
        self._cleanup()
        self.netns = True
        try:
            self._ip("ip", "netns", "add", NAMESPACE)
            self._ip("ip", "link", "add", HOST_SIDE, "type", "veth", "peer", "name", NS_SIDE)
            self._ip("ip", "link", "set", NS_SIDE, "netns", NAMESPACE)
            self._ip("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_SIDE)
            self._ip("ip", "link", "set", HOST_SIDE, "up")
            self._ip("ip", "addr", "add", f"{SERVER_IP}/24", "dev", NS_SIDE, namespace=True)
            self._ip("ip", "link", "set", NS_SIDE, "up", namespace=True)
            self._ip("tc", "qdisc", "add", "dev", NS_SIDE, "root", "netem", "delay", f"{self.latency_ms}ms",
                     namespace=True)
            return True
        except subprocess.CalledProcessError as exc:
            self.how = f"netem refused ({exc.stderr.decode().strip()[:60]}); "
            self._cleanup()
            self.netns = False
            return False

    def _start(self, command: list[str], host: str, port: int) -> None:
        self.processes.append(subprocess.Popen(command, stderr=subprocess.DEVNULL))
        for _ in range(100):
            try:
                connection = http.client.HTTPConnection(host, port, timeout=1)
                connection.request("HEAD", "/")
                connection.getresponse().read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the server on {host}:{port} did not start")

    def __enter__(self) -> str:
        server = [sys.executable, "-c", SERVER]
        if self._try_netns():
            self._start(["ip", "netns", "exec", NAMESPACE, *server, SERVER_IP, str(PORT), str(self.directory)],
                        SERVER_IP, PORT)
            self.how = f"+{self.latency_ms:g} ms per round trip (netem on a netns link)"
            return f"http://{SERVER_IP}:{PORT}"
        port, proxy = _free_port(), _free_port()
        self._start([*server, "127.0.0.1", str(port), str(self.directory)], "127.0.0.1", port)
        if self.latency_ms <= 0:
            self.how += "loopback, no added latency"
            return f"http://127.0.0.1:{port}"
        self._start([sys.executable, "-c", PROXY, str(proxy), str(port), str(self.latency_ms)], "127.0.0.1", proxy)
        self.how += f"+{self.latency_ms:g} ms per round trip (a delaying proxy on loopback)"
        return f"http://127.0.0.1:{proxy}"

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(10)
        if self.netns:
            self._cleanup()

    def _cleanup(self) -> None:
        subprocess.run(["ip", "link", "del", HOST_SIDE], capture_output=True)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--size", default="500x375")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-size", default="16MB")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--http-files", type=int, default=200, help="images fetched as files over HTTP (slow)")
    parser.add_argument("--rounds", type=int, default=4, help="passes per local row; the best counts")
    parser.add_argument("--no-netns", action="store_true", help="serve on loopback without added latency")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker's share of the machine
    pipeline = train_transform(Preprocess.for_image_size(args.image_size), normalized=False)
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as folder:
        root = Path(folder)
        tree = write_synthetic(root / "tree", images=args.images, size=args.size, val_fraction=0.0)
        shards.write_shards(tree, root / "shards", shards.parse_size(args.shard_size))
        print(cpu_line(), flush=True)
        print(f"{args.images} JPEGs of about {args.size} px, train transform to {args.image_size} px, batch {BATCH}, "
              f"one process, one thread (one loader worker's work)\n")
        rows = []
        for name, cold in (("local disk, warm", False), ("local disk, cold", True)):
            best = {"files": (0.0, 0.0, False), "shards": (0.0, 0.0, False)}
            kinds = [("files", file_batches(tree, pipeline)), ("shards", shard_batches(str(root / "shards"), pipeline))]
            for round_index in range(args.rounds):  # taking turns at going first: this VM's speed drifts
                for kind, batches in kinds[round_index % 2:] + kinds[:round_index % 2]:
                    result = timed(batches, cold)
                    best[kind] = tuple(max(a, b) for a, b in zip(best[kind], result))
            label = name if not cold or best["files"][2] else f"{name} (page cache NOT dropped: no permission)"
            rows.append((label, best["files"][:2], best["shards"][:2]))
        server = SlowServer(root, args.latency_ms, not args.no_netns)
        with server as base:
            limit = min(args.http_files, args.images)
            runs = {"files": http_file_batches(f"{base}/tree", tree, pipeline, limit),
                    "shards": shard_batches(f"{base}/shards/", pipeline, limit)}
            best = {kind: max(timed(make)[:2] for _ in range(2)) for kind, make in runs.items()}
            rows.append((f"HTTP, {server.how}", best["files"], best["shards"]))
        print("| source | files (images/s) | shards (images/s) | shards / files | files (images per CPU s) | "
              "shards (images per CPU s) | shards / files |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, (files, files_cpu), (sharded, sharded_cpu) in rows:
            print(f"| {label} | {files:.1f} | {sharded:.1f} | {sharded / files:.2f}x | {files_cpu:.1f} | "
                  f"{sharded_cpu:.1f} | {sharded_cpu / files_cpu:.2f}x |")


if __name__ == "__main__":
    main()
