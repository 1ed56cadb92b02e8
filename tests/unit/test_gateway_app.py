"""The gateway app without Triton: every envelope code, the limits, the data <-> tensor mapping,
settings and start-up errors. Inference goes to a small in-process backend (the app's I/O seam);
tests/e2e/test_gateway.py runs the same app against the real tritonserver."""

from __future__ import annotations

import base64
import json
import logging
import time

import numpy as np
import pytest
from click.testing import CliRunner
from serving import free_ports
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException

from toolkit.cli.main import cli
from toolkit.errors import GatewayError, ServerError
from toolkit.gateway.app import create_app
from toolkit.gateway.auth import ReplayCache
from toolkit.gateway.mapping import build_route, default_field, default_kind
from toolkit.gateway.settings import load_settings, parse_settings
from toolkit.gateway.signing import canonical_string, sha256_signature, sm2_sign
from toolkit.server import ApiRestriction, TritonServer

APP, SECRET, PLAIN_APP = "app-1", "secret-1-never-logged", "plain-app"
SM2_PRIVATE = "JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U="
EMBEDDING_CONFIG = {"max_batch_size": 4, "parameters": {"toolkit.api_path": {"string_value": "embedding"}}}
EMBEDDING_METADATA = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1", "1"]}],
                      "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": ["-1", "3"]}]}
MOBILE_METADATA = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": ["-1", "1"]}],
                   "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": ["-1", "2"]}]}
SCALE_METADATA = {"inputs": [{"name": "X", "datatype": "FP32", "shape": ["-1", "2"]},
                             {"name": "K", "datatype": "INT32", "shape": ["-1", "1"]}],
                  "outputs": [{"name": "Y", "datatype": "FP32", "shape": ["-1", "2"]}]}


def settings_dict(**api):
    return {"API": {"AppIdSecret": {APP: SECRET, PLAIN_APP: "other"}, "PlainAppIds": [PLAIN_APP],
                    "SM2PrivateKey": SM2_PRIVATE, "MaxBodyBytes": 4096, "MaxJsonDepth": 6, "CheckWorkers": 0,
                    **api}}


class FakeTriton:
    """Embeds a text as [len, first byte, 0.1]; an image as [len, 1]; or raises what it is told."""

    def __init__(self):
        self.raise_next: Exception | None = None
        self.calls = 0

    async def start(self):
        pass

    async def close(self):
        pass

    async def infer(self, route, tensors, timeout=None):
        self.calls += 1
        self.last_timeout = timeout
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        if route.model == "scale":
            return {"Y": tensors["X"] * tensors["K"].astype(np.float32)}
        key = "TEXT" if "TEXT" in tensors else "IMAGE"
        rows = [[len(b[0]), b[0][0] if b[0] else 0, 0.1][: 3 if key == "TEXT" else 2] for b in tensors[key]]
        return {"EMBEDDING": np.array(rows, dtype=np.float32)}


def make_client(**api):
    settings = parse_settings(settings_dict(**api))
    routes = {"embedding": build_route("embedding", "embedding", EMBEDDING_CONFIG, EMBEDDING_METADATA, None, 5),
              "mobile": build_route("mobile", "mobile", {"max_batch_size": 4}, MOBILE_METADATA, None, 5),
              "scale": build_route("scale", "scale", {"max_batch_size": 4}, SCALE_METADATA, None, 5)}
    backend = FakeTriton()
    return TestClient(create_app(settings, routes, backend=backend)), backend


@pytest.fixture
def client():
    test_client, backend = make_client()
    with test_client:
        test_client.backend = backend
        yield test_client


def signed(data, *, sign_type="SHA256", app_id=APP, secret=SECRET, python_json=False, **fields):
    body = {"appId": app_id, "version": "1", "signType": sign_type, "encType": "plain",
            "timestamp": int(time.time()), "data": data, **fields}
    text = canonical_string(body, secret, style="python" if python_json else "go")
    body["signData"] = sha256_signature(text) if sign_type == "SHA256" else sm2_sign(text, SM2_PRIVATE)
    return body


