"""The whole Open Inference Protocol, driven by the clients people use: `tritonclient.http` (binary tensors by
default, JSON on request) and `tritonclient.grpc` against a real `serve --grpc-port`, compared with `predict`; the
classification extension, statistics, configuration, the repository index; malformed binary requests answered 4xx
with the server still ready, also mixed into a load of well-formed ones."""

import concurrent.futures
import gzip
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIVE_CLASSES, subset
from live_server import Server, _free_port
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.deploy import predict

pytest.importorskip("fastapi")
http = pytest.importorskip("tritonclient.http")
grpc_client = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

NAME = "mobilenetv2"


@pytest.fixture(scope="module")
def model_file(pretrained_five, tmp_path_factory):
    import shutil

    return Path(shutil.copy(pretrained_five, tmp_path_factory.mktemp("oip") / "model.pt"))


@pytest.fixture(scope="module")
def served(model_file):
    grpc_port = _free_port()
    server = Server(model_file, "--grpc-port", str(grpc_port), "--max-body-mb", "1", "--max-delay-ms", "10")
    server.grpc_port = grpc_port
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clients(served):
    rest = http.InferenceServerClient(f"127.0.0.1:{served.port}", concurrency=8)
    remote = grpc_client.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    yield rest, remote
    rest.close()
    remote.close()


@pytest.fixture(scope="module")
def expected(model_file, fashion, tmp_path_factory):
    """Four real val images as the model's input, and `predict`'s logits for them (the same ONNX Runtime engine)."""
    data = subset(fashion, tmp_path_factory.mktemp("oip-data") / "data", FIVE_CLASSES)
    classifier = predict.load_classifier(model_file, runtime_name="onnx")
    paths = sorted((data / "val").rglob("*.png"))[::25][:4]
    images = torch.stack([eval_transform(classifier.preprocess)(predict.read_image(p)) for p in paths])
    return images.numpy(), classifier.forward(images).numpy(), classifier.class_names


def _input(module, images, binary=True, datatype="FP32"):
    tensor = module.InferInput("input", list(images.shape), datatype)
    data = images.astype(np.float16 if datatype == "FP16" else np.float32)
    if module is http:
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def test_the_core_calls_answer_over_http_and_grpc(clients):
    rest, remote = clients
    for client in (rest, remote):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
    server = rest.get_server_metadata()
    assert server["name"] == NAME and set(server["extensions"]) >= {"binary_tensor_data", "classification",
                                                                    "statistics", "model_configuration"}
    assert list(remote.get_server_metadata().extensions) == server["extensions"]
    meta = rest.get_model_metadata(NAME)
    assert meta == rest.get_model_metadata(NAME, "1") and meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    remote_meta = remote.get_model_metadata(NAME, as_json=True)
    assert remote_meta["inputs"][0]["shape"] == ["-1", "3", "32", "32"]  # int64 in proto JSON: strings
    assert remote_meta["outputs"][0]["name"] == meta["outputs"][0]["name"] == "logits"
    config = rest.get_model_config(NAME)
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [3, 32, 32]
    remote_config = remote.get_model_config(NAME, as_json=True)["config"]
    assert remote_config["output"][0]["dims"] == [str(len(FIVE_CLASSES))]
    assert rest.get_model_repository_index() == [{"name": NAME, "version": "1", "state": "READY"}]
    assert remote.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"
    # a version the model does not have, and a model the server does not have
    assert not rest.is_model_ready(NAME, "2") and not rest.is_model_ready("other")
    with pytest.raises(InferenceServerException, match="no version"):
        remote.is_model_ready(NAME, "2")
    with pytest.raises(InferenceServerException, match="no model named"):
        remote.get_model_metadata("other")


@pytest.mark.parametrize("route", ["http binary", "http json", "http json in, binary out", "http fp16",
                                   "http version 1", "grpc", "grpc version 1"])
