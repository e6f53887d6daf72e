"""fhir_server.imaging: inline/Binary/URL image sources, SSRF refusals before any connection,
size and time limits, multipart/related parsing and DICOMweb retrieval (respx mocks only)."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import respx
from dicomweb_fixtures import PACS, imaging_study, make_instance, multipart, qido_json

from fhir_server import imaging
from fhir_server.imaging import FetchPolicy, ImagingError

HOST = "pacs.example.test"
ADDRESSES = {HOST: ["93.184.216.34"], "internal.example.test": ["10.1.2.3"], "meta.example.test": ["169.254.169.254"]}


async def fake_resolve(host: str) -> list[str]:
    return ADDRESSES.get(host, [])


def policy(hosts=(HOST,), **kw) -> FetchPolicy:
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("max_bytes", 10_000)
    return FetchPolicy(allowed_hosts=list(hosts), resolver=fake_resolve, **kw)


def run(coro):
    return asyncio.run(coro)


def refused(url: str, pol: FetchPolicy) -> ImagingError:
    with respx.mock(assert_all_called=False) as mock:
        mock.route().mock(return_value=httpx.Response(200, content=b"should never be fetched"))
        with pytest.raises(ImagingError) as err:
            run(imaging.fetch(url, pol, expression="Media.content.url"))
        assert mock.calls.call_count == 0, "a refused URL must not be requested"
    return err.value


# ---- URL policy -----------------------------------------------------------------------------


@respx.mock
def test_allowlisted_host_is_fetched() -> None:
    route = respx.get(f"https://{HOST}/img.png").mock(return_value=httpx.Response(200, content=b"PNGDATA", headers={"content-type": "image/png"}))
    got = run(imaging.fetch(f"https://{HOST}/img.png", policy(), expression="Media.content.url"))
    assert got.content == b"PNGDATA" and got.content_type == "image/png" and route.called


def test_host_not_on_allowlist_is_refused_without_a_request() -> None:
    err = refused("https://evil.example.com/x.png", policy())
    assert err.status_code == 403 and "CXR_FETCH_ALLOWED_HOSTS" in err.diagnostics
    assert err.expression == "Media.content.url"


def test_empty_allowlist_disables_fetching_and_says_how_to_enable() -> None:
    err = refused(f"https://{HOST}/x.png", policy(hosts=()))
    assert err.status_code == 403 and "CXR_FETCH_ALLOWED_HOSTS" in err.diagnostics and "inline" in err.diagnostics


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/x", "http://localhost/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/x",
     "http://10.0.0.1/x", "http://0.0.0.0/x", "http://2130706433/x"],
)
def test_loopback_private_and_metadata_literals_are_refused(url: str) -> None:
    assert refused(url, policy()).status_code == 403


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://pacs.example.test/x", "gopher://pacs.example.test/"])
def test_non_http_schemes_are_refused(url: str) -> None:
    assert refused(url, policy()).status_code == 422


def test_allowlisted_name_resolving_to_internal_address_is_refused_unless_the_address_is_listed() -> None:
    assert refused("https://internal.example.test/x", policy(hosts=("internal.example.test",))).status_code == 403
    assert refused("https://meta.example.test/x", policy(hosts=("meta.example.test",))).status_code == 403
    with respx.mock:
        respx.get("https://internal.example.test/x").mock(return_value=httpx.Response(200, content=b"ok"))
        got = run(imaging.fetch("https://internal.example.test/x", policy(hosts=("internal.example.test", "10.0.0.0/8")), expression=None))
        assert got.content == b"ok"


def test_redirect_to_a_host_not_on_the_allowlist_is_refused() -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"https://{HOST}/x").mock(return_value=httpx.Response(302, headers={"location": "http://169.254.169.254/latest"}))
        evil = mock.get("http://169.254.169.254/latest").mock(return_value=httpx.Response(200, content=b"secret"))
        with pytest.raises(ImagingError) as err:
            run(imaging.fetch(f"https://{HOST}/x", policy(), expression=None))
        assert err.value.status_code == 403 and not evil.called


@respx.mock
def test_redirect_within_the_allowlist_is_followed() -> None:
    respx.get(f"https://{HOST}/a").mock(return_value=httpx.Response(301, headers={"location": "/b"}))
    respx.get(f"https://{HOST}/b").mock(return_value=httpx.Response(200, content=b"B"))
    assert run(imaging.fetch(f"https://{HOST}/a", policy(), expression=None)).content == b"B"


# ---- limits ---------------------------------------------------------------------------------


def test_oversize_stream_is_cut_at_the_limit() -> None:
    sent = []

    async def endless():
        for _ in range(10_000):
            sent.append(1)
            yield b"x" * 1000

    with respx.mock:
        respx.get(f"https://{HOST}/big").mock(return_value=httpx.Response(200, content=endless()))
        with pytest.raises(ImagingError) as err:
            run(imaging.fetch(f"https://{HOST}/big", policy(max_bytes=5000), expression="Media.content.url"))
    assert err.value.status_code == 413
    assert len(sent) <= 7, "reading must stop as soon as the limit is exceeded"


@respx.mock
def test_declared_oversize_is_refused_before_reading() -> None:
    respx.get(f"https://{HOST}/big").mock(return_value=httpx.Response(200, content=b"x" * 20_000))
    with pytest.raises(ImagingError) as err:
        run(imaging.fetch(f"https://{HOST}/big", policy(max_bytes=10_000), expression=None))
    assert err.value.status_code == 413


@respx.mock
def test_connect_timeout_is_504() -> None:
    respx.get(f"https://{HOST}/slow").mock(side_effect=httpx.ConnectTimeout("timed out"))
    with pytest.raises(ImagingError) as err:
        run(imaging.fetch(f"https://{HOST}/slow", policy(), expression="Media.content.url"))
    assert err.value.status_code == 504 and err.value.code == "timeout"


def test_slow_drip_body_hits_the_overall_deadline() -> None:
    async def drip():
        for _ in range(100):
            await asyncio.sleep(0.1)
            yield b"x"

    with respx.mock:
        respx.get(f"https://{HOST}/drip").mock(return_value=httpx.Response(200, content=drip()))
        with pytest.raises(ImagingError) as err:
            run(imaging.fetch(f"https://{HOST}/drip", policy(timeout_s=0.3), expression=None))
    assert err.value.status_code == 504


@respx.mock
def test_upstream_error_status_is_502() -> None:
    respx.get(f"https://{HOST}/missing").mock(return_value=httpx.Response(404))
    with pytest.raises(ImagingError) as err:
        run(imaging.fetch(f"https://{HOST}/missing", policy(), expression=None))
    assert err.value.status_code == 502 and "404" in err.value.diagnostics


# ---- Media sources --------------------------------------------------------------------------


async def no_store(rtype: str, rid: str):
    return None


def test_inline_base64() -> None:
    media = {"content": {"data": base64.b64encode(b"\x89PNGabc").decode()}}
    assert run(imaging.media_bytes(media, policy=policy(), max_inline_bytes=1000, read_resource=no_store)) == b"\x89PNGabc"


@pytest.mark.parametrize("data", ["not base64!!", "QUJD=", "====", "QUJDRA==="])
def test_bad_base64_is_400_at_media_content_data(data: str) -> None:
    with pytest.raises(ImagingError) as err:
        run(imaging.media_bytes({"content": {"data": data}}, policy=policy(), max_inline_bytes=1000, read_resource=no_store))
    assert err.value.status_code == 400 and err.value.expression == "Media.content.data"


def test_media_without_data_or_url_is_400() -> None:
    with pytest.raises(ImagingError) as err:
        run(imaging.media_bytes({"content": {"contentType": "image/png"}}, policy=policy(), max_inline_bytes=10, read_resource=no_store))
    assert err.value.status_code == 400 and err.value.expression == "Media.content"


def test_relative_binary_url_reads_the_store_not_the_network() -> None:
    async def store(rtype, rid):
        return {"resourceType": "Binary", "id": rid, "contentType": "image/png", "data": base64.b64encode(b"IMG").decode()} if (rtype, rid) == ("Binary", "b1") else None

    with respx.mock(assert_all_called=False) as mock:
        got = run(imaging.media_bytes({"content": {"url": "Binary/b1"}}, policy=policy(hosts=()), max_inline_bytes=100, read_resource=store))
        assert got == b"IMG" and mock.calls.call_count == 0
        own = "https://cxr.example.org/fhir"
        got = run(imaging.media_bytes({"content": {"url": f"{own}/Binary/b1"}}, policy=policy(hosts=()), max_inline_bytes=100,
                                      read_resource=store, own_base=own))
        assert got == b"IMG" and mock.calls.call_count == 0
        with pytest.raises(ImagingError) as err:
            run(imaging.media_bytes({"content": {"url": "Binary/nope"}}, policy=policy(), max_inline_bytes=100, read_resource=store))
        assert err.value.status_code == 422


# ---- multipart/related ----------------------------------------------------------------------


def test_multipart_parser_keeps_binary_payloads_intact() -> None:
    tricky = b"\r\n--not-the-boundary\r\n\x00\xff" + bytes(range(256))
    body, ctype = multipart(b"first", tricky, preamble=b"ignored preamble\r\n")
    parts = imaging.parse_multipart_related(body, ctype)
    assert [p for _, p in parts] == [b"first", tricky]
    assert parts[0][0]["content-type"] == "application/dicom"


def test_multipart_parser_unquoted_boundary_and_padding() -> None:
    body = b"--abc  \r\nContent-Type: application/dicom\r\n\r\nX\r\n--abc--"
    assert imaging.parse_multipart_related(body, "multipart/related; boundary=abc") == [({"content-type": "application/dicom"}, b"X")]


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"--abc\r\nContent-Type: application/dicom\r\n\r\nX", "multipart/related; boundary=abc"),  # truncated
        (b"nothing here", "multipart/related; boundary=abc"),
        (b"--abc\r\n\r\nX\r\n--abc--", "multipart/related"),  # no boundary parameter
        (b"--abc\r\n\r\nX\r\n--abc--", "application/json"),
    ],
)
def test_multipart_parser_rejects_malformed_bodies(body: bytes, ctype: str) -> None:
    with pytest.raises(ValueError):
        imaging.parse_multipart_related(body, ctype)


# ---- DICOMweb -------------------------------------------------------------------------------

STUDY = "1.2.826.0.1.3680043.8.498.1"


async def endpoint_store(rtype, rid):
    from dicomweb_fixtures import endpoint

    return endpoint() if (rtype, rid) == ("Endpoint", "pacs") else None


def test_study_retrieval_via_qido_and_wado_skips_lateral_and_non_radiographs() -> None:
    pa = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", view="PA")
    lat = make_instance(STUDY, f"{STUDY}.2", f"{STUDY}.2.1", view="LL")
    ct = make_instance(STUDY, f"{STUDY}.3", f"{STUDY}.3.1", modality="CT", view="")
    with respx.mock(assert_all_called=False) as mock:
        qido = mock.get(f"{PACS}/studies/{STUDY}/instances").mock(
            return_value=httpx.Response(200, json=qido_json(STUDY, [pa, lat, ct], with_view=False),
                                        headers={"content-type": "application/dicom+json"})
        )
        wado = {}
        for inst in (pa, lat, ct):
            body, ctype = multipart(inst.data)
            wado[inst.sop_uid] = mock.get(f"{PACS}/studies/{STUDY}/series/{inst.series_uid}/instances/{inst.sop_uid}").mock(
                return_value=httpx.Response(200, content=body, headers={"content-type": ctype})
            )
        got = run(imaging.study_images(imaging_study(STUDY), policy=policy(max_bytes=10**7), read_resource=endpoint_store))
    assert qido.called
    assert [img.ref.sop_uid for img in got.images] == [pa.sop_uid]
    assert got.images[0].data == pa.data and got.images[0].view == "PA"
    assert wado[lat.sop_uid].called  # the view was only known from the file header
    assert not wado[ct.sop_uid].called  # QIDO said CT: never retrieved
    accept = wado[pa.sop_uid].calls.last.request.headers["accept"]
    assert accept.startswith("multipart/related") and 'type="application/dicom"' in accept
    assert any("LL view is not frontal" in n for n in got.notes) and any("CT" in n for n in got.notes)
    assert "LL" in got.views


def test_study_with_listed_instances_and_qido_views_skips_lateral_without_retrieving_it() -> None:
    pa = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", view="PA")
    lat = make_instance(STUDY, f"{STUDY}.2", f"{STUDY}.2.1", view="LAT")
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"{PACS}/studies/{STUDY}/instances").mock(return_value=httpx.Response(200, json=qido_json(STUDY, [pa, lat])))
        body, ctype = multipart(pa.data)
        mock.get(f"{PACS}/studies/{STUDY}/series/{pa.series_uid}/instances/{pa.sop_uid}").mock(
            return_value=httpx.Response(200, content=body, headers={"content-type": ctype}))
        lat_route = mock.get(f"{PACS}/studies/{STUDY}/series/{lat.series_uid}/instances/{lat.sop_uid}")
        got = run(imaging.study_images(imaging_study(STUDY), policy=policy(max_bytes=10**7), read_resource=endpoint_store))
    assert [i.ref.sop_uid for i in got.images] == [pa.sop_uid] and not lat_route.called


def test_study_endpoint_on_a_host_not_allowlisted_is_refused_without_a_request() -> None:
    async def store(rtype, rid):
        from dicomweb_fixtures import endpoint

        ep = endpoint()
        ep["address"] = "http://192.168.1.10/dicom-web"
        return ep

    with respx.mock(assert_all_called=False) as mock:
        with pytest.raises(ImagingError) as err:
            run(imaging.study_images(imaging_study(STUDY), policy=policy(), read_resource=store))
        assert err.value.status_code == 403 and mock.calls.call_count == 0


def test_study_without_endpoint_or_uid_is_422() -> None:
    study = imaging_study(STUDY)
    study["endpoint"] = []
    with pytest.raises(ImagingError) as err:
        run(imaging.study_images(study, policy=policy(), read_resource=endpoint_store))
    assert err.value.status_code == 422 and err.value.expression == "ImagingStudy.endpoint"
    study = imaging_study(STUDY)
    study["identifier"] = []
    with pytest.raises(ImagingError) as err:
        run(imaging.study_images(study, policy=policy(), read_resource=endpoint_store))
    assert err.value.expression == "ImagingStudy.identifier"


def test_bad_qido_answer_is_502() -> None:
    with respx.mock:
        respx.get(f"{PACS}/studies/{STUDY}/instances").mock(return_value=httpx.Response(200, content=b"<html>"))
        with pytest.raises(ImagingError) as err:
            run(imaging.study_images(imaging_study(STUDY), policy=policy(), read_resource=endpoint_store))
    assert err.value.status_code == 502