def post(client, path, body, **kwargs):
    response = client.post(f"/api/{path}", content=body if isinstance(body, bytes) else json.dumps(body), **kwargs)
    return response.status_code, response.json()


def test_api_answers_go_infer_success_envelope_when_request_is_signed_with_sha256(client):
    status, answer = post(client, "embedding", signed({"text": "hello"}))
    assert status == 200
    assert {k: v for k, v in answer.items() if k not in ("timestamp", "data")} == \
        {"appId": APP, "code": 0, "encType": "plain", "signType": "plain", "success": True}
    assert abs(answer["timestamp"] - time.time()) < 5
    assert answer["data"]["embeddings"] == [5.0, 104.0, 0.1]  # float32 0.1 written as Go writes it
    assert answer["data"]["msg"] == "success"
    request_id = answer["data"]["requestId"]
    assert request_id[:8] == time.strftime("%Y%m%d") and len(request_id) == 40
    assert post(client, "embedding", signed({"text": "hello", "n": 2}))[1]["data"]["requestId"] != request_id


def test_api_answers_a_list_per_item_when_data_holds_a_list_of_texts(client):
    status, answer = post(client, "embedding", signed({"text": ["a", "bcd"]}, sign_type="SM2"))
    assert (status, answer["code"]) == (200, 0)
    assert answer["data"]["embeddings"] == [[1.0, 97.0, 0.1], [3.0, 98.0, 0.1]]


def test_api_decodes_base64_images_when_the_input_is_binary(client):
    image = bytes([7, 0, 255, 9])
    answer = post(client, "mobile", signed({"image": base64.b64encode(image).decode()}))[1]
    assert answer["code"] == 0 and answer["data"]["embeddings"] == [4.0, 7.0]


def test_api_maps_numbers_to_tensors_when_inputs_are_numeric(client):
    answer = post(client, "scale", signed({"x": [[1.5, 2], [3, 4]], "k": [2, 3]}))[1]
    assert answer["data"]["ys"] == [[3.0, 4.0], [9.0, 12.0]]
    answer = post(client, "scale", signed({"x": [1.5, 2], "k": 2}))[1]
    assert answer["data"]["ys"] == [3.0, 4.0]


def test_api_accepts_python_json_signature_when_data_holds_html_characters_and_floats(client):
    data = {"text": "R&D <b>", "weight": 2.0}
    assert post(client, "embedding", signed(data, python_json=True))[1]["code"] == 0
    strict, _ = make_client(AcceptPythonJson=False)
    with strict:
        assert post(strict, "embedding", signed(data, python_json=True))[1]["code"] == 9800
        assert post(strict, "embedding", signed(data))[1]["code"] == 0


def test_api_serves_plain_sign_type_only_when_the_app_id_is_allowed_it(client):
    body = {"appId": PLAIN_APP, "signType": "plain", "timestamp": int(time.time()), "data": {"text": "x"}}
    assert post(client, "embedding", body)[1]["code"] == 0
    answer = post(client, "embedding", {**body, "appId": APP})[1]
    assert (answer["code"], answer["data"]["msg"]) == (9803, "signType plain is not allowed for this appId")


def ten_minutes_ago():
    return int(time.time()) - 600


def resign(body, **changes):
    body = {**body, **changes}
    body.pop("signData")
    body["signData"] = sha256_signature(canonical_string(body, SECRET))
    return body