def test_inference_gives_predicts_logits(clients, expected, route):
    rest, remote = clients
    images, logits, _names = expected
    version = "1" if "version" in route else ""
    if route.startswith("grpc"):
        result = remote.infer(NAME, [_input(grpc_client, images)], model_version=version)
    else:
        binary_in = route not in ("http json", "http json in, binary out")
        datatype = "FP16" if route == "http fp16" else "FP32"
        outputs = [http.InferRequestedOutput("logits", binary_data=False)] if route == "http json" else None
        result = rest.infer(NAME, [_input(http, images, binary_in, datatype)], outputs=outputs,
                            model_version=version, request_id="r7")
        assert result.get_response()["id"] == "r7"
        if route == "http fp16":  # the image in half precision: the logits move by fp16's rounding of the input
            assert np.abs(result.as_numpy("logits") - logits).max() < 0.05 * max(1.0, np.abs(logits).max())
            return
    assert result.as_numpy("logits").shape == logits.shape
    assert np.abs(result.as_numpy("logits") - logits).max() <= 1e-5


def _parsed(strings):
    rows = []
    for row in strings:
        entries = [s.decode() if isinstance(s, bytes) else s for s in row]
        rows.append([(float(e.split(":")[0]), int(e.split(":")[1]), e.split(":", 2)[2]) for e in entries])
    return rows


@pytest.mark.parametrize("route", ["http binary", "http json", "grpc"])
def test_the_classification_extension_is_predicts_top_k(clients, expected, route):
    rest, remote = clients
    images, logits, names = expected
    if route == "grpc":
        result = remote.infer(NAME, [_input(grpc_client, images)],
                              outputs=[grpc_client.InferRequestedOutput("logits", class_count=3)])
    else:
        result = rest.infer(NAME, [_input(http, images)], outputs=[
            http.InferRequestedOutput("logits", binary_data=route == "http binary", class_count=3)])
    strings = result.as_numpy("logits")
    assert strings.shape == (len(images), 3)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    for row, indices, answer in zip(logits, top, _parsed(strings)):
        assert [index for _, index, _ in answer] == indices.tolist()
        assert [label for _, _, label in answer] == [names[i] for i in indices]
        assert np.allclose([score for score, _, _ in answer], row[indices], atol=1e-5)


def _stats(rest):
    (entry,) = rest.get_inference_statistics(NAME)["model_stats"]
    return entry


def test_statistics_count_the_requests_made(clients, expected, served):
    rest, remote = clients
    images = expected[0][:2]
    before = _stats(rest)
    for _ in range(3):
        rest.infer(NAME, [_input(http, images)])
    remote.infer(NAME, [_input(grpc_client, images)])
    status, _body, _ = served.request(f"/v2/models/{NAME}/infer", b'{"inputs": [}',
                                      {"Content-Type": "application/json"})
    assert status == 400
    after = _stats(rest)
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - old["success"]["count"] == 4
    assert stats["fail"]["count"] - old["fail"]["count"] == 1
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[stage]["count"] - old[stage]["count"] == 4 and stats[stage]["ns"] > old[stage]["ns"]
    assert after["inference_count"] - before["inference_count"] == 8
    assert 1 <= after["execution_count"] - before["execution_count"] <= 4
    assert stats["success"]["ns"] >= stats["compute_infer"]["ns"]
    remote_stats = remote.get_inference_statistics(NAME, as_json=True)["model_stats"][0]
    assert int(remote_stats["inference_count"]) == after["inference_count"]
    status, _body = served.get("/v2/models/stats")
    assert status == 200 and json.loads(_body)["model_stats"][0]["name"] == NAME


def _body(images, outputs=None):
    """tritonclient's own request builder: the body and its JSON header's length."""
    body, json_size = http.InferenceServerClient.generate_request_body([_input(http, images)], outputs=outputs)
    return body, json_size


