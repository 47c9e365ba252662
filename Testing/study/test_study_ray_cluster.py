"""`--address`: a study on an existing Ray cluster (Ray's own test cluster: real head and worker
nodes as separate processes), whose worker node is lost in the middle of a case.  The finished
case survives, Ray retries the lost one on a fresh node, the study completes, and the cluster is
left running (only a cluster the study started itself is shut down)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from study_helpers import write_study, write_unet_card, write_volumes

REPO = Path(__file__).resolve().parents[2]


def test_study_on_a_cluster_survives_a_lost_worker_node(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    write_volumes(tmp_path, [(24, 24, 24), (24, 24, 28), (28, 24, 24)])
    write_unet_card(tmp_path)
    study = write_study(tmp_path / "cluster.yaml", [{"glob": "vol?.nii.gz"}], [{"name": "unet", "path": "unet.json"}],
                        methods=["Saliency"], metrics=["sparseness"])
    out = tmp_path / "out"
    # Nodes inherit this environment: on a real cluster esegeta is installed on every node instead.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)  # every case runs here, one at a time
        cluster.wait_for_nodes()
        address = cluster.address
        driver = subprocess.Popen([sys.executable, "-m", "EsegetaLib", "study", str(study), "--out", str(out),
                                   "--engine", "ray", "--address", address, "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        deadline = time.time() + 240
        markers = []
        while not markers and driver.poll() is None and time.time() < deadline:
            markers = list(out.glob("cases/*/unet/case.json"))
            time.sleep(0.05)
        assert markers, driver.communicate()[1].decode()[-3000:]
        cluster.remove_node(worker)  # the node dies with the case it is running
        # What the lost node finished is what exists now: it may have written another case between the
        # first marker and its removal (a quiet machine runs these 24^3 cases in well under a second).
        first = {p: p.read_bytes() for p in out.glob("cases/*/unet/case.json")}
        assert len(first) < 3, "the node finished every case before it was lost: nothing left to retry"
        cluster.add_node(num_cpus=1)  # a fresh node for Ray's retry
        stdout, stderr = driver.communicate(timeout=300)
        assert driver.returncode == 0, stderr.decode()[-3000:]
        # The cluster is still up after the study (it was not the study's to shut down).
        assert cluster.head_node.remaining_processes_alive()
    finally:
        cluster.shutdown()
    for path, content in first.items():
        assert path.read_bytes() == content
    # The other cases ran in other worker processes, on the node added after the loss.
    first_pids = {json.loads(c)["pid"] for c in first.values()}
    later = [json.loads(p.read_text())["pid"] for p in out.glob("cases/*/unet/case.json") if p not in first]
    assert len(later) == 3 - len(first) and not first_pids & set(later)
    frame = pd.read_csv(out / "study.csv")
    assert list(frame["status"]) == ["done"] * 3 and frame["sparseness"].notna().all()
    assert not list(out.glob("cases/*/.esegeta-*"))
    record = json.loads((out / "study.json").read_text())
    assert record["executor"]["address"] == address
    assert record["executor"]["task_resources"] == {"num_cpus": 1, "num_gpus": 0}