@pytest.mark.parametrize(("make_body", "code", "message"), [
    (lambda: {**signed({"text": "x"}), "signData": sha256_signature("forged")}, 9800, "invalid signature"),
    (lambda: {**signed({"text": "x"}), "signData": "c2hvcnQ="}, 9800,
     "invalid signature: signData must be canonical base64 of a SHA256 hex digest"),
    (lambda: {**signed({"text": "x"}), "signData": "!" * 88}, 9800,
     "invalid signature: signData must be canonical base64 of a SHA256 hex digest"),
    (lambda: {**signed({"text": "x"}, sign_type="SM2"), "signData": base64.b64encode(bytes(63)).decode()}, 9800,
     "invalid signature: signData must be canonical base64 of a 64-byte SM2 signature (r||s)"),
    (lambda: {k: v for k, v in signed({"text": "x"}).items() if k != "appId"}, 9801,
     "missing or invalid parameter: appId (a string)"),
    (lambda: {**signed({"text": "x"}), "timestamp": "1700000000"}, 9801,
     "missing or invalid parameter: timestamp (unix seconds)"),
    (lambda: {**signed({"text": "x"}), "data": ["x"]}, 9801, "missing or invalid parameter: data (an object)"),
    (lambda: {**signed({"text": "x"}), "signType": 256}, 9801, "missing or invalid parameter: signType (a string)"),
    (lambda: resign(signed({"text": "x"}), encType="AES"), 9801,
     "invalid parameter: encType (only plain is supported)"),
    (lambda: resign(signed({"text": "x"}), timestamp=ten_minutes_ago()), 9802,
     "timestamp is more than 300s away from the server's time"),
    (lambda: resign(signed({"text": "x"}), signType="MD5"), 9803, "unknown signType (use SHA256 or SM2)"),
    (lambda: signed({"text": "x"}, app_id="stranger"), 9805, "unknown appId"),
    (lambda: resign(signed({"text": "x"}), version="2"), 9806, "unsupported version (use \"1\")"),
    (lambda: signed({"words": "x"}), 9801, "missing parameter: data.text"),
    (lambda: signed({"text": 5}), 9801, "data.text: expected a string or a list of them"),
    (lambda: signed({"text": [["a"]]}), 9801, "data.text: expected a string or a list of them"),
    (lambda: signed({"text": []}), 9801, "data.text: empty list"),
    (lambda: signed({"text": ["a"] * 5}), 9801, "5 items: this API takes at most 4 per request"),
], ids=["forged", "short-sig", "not-base64", "sm2-63-bytes", "no-appId", "string-timestamp", "data-list",
        "signType-number", "encType", "old-timestamp", "sign-type", "app-id", "version", "missing-field",
        "text-number", "text-nested", "empty-list", "too-many"])
def test_api_answers_documented_code_and_message_when_request_is_bad(client, make_body, code, message):
    status, answer = post(client, "embedding", make_body())
    assert status == 200
    assert (answer["code"], answer["success"], answer["data"]["msg"]) == (code, False, message)
    assert set(answer["data"]) == {"msg", "requestId"}


def test_api_answers_9801_naming_the_field_when_base64_or_numbers_are_malformed(client):
    assert post(client, "mobile", signed({"image": "not base64!"}))[1]["data"]["msg"] == \
        "data.image: not valid base64"
    answer = post(client, "scale", signed({"x": [1, "2"], "k": 1}))[1]
    assert (answer["code"], answer["data"]["msg"]) == (9801, "data.x: expected a list of 2 numbers or a list of them")
    answer = post(client, "scale", signed({"x": [1, 2], "k": 1.5}))[1]
    assert (answer["code"], answer["data"]["msg"]) == (9801, "data.k: expected a number or a list of them")
    answer = post(client, "scale", signed({"x": [[1, 2], [3, 4]], "k": [1]}))[1]
    assert answer["data"]["msg"] == "fields disagree on the number of items (data.x: a list of 2, data.k: a list of 1)"


def test_api_answers_9709_after_checking_the_signature_when_path_is_unknown(client):
    answer = post(client, "nowhere", signed({"text": "x"}))[1]
    assert (answer["code"], answer["appId"], answer["data"]["msg"]) == (9709, APP, "unknown path")
    assert post(client, "nowhere", {**signed({"text": "x"}), "signData": sha256_signature("x")})[1]["code"] == 9800