def _malformed(images):
    """(what is wrong, body, headers) for each malformed binary request; each must be a 4xx."""
    body, size = _body(images)
    header = json.loads(body[:size])
    one_image = _body(images[:1])[0]

    def with_header(changed: dict, tail: bytes):
        text = json.dumps(changed).encode()
        return text + tail, {"Inference-Header-Content-Length": str(len(text))}

    wrong_size = json.loads(body[:size])
    wrong_size["inputs"][0]["parameters"]["binary_data_size"] -= 4
    two_declared = json.loads(one_image[:_body(images[:1])[1]])
    two_declared["inputs"][0]["shape"][0] = 2
    bomb = gzip.compress(b"0" * (8 << 20))
    return [
        ("a header length past the body", body, {"Inference-Header-Content-Length": str(len(body) + 1)}),
        ("a header length that is not a number", body, {"Inference-Header-Content-Length": "12a"}),
        ("binary data one byte short", body[:-1], {"Inference-Header-Content-Length": str(size)}),
        ("a binary_data_size that disagrees", *with_header(wrong_size, body[size:])),
        ("a shape that disagrees with the bytes", *with_header(two_declared, one_image[_body(images[:1])[1]:])),
        ("a binary output for a tensor we do not return",
         *with_header({**header, "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]},
                      body[size:])),
        ("a classification past the classes",
         *with_header({**header, "outputs": [{"name": "logits", "parameters": {"classification": 99}}]},
                      body[size:])),
        ("binary data and no header length", body, {}),
        ("a gzip body that inflates past the limit", bomb, {"Content-Encoding": "gzip"}),
        ("bytes after the end of the gzip stream", gzip.compress(body) + b"junk",
         {"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(size)}),
        ("an unknown content encoding", body, {"Content-Encoding": "br",
                                               "Inference-Header-Content-Length": str(size)}),
    ]


def test_malformed_binary_requests_are_4xx_and_the_server_stays_ready(served, clients, expected):
    images = expected[0][:2]
    for what, body, headers in _malformed(images):
        status, answer, _ = served.request(f"/v2/models/{NAME}/infer", body, headers, method="POST")
        assert 400 <= status < 500, (what, status, answer[:200])
        assert "error" in json.loads(answer), what
    assert served.request(f"/v2/models/{NAME}/versions/2/infer", _body(images)[0],
                          {"Inference-Header-Content-Length": str(_body(images)[1])}, method="POST")[0] == 404
    rest, remote = clients
    wrong = _input(grpc_client, images[:1])  # tritonclient checks shapes; the server must too: two declared, one sent
    wrong._input.shape[:] = [2, 3, 32, 32]
    with pytest.raises(InferenceServerException, match="bytes"):
        remote.infer(NAME, [wrong])
    with pytest.raises(InferenceServerException, match="classification"):
        remote.infer(NAME, [_input(grpc_client, images)],
                     outputs=[grpc_client.InferRequestedOutput("logits", class_count=99)])
    assert rest.is_server_ready() and remote.is_server_ready()
    assert np.abs(rest.infer(NAME, [_input(http, images)]).as_numpy("logits") - expected[1][:2]).max() <= 1e-5
    # a body compressed in two pieces is two gzip members: read as gzip reads it, the whole body
    text = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(images.shape),
                                   "data": images.reshape(-1).tolist()}]}).encode()
    members = gzip.compress(text[:len(text) // 3]) + gzip.compress(text[len(text) // 3:])
    status, answer, _ = served.request(f"/v2/models/{NAME}/infer", members,
                                       {"Content-Encoding": "gzip", "Content-Type": "application/json"}, method="POST")
    assert status == 200, answer[:300]
    logits = np.array(json.loads(answer)["outputs"][0]["data"], dtype=np.float32).reshape(len(images), -1)
    assert np.abs(logits - expected[1][:2]).max() <= 1e-5


def test_a_load_with_ten_percent_malformed_requests_has_no_5xx(served, expected):
    """200 requests from 16 threads, every tenth one malformed: the malformed get 4xx, the rest predict's logits."""
    images, logits, _ = expected
    generator = random.Random(3)
    good_body, good_size = _body(images[:2])
    malformed = _malformed(images[:2])
    plan = [generator.choice(malformed) if i % 10 == 9 else ("good", good_body,
                                                             {"Inference-Header-Content-Length": str(good_size)})
            for i in range(200)]

    def send(item):
        what, body, headers = item
        status, answer, response_headers = served.request(f"/v2/models/{NAME}/infer", body, headers, method="POST")
        if what == "good" and status == 200:
            result = http.InferenceServerClient.parse_response_body(
                answer, header_length=int({k.lower(): v for k, v in response_headers.items()}[
                    "inference-header-content-length"]))
            assert np.abs(result.as_numpy("logits") - logits[:2]).max() <= 1e-5
        return what, status

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, plan))
    assert all(status == 200 for what, status in answers if what == "good")
    assert all(400 <= status < 500 for what, status in answers if what != "good")
    assert sum(what != "good" for what, _ in answers) == 20


