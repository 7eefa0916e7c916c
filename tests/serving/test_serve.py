"""`mobilenetv2 serve`, started for real on a free loopback port: Open Inference Protocol v2, /v1/classify against
`predict`, metrics, every kind of bad input (4xx, the server still healthy after), SIGTERM drain and 64 concurrent
clients."""

import concurrent.futures
import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIVE_CLASSES, subset
from live_server import Server
from mobilenetv2.deploy import predict

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def five_data(fashion, tmp_path_factory):
    return subset(fashion, tmp_path_factory.mktemp("serve") / "data", FIVE_CLASSES)


@pytest.fixture(scope="module")
def model_file(pretrained_five, tmp_path_factory):
    import shutil

    return Path(shutil.copy(pretrained_five, tmp_path_factory.mktemp("served") / "model.pt"))


@pytest.fixture(scope="module")
def server(model_file):
    served = Server(model_file, "--max-body-mb", "1", "--max-delay-ms", "20")
    yield served
    served.stop()


def _val_images(five_data, count=10):
    return sorted((five_data / "val").rglob("*.png"))[::20][:count]


def test_health_metadata_and_infer_match_predict(server, model_file, five_data):
    assert server.json("/v2/health/live")[0] == 200
    assert server.json("/v2/health/ready")[:2] == (200, {"ready": True})
    assert server.json("/v2/models/mobilenetv2/ready")[1]["ready"] is True
    status, meta, _ = server.json("/v2/models/mobilenetv2")
    assert status == 200 and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["outputs"][0]["shape"] == [-1, 5]
    assert meta["parameters"]["class_names"] == sorted(FIVE_CLASSES)
    assert server.json("/v2/models/other")[0] == 404
    classifier = predict.load_classifier(model_file, runtime_name="onnx")
    from mobilenetv2.data.transforms import eval_transform

    images = torch.stack([eval_transform(classifier.preprocess)(predict.read_image(p)) for p in _val_images(five_data, 4)])
    expected = classifier.forward(images).numpy()
    status, answer, _ = server.json("/v2/models/mobilenetv2/infer", {
        "id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(images.shape),
                                "data": images.numpy().reshape(-1).tolist()}]})
    assert status == 200 and answer["id"] == "r1" and answer["outputs"][0]["shape"] == [4, 5]
    logits = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(4, 5)
    assert np.abs(logits - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_classify_gives_predicts_answer_raw_and_multipart(server, model_file, five_data):
    classifier = predict.load_classifier(model_file, runtime_name="onnx")
    paths = _val_images(five_data)
    expected = predict.predict(classifier, paths, topk=3)
    for path, reference in zip(paths, expected):
        status, raw, _ = server.request("/v1/classify?topk=3", path.read_bytes(), {"Content-Type": "image/png"})
        assert status == 200
        answer = json.loads(raw)
        assert [p["class"] for p in answer["predictions"]] == [p["class"] for p in reference["predictions"]]
        assert answer["predictions"][0]["probability"] == pytest.approx(reference["predictions"][0]["probability"],
                                                                        abs=1e-5)
        assert answer["latency_ms"] > 0
    boundary = "xYz"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + paths[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    for media_type in ("multipart/form-data", "Multipart/Form-Data", "MULTIPART/FORM-DATA"):  # case-insensitive
        status, raw, _ = server.request("/v1/classify", form, {"Content-Type": f"{media_type}; boundary={boundary}"})
        assert status == 200, (media_type, raw[:200])
        assert json.loads(raw)["predictions"][0]["class"] == expected[0]["predictions"][0]["class"]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 144 M pixels in a small file
    return buffer.getvalue()


def test_bad_input_is_a_4xx_with_a_json_error_and_the_server_stays_healthy(server, five_data):
    good = _val_images(five_data, 1)[0].read_bytes()
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}
    cases = {
        "not an image": ("/v1/classify", b"plain text, not pixels", 415),
        "truncated": ("/v1/classify", good[: len(good) // 2], 415),
        "decompression bomb": ("/v1/classify", _bomb(), 415),
        "over --max-body-mb": ("/v1/classify", b"\0" * (2 << 20), 413),
        "empty": ("/v1/classify", b"", 400),
        "malformed JSON": ("/v2/models/mobilenetv2/infer", b'{"inputs": [', 400),
        "wrong shape": ("/v2/models/mobilenetv2/infer", json.dumps({"inputs": [{**tensor, "shape": [1, 3, 16, 16]}]}).encode(), 400),
        "wrong dtype": ("/v2/models/mobilenetv2/infer", json.dumps({"inputs": [{**tensor, "datatype": "INT8"}]}).encode(), 400),
        "short data": ("/v2/models/mobilenetv2/infer", json.dumps({"inputs": [{**tensor, "data": [1.0]}]}).encode(), 400),
        "not numbers": ("/v2/models/mobilenetv2/infer", json.dumps({"inputs": [{**tensor, "data": ["a"] * 3072}]}).encode(), 400),
        "no inputs": ("/v2/models/mobilenetv2/infer", b"[]", 400),
        "unknown model": ("/v2/models/resnet/infer", json.dumps({"inputs": [tensor]}).encode(), 404),
    }
    for name, (path, data, expected) in cases.items():
        status, body, headers = server.request(path, data, {"Content-Type": "application/octet-stream"}, method="POST")
        assert status == expected, (name, status, body[:200])
        assert "error" in json.loads(body), name
        assert server.get("/v2/health/ready")[0] == 200, name
    assert server.request("/v1/classify?topk=0", good, method="POST")[0] == 400
    assert server.request("/v1/classify?topk=x", good, method="POST")[0] == 422


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def test_a_thin_image_is_refused_with_415_and_costs_the_server_no_memory(server):
    """A PNG of 100000 x 1 pixels (a few hundred bytes) passes the pixel limit; resized on its short side it would be
    millions of pixels long. It is refused from its size, and the server's peak memory does not move."""
    idle = _peak_rss_mb(server.process.pid)
    for size in ((100_000, 1), (1, 100_000), (60_000, 2)):
        buffer = io.BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
        status, body, _ = server.request("/v1/classify", buffer.getvalue(), {"Content-Type": "image/png"})
        assert status == 415 and "longer than 16:1" in json.loads(body)["error"], (size, status, body[:200])
        assert server.get("/v2/health/ready")[0] == 200
    assert _peak_rss_mb(server.process.pid) - idle < 100


def test_a_form_of_a_hundred_thousand_parts_is_refused_without_stalling_the_server(server, five_data):
    """A form of about 1 MB (under --max-body-mb 1) made of ~100,000 empty parts, and one of 1,000 files: refused
    with a 400 after the few parts a classify form may hold, parsed off the event loop, health answering meanwhile
    within 100 ms; a form with the image and a few fields still classifies."""
    import threading

    boundary = "b"
    empty = f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\r\n".encode()
    bare = f"--{boundary}\r\n\r\n\r\n".encode()  # a part of nine bytes
    many = bare * ((1 << 20) // len(bare) - 1) + f"--{boundary}--\r\n".encode()
    image = _val_images(five_data, 1)[0].read_bytes()
    file_part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    files = file_part * 1000 + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    assert len(many) < (1 << 20) and many.count(bare) > 100_000
    for form in (many, files[: (1 << 20) - 100] + f"\r\n--{boundary}--\r\n".encode()):
        waits, done = [], threading.Event()

        def probe():
            while not done.is_set():
                started = time.perf_counter()
                assert server.get("/v2/health/ready")[0] == 200
                waits.append(time.perf_counter() - started)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            status, body, _ = server.request("/v1/classify", form, headers, method="POST")
        finally:
            done.set()
            prober.join()
        assert status == 400 and "multipart" in json.loads(body)["error"], (status, body[:200])
        assert waits and max(waits) < 0.1, max(waits)
    small = empty * 3 + file_part + f"--{boundary}--\r\n".encode()
    assert server.request("/v1/classify", small, headers, method="POST")[0] == 200
    # a 100 MB field: answered 413 from its declared length at once (the client may still be sending: read the answer
    # from the socket rather than through urllib, which stops at its broken pipe)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
                    f"Content-Length: {100 << 20}\r\n\r\n".encode())
        try:
            raw.sendall(file_part[:4096])
        except OSError:
            pass
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")
    assert server.get("/v2/health/ready")[0] == 200


def test_idle_and_slow_clients_are_closed_and_never_lock_out_health_checks(model_file, five_data):
    """25 sockets that send nothing, against --max-connections 20: closed at --header-timeout-s, after which health
    and a real request are answered (before, every request got 503 for as long as they stayed open); a head sent a
    byte at a time is closed the same way; a body sent ten bytes at a time is a 408 at --body-timeout-s."""
    served = Server(model_file, "--max-connections", "20", "--header-timeout-s", "1", "--idle-timeout-s", "1",
                    "--body-timeout-s", "1")
    idle = []
    try:
        for _ in range(25):
            idle.append(socket.create_connection(("127.0.0.1", served.port)))
        time.sleep(0.3)
        deadline, status = time.time() + 5, None
        while time.time() < deadline and status != 200:
            try:
                status = served.get("/v2/health/ready")[0]
            except OSError:
                status = None
            time.sleep(0.1)
        assert status == 200 and time.time() < deadline
        closed = sum(1 for sock in idle if _closed_by_server(sock))
        assert closed == 25
        image = _val_images(five_data, 1)[0].read_bytes()
        assert served.request("/v1/classify", image, {"Content-Type": "image/png"})[0] == 200
        slow = socket.create_connection(("127.0.0.1", served.port))  # a head a byte at a time
        started = time.time()
        for byte in b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert _closed_by_server(slow) and time.time() - started < 4
        trickle = socket.create_connection(("127.0.0.1", served.port))  # a body ten bytes at a time
        trickle.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        f"Content-Length: {len(image)}\r\n\r\n".encode())
        answer, started = b"", time.time()
        trickle.settimeout(0.1)
        for start in range(0, len(image), 10):
            try:
                trickle.sendall(image[start:start + 10])
                answer += trickle.recv(4096)
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                break
            if answer or time.time() - started > 5:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert served.get("/v2/health/ready")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        served.stop()


def _closed_by_server(sock, wait: float = 3.0) -> bool:
    """Whether the server closed `sock` (an end of file, or a reset) within `wait` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except (socket.timeout, OSError):
        return False


def test_a_body_over_the_limit_gets_its_413_even_when_the_client_sends_it_slowly(server):
    """The server reads and drops an over-long body (up to twice the limit) before it answers 413: a client still
    sending when it closed would get a reset connection instead of the answer (seen with urllib under load, which
    asks for `Connection: close`)."""
    body = b"\0" * (3 << 19)  # 1.5 MiB against --max-body-mb 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
        connection.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                           "Connection: close\r\n"
                           "Content-Type: application/octet-stream\r\n\r\n".encode())
        time.sleep(0.5)  # long enough for a server that answers on the headers alone to answer and close
        for start in range(0, len(body), 64 << 10):
            connection.sendall(body[start:start + (64 << 10)])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert "over --max-body-mb 1" in json.loads(payload)["error"]
    assert server.get("/v2/health/ready")[0] == 200


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_64_clients_20_requests_each_no_errors_and_batches_form(server, five_data):
    images = [p.read_bytes() for p in _val_images(five_data, 8)]
    before = server.get("/metrics")[1].decode()
    count_before = _metric(before, "mobilenetv2_batch_size_count")

    def client(index):
        codes = []
        for i in range(20):
            status, _, _ = server.request("/v1/classify", images[(index + i) % len(images)], method="POST")
            codes.append(status)
        return codes

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        codes = [code for result in pool.map(client, range(64)) for code in result]
    assert len(codes) == 1280 and set(codes) == {200}
    text = server.get("/metrics")[1].decode()
    batches = _metric(text, "mobilenetv2_batch_size_count") - count_before
    images_run = _metric(text, "mobilenetv2_batch_size_sum") - _metric(before, "mobilenetv2_batch_size_sum")
    assert images_run == 1280
    assert batches < 1280  # some model calls served several requests
    assert _metric(text, "mobilenetv2_requests_total", 'code="200",endpoint="/v1/classify"') >= 1280
    assert "mobilenetv2_request_seconds_bucket" in text and "mobilenetv2_queue_images" in text


def test_a_full_queue_answers_503_with_retry_after(model_file, five_data):
    served = Server(model_file, "--max-batch", "1", "--max-queue", "1", "--max-delay-ms", "0", "--runtime", "torch")
    try:
        image = _val_images(five_data, 1)[0].read_bytes()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: served.request("/v1/classify", image, method="POST"), range(96)))
        refused = [{k.lower(): v for k, v in headers.items()} for status, _, headers in answers if status == 503]
        assert refused and all(h.get("retry-after") == "1" for h in refused)
        assert {status for status, _, _ in answers} <= {200, 503}
    finally:
        served.stop()


def test_sigterm_finishes_what_is_in_flight_and_exits_0(model_file, five_data):
    """REST and gRPC requests waiting in one batch when SIGTERM comes: all answered, then exit 0."""
    grpc_client = pytest.importorskip("tritonclient.grpc")
    from live_server import _free_port

    grpc_port = _free_port()
    served = Server(model_file, "--max-delay-ms", "1500", "--max-batch", "64", "--grpc-port", str(grpc_port))
    image = _val_images(five_data, 1)[0].read_bytes()

    def remote():
        with grpc_client.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = grpc_client.InferInput("input", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
            return 200 if client.infer("mobilenetv2", [tensor]).as_numpy("logits").shape == (1, 5) else 0, b"", {}

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        pending = [pool.submit(served.request, "/v1/classify", image, None, "POST") for _ in range(8)]
        pending += [pool.submit(remote) for _ in range(4)]
        time.sleep(0.5)  # the requests wait for their batch to fill
        started = time.time()
        served.process.terminate()  # SIGTERM
        answers = [future.result() for future in pending]
    assert [status for status, _, _ in answers] == [200] * 12
    served.process.join(15)
    assert served.process.exitcode == 0
    assert time.time() - started < 10
    served.stop()


def _browser(folder: Path):
    """Headless Chromium through its WebDriver (Debian's chromium and chromium-driver; `make test` installs them),
    its profile and temporary files in `folder` (otherwise it leaves an org.chromium.Chromium.* folder in /tmp).
    `folder` must be short: Chromium's SingletonSocket lives in it, and a socket path has at most 107 bytes."""
    import os
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("chromium and chromium-driver are not installed (make test installs them as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", f"--user-data-dir={folder / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver, env={**os.environ, "TMPDIR": str(folder)}), options=options)


def test_the_page_classifies_a_picked_image_in_a_real_browser(server, model_file, five_data):
    import shutil
    import tempfile

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status, page = server.get("/")
    assert status == 200 and b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere
    path = _val_images(five_data, 1)[0]
    expected = predict.predict(predict.load_classifier(model_file, runtime_name="onnx"), [path], topk=5)[0]
    folder = Path(tempfile.mkdtemp(prefix="mnv2-chromium-", dir="/tmp"))
    try:
        browser = _browser(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda b: "(" in b.find_element(By.ID, "model").text)
        assert browser.find_element(By.ID, "model").text == "mobilenetv2 (onnxruntime_onnx)"
        browser.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.body.dataset.done") == "1")
        rows = browser.find_elements(By.CSS_SELECTOR, ".prediction")
        assert len(rows) == 5
        shown = [row.find_element(By.CLASS_NAME, "name").text for row in rows]
        assert shown == [p["class"] for p in expected["predictions"]]
        top = rows[0].find_element(By.CLASS_NAME, "probability").text
        assert top == f"{100 * expected['predictions'][0]['probability']:.1f} %"
        widths = [float(row.find_element(By.CLASS_NAME, "bar").get_attribute("style").split("width:")[1]
                        .split("%")[0]) for row in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
        assert "ms" in browser.find_element(By.ID, "status").text
        origins = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
        assert origins and set(origins) == {server.url}
        # a photo stored sideways with its EXIF orientation (as phones save portraits): classified upright
        sideways = Path(model_file).with_name("sideways.png")
        tag = Image.Exif()
        tag[0x0112] = 6  # turn a quarter clockwise to view
        with Image.open(path) as upright:
            upright.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(sideways, exif=tag.tobytes())
        browser.execute_script("document.body.dataset.done = ''")
        browser.find_element(By.ID, "file").send_keys(str(sideways))
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.body.dataset.done") == "1")
        rows = browser.find_elements(By.CSS_SELECTOR, ".prediction")
        assert [row.find_element(By.CLASS_NAME, "name").text for row in rows] == shown
        assert rows[0].find_element(By.CLASS_NAME, "probability").text == top
        # a file that is no image: the page shows the server's error instead of bars
        bad = Path(model_file).with_name("notes.txt")
        bad.write_text("not an image")
        browser.execute_script("document.body.dataset.done = ''")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(browser, 30).until(lambda b: "error" in b.find_element(By.ID, "status").get_attribute("class"))
        assert "not a readable image" in browser.find_element(By.ID, "status").text
        assert browser.find_elements(By.CSS_SELECTOR, ".prediction") == []
    finally:
        browser.quit()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_request_that_waits_past_its_timeout_gets_504_and_bad_options_one_line(model_file, five_data, capsys):
    from conftest import one_line_exit_2

    served = Server(model_file, "--max-delay-ms", "3000", "--max-batch", "64", "--timeout-s", "0.3")
    try:
        image = _val_images(five_data, 1)[0].read_bytes()
        status, body, _ = served.request("/v1/classify", image, method="POST")  # its batch waits 3 s to fill
        assert status == 504 and "0.3 s" in json.loads(body)["error"]
        assert served.get("/v2/health/ready")[0] == 200
    finally:
        served.stop()
    for extra in (["--runtime", "onnx-int8"], ["--runtime", "tensorrt"], ["--max-batch", "0"],
                  ["--max-queue", "4", "--max-batch", "8"]):
        line = one_line_exit_2(capsys, ["serve", "--checkpoint", str(model_file), *extra])
        assert "--" in line