def test_api_rejects_second_use_of_a_signature_when_replayed_inside_the_window(client):
    body = signed({"text": "once"})
    assert post(client, "embedding", body)[1]["code"] == 0
    answer = post(client, "embedding", body)[1]
    assert (answer["code"], answer["data"]["msg"]) == (9800, "invalid signature: already used (replayed request)")
    assert client.backend.calls == 1
    lenient, _ = make_client(RejectReplay=False)
    with lenient:
        assert [post(lenient, "embedding", body)[1]["code"] for _ in range(2)] == [0, 0]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 200, "request body is not valid JSON"),
    (b"\xff\xfe", 200, "request body is not valid JSON"),
    (b'["a list"]', 200, "request body must be a JSON object"),
    (b'{"appId": NaN}', 200, "request body is not valid JSON"),
    (b'{"timestamp": 1e400}', 200, "request body is not valid JSON"),
    (b'{"data": {"a": [1, 2, ' + b"9" * 400 + b']}}', 200, "request body is not valid JSON"),
    (b'{"data": {"a": ["x", -' + b"9" * 400 + b', 0.5]}}', 200, "request body is not valid JSON"),
    (b'{"data": {"a": [[[[[[1]]]]]]}}', 200, "request JSON is nested deeper than 6 levels"),
    (b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", 200, "request JSON is nested deeper than 6 levels"),
    (b'{"pad": "' + b"x" * 5000 + b'"}', 413, "request body is larger than 4096 bytes"),
], ids=["not-json", "not-utf8", "not-object", "nan", "overflow", "int-overflow", "mixed-int-overflow", "deep",
       "very-deep", "too-large"])
def test_api_answers_9801_envelope_when_body_is_not_acceptable_json(client, body, status, message):
    got_status, answer = post(client, "embedding", body)
    assert (got_status, answer["code"], answer["data"]["msg"]) == (status, 9801, message)


@pytest.mark.parametrize(("error", "code", "status", "message"), [
    (InferenceServerException("in ensemble 'embedding', [1001] TEXT must not be empty"), 1001, 200,
     "TEXT must not be empty"),
    (InferenceServerException("[9701] api_entry failed: FileNotFoundError: /srv/models/x"), 9701, 200,
     "the request could not be prepared (request "),
    (InferenceServerException("[9998] infer failed: onnxruntime/core/providers/cpu/x.cc:12 bad"), 9998, 200,
     "inference failed (request "),
    (InferenceServerException("Request timeout expired"), 9997, 503, "inference did not finish within 5s"),
    (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), 9997, 503,
     "inference did not finish within 5s"),
    (InferenceServerException("unexpected: model at 10.0.0.7:8001 said no"), 9998, 200, "inference failed (request "),
])
def test_api_answers_hook_or_triton_code_when_inference_fails(client, error, code, status, message):
    """A hook's own code and message reach the client; Triton's own texts (paths, addresses) do not."""
    client.backend.raise_next = error
    got_status, answer = post(client, "embedding", signed({"text": "x"}))
    assert (answer["code"], answer["appId"], got_status) == (code, APP, status)
    assert answer["data"]["msg"].startswith(message)
    assert "/srv" not in answer["data"]["msg"] and "10.0.0.7" not in answer["data"]["msg"]
    assert ".cc" not in answer["data"]["msg"]


class AlwaysBusy(FakeTriton):
    async def infer(self, route, tensors, timeout=None):
        self.calls += 1
        raise InferenceServerException("Stub process 'tokenizer_0_0' is not healthy.", status="StatusCode.INTERNAL")


