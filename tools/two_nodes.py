"""Two nodes for real on one machine: two network namespaces joined by a veth pair, one torchrun agent in each
(`--nnodes 2`, c10d rendezvous on node 0's address), the traffic between them on the veth link only.

1. trains and evaluates across both nodes and checks the eval counted every val image exactly once;
2. starts a longer run, cuts node 1 off (its link goes down, its processes are killed: a lost node) and measures how
   long node 0 takes to end with a non-zero code (`--dist-timeout` bounds it).

Needs root (`ip netns`). Everything it creates is removed at the end, also on failure.

    python tools/two_nodes.py --data DIR --output RUNS [--dist-timeout 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

NODES = [("mnv2n0", "mnv2v0", "10.77.0.1"), ("mnv2n1", "mnv2v1", "10.77.0.2")]
PORT = 29477


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def create_network() -> None:
    remove_network()
    sh("ip", "link", "add", NODES[0][1], "type", "veth", "peer", "name", NODES[1][1])
    for namespace, device, address in NODES:
        sh("ip", "netns", "add", namespace)
        sh("ip", "link", "set", device, "netns", namespace)
        sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
        sh("ip", "-n", namespace, "link", "set", device, "up")
        sh("ip", "-n", namespace, "link", "set", "lo", "up")


def remove_network() -> None:
    for namespace, _device, _address in NODES:
        sh("ip", "netns", "pids", namespace, check=False)
        for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", namespace, check=False)
    sh("ip", "link", "del", NODES[0][1], check=False)


def start_node(rank: int, train_args: list[str], log: Path) -> subprocess.Popen:
    namespace, device, _address = NODES[rank]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": device, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"{NODES[0][2]}:{PORT}", "--rdzv_id", "mobilenetv2-two-nodes",
               "--rdzv_conf", f"is_host={int(rank == 0)}",  # the hostname is shared: say which node hosts the store
               "--local-addr", NODES[rank][2],  # and the address the other node reaches this one at
               "--monitor-interval", "0.5", "-m", "mobilenetv2", "train", *train_args]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def train_and_evaluate(data: Path, run: Path, extra: list[str]) -> dict:
    args = ["--data", str(data), "--output", str(run), *extra]
    nodes = [start_node(rank, args, run.parent / f"{run.name}.node{rank}.log") for rank in (0, 1)]
    codes = [node.wait(timeout=600) for node in nodes]
    epochs = records(run, "epoch")
    return {"exit_codes": codes, "epochs": len(epochs), "eval_count": epochs[-1]["eval_count"] if epochs else None,
            "eval_top1": epochs[-1]["eval_top1"] if epochs else None}


def lose_a_node(data: Path, run: Path, extra: list[str], dist_timeout: int) -> dict:
    args = ["--data", str(data), "--output", str(run), *extra, "--epochs", "1000", "--log-every", "1",
            "--dist-timeout", str(dist_timeout)]
    nodes = [start_node(rank, args, run.parent / f"{run.name}.node{rank}.log") for rank in (0, 1)]
    deadline = time.time() + 300
    while len(records(run, "step")) < 5 and time.time() < deadline:
        time.sleep(0.1)
    steps_before = len(records(run, "step"))
    namespace, device, _address = NODES[1]
    sh("ip", "-n", namespace, "link", "set", device, "down")  # the cable is cut
    for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():  # and the node is gone
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    lost = time.time()
    try:
        code = nodes[0].wait(timeout=dist_timeout + 120)
    except subprocess.TimeoutExpired:
        nodes[0].kill()
        code = None
    nodes[1].wait(timeout=30)
    return {"steps_before": steps_before, "node0_exit_code": code, "seconds_to_end": round(time.time() - lost, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--dist-timeout", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("train_args", nargs="*", help="more `mobilenetv2 train` flags (after --)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("two_nodes: needs root for ip netns", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still removes the network
    try:
        create_network()
        result = {"train": train_and_evaluate(args.data, args.output / "train", args.train_args + ["--epochs", "2"]),
                  "lost_node": lose_a_node(args.data, args.output / "lost", args.train_args, args.dist_timeout)}
    finally:
        remove_network()
    if args.json:
        print(json.dumps(result))
    else:
        train, lost = result["train"], result["lost_node"]
        print(f"two nodes trained {train['epochs']} epochs (exit codes {train['exit_codes']}), eval counted "
              f"{train['eval_count']} images, top-1 {train['eval_top1']}")
        print(f"node 1 lost after {lost['steps_before']} steps: node 0 ended {lost['seconds_to_end']} s later with "
              f"exit code {lost['node0_exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
