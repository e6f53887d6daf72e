"""Generated $analyze requests never get a 5xx: Parameters and bare Media bodies with mutated
shapes (wrong JSON types, missing and unknown parameters, broken attachments, odd content types,
disallowed URLs) from a seeded generator. Every answer is a 2xx or a 4xx OperationOutcome, and
the server still analyses a good image afterwards. Outgoing URLs are mocked by respx: nothing
leaves the machine."""

from __future__ import annotations

import copy
import random

import pytest
import respx
from analyze_support import HOST, make_client, media, png_b64

SEED = 4242
REQUESTS = 100

_JUNK = [None, "", 0, -1, 1.5, True, [], {}, "x", "Patient/nope", "#frag", {"reference": 7}, [None], "A" * 5000]
_DATA = ["", "!!!", "AAAA", "aGVsbG8=", png_b64(), png_b64()[:40], "data:image/png;base64," + png_b64()[:20]]
_URLS = [f"https://{HOST}/img.png", "http://127.0.0.1/x.png", "http://169.254.169.254/latest", "file:///etc/passwd",
         "ftp://x/y", "Binary/missing", "https://elsewhere.example.test/a.png", "not a url", ""]
_TYPES = ["image/png", "image/jpeg", "application/dicom", "text/plain", "", "image/*", None]


def _mutate_media(rng: random.Random) -> dict:
    body = media()
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):  # 0: a valid body, so analyses run too
        kind = rng.random()
        if kind < 0.6 and not isinstance(body.get("content"), dict):
            continue  # an earlier mutation replaced or removed the attachment
        if kind < 0.25:
            body["content"]["data"] = rng.choice(_DATA)
        elif kind < 0.45:
            body["content"].pop("data", None)
            body["content"]["url"] = rng.choice(_URLS)
        elif kind < 0.6:
            body["content"]["contentType"] = rng.choice(_TYPES)
        elif kind < 0.75:
            body[rng.choice(["subject", "status", "content", "createdDateTime", "bodySite", "view"])] = rng.choice(_JUNK)
        elif kind < 0.85:
            body[rng.choice(["bogus", "_status", "modality"])] = rng.choice(_JUNK)
        else:
            body.pop(rng.choice(["content", "status", "subject", "resourceType"]), None)
    return body


def _parameters(rng: random.Random) -> dict:
    params = []
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(["media", "media", "media", "imagingStudy", "heatmaps", "model", "bogus", "", None])
        entry: dict = {"name": name}
        roll = rng.random()
        if roll < 0.5:
            entry["resource"] = _mutate_media(rng)
        elif roll < 0.7:
            entry["valueBoolean"] = rng.choice([True, False, "yes", 1])
        elif roll < 0.85:
            entry["valueString"] = rng.choice(_JUNK)
        params.append(entry)
    body = {"resourceType": "Parameters", "parameter": params}
    if rng.random() < 0.1:
        body["parameter"] = rng.choice(_JUNK)
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("analyze-fuzz")) as c:
        yield c


def test_generated_analyze_requests_never_fail_the_server(client):
    rng = random.Random(SEED)
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"https://{HOST}/img.png").respond(200, content=b"\x89PNG not really", headers={"Content-Type": "image/png"})
        for _ in range(REQUESTS):
            body = _parameters(rng) if rng.random() < 0.5 else _mutate_media(rng)
            url = rng.choice(["/fhir/Media/$analyze"] * 4 + ["/fhir/ImagingStudy/$analyze", "/fhir/Media/nope/$analyze"])
            response = client.post(url, json=copy.deepcopy(body), headers={"Content-Type": "application/fhir+json"})
            assert response.status_code < 500, (url, str(body)[:400], response.text[:400])
            if response.status_code >= 400:
                assert response.json()["resourceType"] == "OperationOutcome", response.text[:300]
    good = client.post("/fhir/Media/$analyze", json=media())
    assert good.status_code == 201, good.text