def test_api_retries_busy_and_restarting_then_answers_9996_with_503_and_retry_after():
    settings = parse_settings(settings_dict())
    routes = {"embedding": build_route("embedding", "embedding", EMBEDDING_CONFIG, EMBEDDING_METADATA, None, 3)}
    backend = AlwaysBusy()
    with TestClient(create_app(settings, routes, backend=backend)) as client:
        started = time.monotonic()
        response = client.post("/api/embedding", content=json.dumps(signed({"text": "x"})))
        took = time.monotonic() - started
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["code"] == 9996
    # Retried with growing pauses (0.25, 0.5, 1 s ...) for as long as the 3 s deadline allowed.
    assert 4 <= backend.calls <= 6 and took < 3.5, (backend.calls, took)


def test_api_hides_one_busy_answer_from_the_client_by_retrying(client):
    client.backend.raise_next = InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE")
    status, answer = post(client, "embedding", signed({"text": "hello"}))
    assert (status, answer["code"]) == (200, 0) and client.backend.calls == 2


def test_api_answers_9998_and_keeps_serving_when_the_handler_raises_unexpectedly(client, caplog):
    client.backend.raise_next = RuntimeError("boom: internal detail")
    with caplog.at_level(logging.INFO, logger="toolkit.gateway"):
        answer = post(client, "embedding", signed({"text": "x"}))[1]
    request_id = answer["data"]["requestId"]
    assert (answer["code"], answer["data"]["msg"]) == (9998, f"internal error (request {request_id})")
    assert "boom" not in json.dumps(answer) and "Traceback" not in json.dumps(answer)
    assert request_id in caplog.text and "RuntimeError: boom" in caplog.text  # the server log has it
    assert post(client, "embedding", signed({"text": "next"}))[1]["code"] == 0


def test_gateway_logs_request_ids_but_never_secrets_or_expected_signatures_when_signatures_fail(client, caplog):
    body = signed({"text": "x"})
    expected = body["signData"]
    with caplog.at_level(logging.DEBUG):
        for sign_data in (sha256_signature("forged"), expected[:-4] + "AAA="):
            answer = post(client, "embedding", {**body, "signData": sign_data})[1]
            assert answer["code"] == 9800
            assert answer["data"]["requestId"] in caplog.text
    assert SECRET not in caplog.text and expected not in caplog.text and "key=" not in caplog.text


def test_gateway_exposes_only_liveness_and_api_routes_when_triton_paths_are_requested(client):
    live = client.get("/")
    assert (live.status_code, live.text) == (200, "Hello world.")
    for method, path in [("POST", "/v2/repository/models/embedding/unload"), ("POST", "/v2/repository/index"),
                         ("GET", "/v2/logging"), ("POST", "/v2/trace/setting"),
                         ("GET", "/v2/systemsharedmemory/status"), ("POST", "/v2/models/embedding/infer")]:
        assert client.request(method, path).status_code == 404, path
    assert client.get("/api/embedding").status_code == 405


def test_replay_cache_stays_bounded_and_forgets_expired_signatures_when_filled():
    cache = ReplayCache(max_entries=3)
    assert [cache.seen(("a", str(i)), expires=100, now=0) for i in range(5)] == [False] * 5
    assert len(cache) == 3
    assert cache.seen(("a", "4"), expires=100, now=1) is True
    assert cache.seen(("a", "4"), expires=200, now=101) is False  # expired: a new request may reuse it
    assert len(cache) == 1


@pytest.mark.parametrize(("tensor", "datatype", "kind", "field"), [
    ("TEXT", "BYTES", "text", "texts"), ("IMAGE", "BYTES", "base64", "images"), ("face_image", "BYTES", "base64",
                                                                                 "face_images"),
    ("audio", "BYTES", "base64", "audios"), ("X", "FP32", "number", "xs"), ("LOGITS", "FP32", "number", "logits"),
])
def test_default_mapping_derives_kind_and_field_when_settings_name_nothing(tensor, datatype, kind, field):
    assert (default_kind(tensor, datatype), default_field(tensor)) == (kind, field)