def test_the_serving_guides_example_runs_against_the_server(served, tmp_path, monkeypatch, capsys):
    """The tritonclient example of docs/guides/serving.md, as written (its ports pointed at this server, a real photo
    as its photo.jpg)."""
    from PIL import Image
    from skimage import data

    guide = (Path(__file__).parents[2] / "docs" / "guides" / "serving.md").read_text()
    (code,) = re.findall(r"```python\n(# tritonclient.*?)```", guide, re.S)
    code = code.replace("localhost:8000", f"127.0.0.1:{served.port}").replace(
        "localhost:8001", f"127.0.0.1:{served.grpc_port}")
    Image.fromarray(data.chelsea()).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "serving.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["top3"].shape == (1, 3) and namespace["logits"].shape == (1, len(FIVE_CLASSES))
    assert capsys.readouterr().out.strip().endswith(tuple("0123456789"))


def test_crafted_requests_get_a_400_with_a_json_error_are_counted_as_failures_and_log_no_traceback(served, clients,
                                                                                                expected):
    """What once gave a 500 (or a NaN answered 200): JSON nested 5,000 deep, a number of 400 digits, a header length
    of '²' (a digit to str.isdigit, not to int), and a tensor sent both as binary contents and as 'data' (Triton
    refuses it too)."""
    from pathlib import Path

    rest, _remote = clients
    images = expected[0][:1]
    tensor = {"name": "input", "datatype": "FP32", "shape": list(images.shape)}
    count = int(np.prod(images.shape))
    body, size = _body(images)
    both = json.loads(body[:size])
    both["inputs"][0]["data"] = [0.0] * count
    both_text = json.dumps(both).encode()
    cases = {
        "nested 5,000 deep": (b"[" * 5000 + b"]" * 5000, {}, "nested too deep"),
        "a 400-digit number": (('{"inputs": [' + json.dumps(tensor)[:-1] + ', "data": [' + "9" * 400
                                + ", 0" * (count - 1) + "]}]}").encode(), {}, "within float range"),
        "a superscript digit as the header length": (body, {"Inference-Header-Content-Length": "\u00b2"}, "byte count"),
        "binary contents and data": (both_text + body[size:], {"Inference-Header-Content-Length": str(len(both_text))},
                                     "both binary contents and 'data'"),
    }
    before = _stats(rest)["inference_stats"]["fail"]["count"]
    for what, (data, headers, message) in cases.items():
        status, answer, _ = served.request(f"/v2/models/{NAME}/infer", data,
                                           {"Content-Type": "application/json", **headers}, method="POST")
        assert status == 400 and message in json.loads(answer)["error"], (what, status, answer[:300])
        assert served.get("/v2/health/ready")[0] == 200, what
    assert _stats(rest)["inference_stats"]["fail"]["count"] - before == len(cases)
    log = Path(served.stderr).read_text()
    assert "Traceback" not in log and " 500" not in log, log[-2000:]


def test_grpc_refuses_what_rest_refuses(clients, expected):
    """A classification parameter sent as a string or a bool, an output's shared_memory_region, and an input with
    raw contents and typed contents both: INVALID_ARGUMENT, as REST's 400 (they were silently resolved)."""
    import grpc
    from tritonclient.grpc import service_pb2

    _rest, remote = clients
    images = np.asarray(expected[0][:1], dtype=np.float32)

    def request(output_parameter=None, typed=False):
        message = service_pb2.ModelInferRequest(model_name=NAME)
        tensor = message.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
        message.raw_input_contents.append(images.tobytes())
        if typed:
            tensor.contents.fp32_contents.extend(images.reshape(-1).tolist())
        output = message.outputs.add(name="logits")
        if output_parameter is not None:
            output_parameter(output.parameters)
        return message

    cases = {
        "classification as a string": (request(lambda p: setattr(p["classification"], "string_param", "3")),
                                       "classification"),
        "classification as a bool": (request(lambda p: setattr(p["classification"], "bool_param", True)),
                                     "classification"),
        "shared memory": (request(lambda p: setattr(p["shared_memory_region"], "string_param", "r")), "shared memory"),
        "raw and typed contents": (request(typed=True), "both"),
    }
    for what, (message, said) in cases.items():
        with pytest.raises(grpc.RpcError) as refused:
            remote._client_stub.ModelInfer(message)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and said in refused.value.details(), what
    answer = remote._client_stub.ModelInfer(request(lambda p: setattr(p["classification"], "int64_param", 2)))
    assert len(answer.raw_output_contents) == 1  # the well-formed request still answers
    assert remote.is_server_ready()
