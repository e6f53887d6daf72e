"""Deployment artefacts: the Kubernetes base validates against the Kubernetes schemas, compose and
Kubernetes only set settings that exist, body-size limits agree everywhere, and the nginx config of
deploy/ really runs in front of a live server (TLS, no query strings in its log, /metrics closed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fhir_server.settings import Settings
from live_server import live_server  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose.yaml"
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "templates" / "default.conf.template"
# variables that belong to other programs (uvicorn, OpenMP), not to our Settings
FOREIGN_ENV = {"FORWARDED_ALLOW_IPS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS"}


def _setting_names() -> set[str]:
    return {f"CXR_{name.upper()}" for name in Settings.model_fields}


def kustomize_build() -> list[dict]:
    """`kubectl kustomize` where kubectl exists; else the base's resources read as kustomize would
    (this base uses only resources, namespace, labels and images)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if not doc:
                continue
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            for pod in _pod_specs(doc):
                for c in pod.get("containers", []):
                    c["image"] = images.get(c["image"], c["image"])
            docs.append(doc)
    return docs


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    return kustomize_build()


def test_kubernetes_base_validates_against_the_schemas(k8s_docs):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kinds = set()
    for doc in k8s_docs:
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret", "Job"} <= kinds
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does reject a broken one
        broken = next(d for d in k8s_docs if d["kind"] == "Deployment")
        kubernetes_validate.validate({**broken, "spec": {**broken["spec"], "replicas": "two"}}, version, strict=True)


def test_probes_roles_and_settings(k8s_docs):
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs}
    api = by_name[("Deployment", "cxr-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"  # liveness never depends on the database
    assert api["resources"]["requests"]["memory"] and api["resources"]["limits"]["memory"]
    job = by_name[("Job", "cxr-db-upgrade")]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["cxr", "db", "upgrade"]
    worker = by_name[("Deployment", "cxr-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"] == ["cxr", "worker"]
    config = by_name[("ConfigMap", "cxr-settings")]["data"]
    secret = by_name[("Secret", "cxr-secrets")]["stringData"]
    env_names = set(config) | set(secret) | {e["name"] for c in (api, worker) for e in c.get("env", [])}
    unknown = {n for n in env_names if n not in FOREIGN_ENV} - _setting_names()
    assert not unknown, f"settings that do not exist: {sorted(unknown)}"
    assert config["CXR_DB_AUTO_UPGRADE"] == "false"
    body = by_name[("Ingress", "cxr-api")]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body == "64m" and int(config["CXR_MAX_UPLOAD_BYTES"]) == 64 * 1024 * 1024
    for doc in k8s_docs:
        for pod in _pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True


def test_compose_file_is_consistent():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "api", "worker", "nginx", "orthanc"} <= set(services)
    assert services["api"]["deploy"]["replicas"] == 2
    env_names = set()
    for name in ("migrate", "api", "worker"):
        env_names |= set(services[name]["environment"])
    unknown = {n for n in env_names if n not in FOREIGN_ENV} - _setting_names()
    assert not unknown, f"settings that do not exist: {sorted(unknown)}"
    assert int(services["api"]["environment"]["CXR_MAX_UPLOAD_BYTES"]) == 64 * 1024 * 1024
    assert "client_max_body_size 64m;" in NGINX_TEMPLATE.read_text()
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], check=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("openssl"),
                    reason="nginx or openssl not installed")
def test_the_deploy_nginx_config_runs_in_front_of_the_server(live_server, tmp_path):  # noqa: F811
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp_path.chmod(0o755)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt")],
                   check=True, capture_output=True, timeout=60)
    https, http = _free_port(), _free_port()
    upstream = live_server.root.removeprefix("http://")
    # what the official image's envsubst does, plus this machine's ports and paths
    site = (NGINX_TEMPLATE.read_text().replace("${CXR_UPSTREAM}", upstream)
            .replace("listen 8443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;").replace("listen 8080;", f"listen 127.0.0.1:{http};")
            .replace(":8443", f":{https}").replace("/etc/nginx/certs", str(tmp_path))
            .replace("/var/log/nginx/access.log", str(tmp_path / "access.log")))
    (tmp_path / "site.conf").write_text(site)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / d).mkdir(mode=0o777)
        (tmp_path / d).chmod(0o777)
    (tmp_path / "nginx.conf").write_text(
        f"worker_processes 1; daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log warn;\n"
        "events { worker_connections 64; }\n"
        f"http {{ client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy; "
        f"fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;\n"
        f"include {tmp_path}/site.conf; }}\n")
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"https://127.0.0.1:{https}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/healthz", verify=False, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()
            time.sleep(0.1)
        with httpx.Client(verify=False, timeout=30) as client:
            search = client.get(f"{base}/fhir/Patient", params={"family": "Qwertyson", "birthdate": "1931-02-03"})
            assert search.status_code == 200 and search.json()["resourceType"] == "Bundle"
            assert client.get(f"{base}/metrics").status_code == 404  # not through the proxy
            redirect = client.get(f"http://127.0.0.1:{http}/fhir/metadata", follow_redirects=False)
            assert redirect.status_code == 308 and redirect.headers["location"].startswith("https://")
        time.sleep(0.3)  # nginx writes its log line after the response
        log = (tmp_path / "access.log").read_text()
        assert "/fhir/Patient" in log
        assert "Qwertyson" not in log and "1931-02-03" not in log and "family=" not in log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