def test_build_route_raises_gateway_error_naming_the_tensor_when_a_mapping_is_wrong():
    settings = parse_settings({**settings_dict(), "Apis": {"/api/embedding": {
        "Inputs": {"sentence": {"Tensor": "TXT"}}}}})
    with pytest.raises(GatewayError, match=r"model 'embedding' has no input 'TXT' \(it has \['TEXT'\]\)"):
        build_route("embedding", "embedding", EMBEDDING_CONFIG, EMBEDDING_METADATA, settings.apis["embedding"], 5)
    settings = parse_settings({**settings_dict(), "Apis": {"embedding": {"Outputs": {"EMBEDDING": "msg"}}}})
    with pytest.raises(GatewayError, match="output field 'msg' is reserved"):
        build_route("embedding", "embedding", EMBEDDING_CONFIG, EMBEDDING_METADATA, settings.apis["embedding"], 5)


def test_load_settings_reads_the_repository_example_when_gateway_yaml_is_used():
    from pathlib import Path

    settings = load_settings(Path(__file__).parents[2] / "gateway.yaml")
    assert settings.api.req_time_diff == 300 and settings.triton.url == "127.0.0.1:8001"
    assert settings.apis["embedding"].inputs["text"].tensor == "TEXT"
    assert "41DF0E6AE27B5282C07EF5124642A352" not in repr(settings)


def test_load_settings_raises_gateway_error_listing_every_field_when_settings_are_invalid(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("API: {Port: 70000, AppIdSecret: {a: ''}, PlainAppIds: [b], SM2PublicKey: '04ab', Typo: 1}\n"
                    "Triton: {AdminHeader: 'no-equals-sign'}\nErrCode: {BadSignature: x}\n")
    with pytest.raises(GatewayError) as info:
        load_settings(path)
    message = str(info.value)
    for expected in ["API.Port", "API.AppIdSecret", "API.Typo", "Triton.AdminHeader", "ErrCode.BadSignature"]:
        assert expected in message, message
    assert str(path) in message


def test_gateway_command_prints_error_without_traceback_when_triton_is_unreachable(tmp_path):
    (port,) = free_ports(1)
    settings = tmp_path / "gateway.yaml"
    settings.write_text(json.dumps(settings_dict()))
    result = CliRunner().invoke(cli, ["gateway", "--settings", str(settings), "--triton", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert f"Error: Triton is not reachable at 127.0.0.1:{port} (gRPC)" in result.output
    assert "Traceback" not in result.output


def test_gateway_command_rejects_admin_header_without_echoing_it_when_it_is_malformed(tmp_path):
    settings = tmp_path / "gateway.yaml"
    settings.write_text(json.dumps(settings_dict()))
    result = CliRunner().invoke(cli, ["gateway", "--settings", str(settings)],
                                env={"TOOLKIT_RESTRICT_APIS": "Admin Key=hunter2"})
    assert result.exit_code == 1
    assert "Error: command line: 1 problem(s)" in result.output and "Triton.AdminHeader" in result.output
    assert "hunter2" not in result.output


def test_api_restriction_renders_tritonserver_flags_when_serving_with_a_header():
    restriction = ApiRestriction.parse("admin-key=s3cret")
    assert restriction.flags() == [
        "--http-restricted-api=model-repository,shared-memory,logging,trace:admin-key=s3cret",
        "--grpc-restricted-protocol=model-repository,shared-memory,logging,trace:admin-key=s3cret"]
    assert restriction.grpc_headers() == {"triton-grpc-protocol-admin-key": "s3cret"}
    command = TritonServer("repo", restrict_apis=restriction).command(backend_dir="b")  # type: ignore[arg-type]
    assert command[-2:] == restriction.flags()


@pytest.mark.parametrize("text", ["admin-key", "Admin=x", "k=has space", "k=a:b", "=v"])
def test_api_restriction_parse_raises_when_key_or_value_is_malformed(text):
    with pytest.raises(ServerError, match="--restrict-apis: expected KEY=VALUE"):
        ApiRestriction.parse(text)
