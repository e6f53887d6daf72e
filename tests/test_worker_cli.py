"""`cxr worker`: a separate process with no HTTP runs the jobs an API-only server accepted, stops
gracefully on SIGTERM, and refuses to idle without a model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from analyze_support import make_client, media, wait_until
from proc_server import ROOT, Proc, processes, server_env

ASYNC = {"Prefer": "respond-async"}


def test_worker_process_runs_jobs_accepted_by_an_api_only_server(tmp_path) -> None:
    env = server_env(tmp_path, CXR_QUEUE_POLL_S="0.2")
    with make_client(tmp_path, queue_worker=False) as api, processes() as procs:
        media_id = api.post("/fhir/Media", json=media()).json()["id"]
        location = api.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        assert api.get(location).status_code == 202  # no worker in the API process: it waits
        worker = Proc(["worker"], env, tmp_path / "worker.log")
        procs.append(worker)
        done = wait_until(lambda: (r := api.get(location)).status_code != 202 and r, timeout=180, interval=0.3)
        assert done.status_code == 200, done.text
        device = [e["resource"] for e in done.json()["entry"] if e["resource"]["resourceType"] == "Device"][0]
        assert device["deviceName"][0]["name"] == "cxr:untrained-demo"  # analysed by the worker's model
        job_id = location.rsplit("/", 1)[1]
        assert api.get(f"/fhir/Task/{job_id}").json()["status"] == "completed"
        started = time.monotonic()
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(30) == 0 and time.monotonic() - started < 30  # graceful
        assert "stopping" in worker.log.read_text()


def test_worker_without_a_model_exits_with_the_reason(tmp_path) -> None:
    env = server_env(tmp_path, CXR_MODEL="cxr:no-such-model")
    result = subprocess.run([sys.executable, "-m", "fhir_server", "worker"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no-such-model" in result.stderr and "no $analyze jobs can run" in result.stderr
