"""Two nodes for real (tools/two_nodes.py): two network namespaces joined by a veth pair, one torchrun agent each.
Needs root for `ip netns`; skipped where that is not allowed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

TOOL = Path(__file__).resolve().parents[1] / "tools" / "two_nodes.py"


def can_make_namespaces() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"mnv2probe{os.getpid()}"  # test processes probe at the same time
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_make_namespaces(), reason="ip netns needs root")
def test_two_nodes_train_evaluate_exactly_and_a_lost_node_ends_the_job(dataset, tmp_path):
    flags = [flag for flag in TINY if flag not in ("--batch-size", "8")] + ["--batch-size", "4", "--amp", "off"]
    result = subprocess.run([sys.executable, str(TOOL), "--data", str(dataset), "--output", str(tmp_path),
                             "--dist-timeout", "15", "--json", "--", *flags], capture_output=True, text=True,
                            timeout=400, env={**os.environ, "PYTHONPATH": str(TOOL.parents[1] / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    train, lost = report["train"], report["lost_node"]
    assert train["exit_codes"] == [0, 0] and train["epochs"] == 2
    assert train["eval_count"] == 15  # 15 val images over the two nodes: none padded, none dropped
    assert lost["steps_before"] >= 5 and lost["node0_exit_code"] not in (0, None)
    assert lost["seconds_to_end"] < 60
    assert "mnv2n0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
