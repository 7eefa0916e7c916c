"""Published weights by name: torch.hub's and the Hugging Face hub's real download code against a loopback server,
the published hash checked (a wrong file is refused, downloaded or cached), and offline use from the cache."""

import hashlib
import http.server
import io
import threading

import pytest
import torch

from conftest import cli_run, one_line_exit_2
from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.config import Preprocess
from mobilenetv2.interop import published


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` (path -> (bytes, headers)) and logs what was asked; anything else is a 404."""

    def _answer(self, body: bool):
        self.server.requests.append((self.command, self.path))
        entry = self.server.files.get(self.path.split("?")[0])
        if entry is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, headers = entry
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _photo_batch(photos):
    images = [torch.from_numpy(photos[name][:224, :224].copy()).permute(2, 0, 1) for name in ("astronaut", "coffee")]
    return (torch.stack(images).float() / 255 - 0.45) / 0.225


@pytest.fixture
def torchvision_entry(monkeypatch, tmp_path):
    """A torchvision MobileNetV2 (width 0.5, trained BatchNorm statistics stand-in) published under a test name,
    its file named with the prefix of its own sha256 as torchvision's are."""
    import torchvision

    torch.manual_seed(0)
    network = torchvision.models.mobilenet_v2(width_mult=0.5).eval()
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    data = buffer.getvalue()
    name = f"mobilenet_v2-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    entry = published.Published("torchvision", name, Preprocess(image_size=224, resize_size=232))
    monkeypatch.setitem(published.PUBLISHED, "torchvision:TEST", entry)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return network, data, name, tmp_path / "torch-home" / "hub" / "checkpoints" / name


def test_torchvision_weights_download_once_checked_then_work_offline(server, torchvision_entry, monkeypatch,
                                                                      tmp_path, photos):
    network, data, name, cached = torchvision_entry
    server.files[f"/models/{name}"] = (data, {})
    monkeypatch.setenv("MOBILENETV2_TORCHVISION_URL", server.url + "/models")
    assert main(["convert", "torchvision:TEST", "--output", str(tmp_path / "a.pt")]) == 0
    assert cached.read_bytes() == data and server.requests == [("GET", f"/models/{name}")]
    model = load_model(tmp_path / "a.pt")
    assert model.preprocess.resize_size == 232  # the publisher's contract travels with the weights
    images = _photo_batch(photos)
    with torch.no_grad():
        assert torch.allclose(model(images), network(images), atol=1e-5)
    monkeypatch.setenv("MOBILENETV2_TORCHVISION_URL", "http://127.0.0.1:9/unreachable")  # offline now
    assert main(["convert", "torchvision:TEST", "--output", str(tmp_path / "b.pt")]) == 0
    from PIL import Image

    Image.fromarray(photos["chelsea"]).save(tmp_path / "cat.png")
    for engine in ("torch", "onnx"):  # onnx: its export is cached beside the file in torch.hub's cache
        assert main(["predict", "--checkpoint", "torchvision:TEST", str(tmp_path / "cat.png"), "--runtime", engine,
                     "--json"]) == 0
    assert list(cached.parent.glob(".mobilenetv2-cache/*.onnx"))
    assert len(server.requests) == 1


def test_a_torchvision_file_that_does_not_match_its_hash_is_refused(server, torchvision_entry, monkeypatch,
                                                                      tmp_path, capsys):
    _network, data, name, cached = torchvision_entry
    server.files[f"/models/{name}"] = (data[:-1] + bytes([data[-1] ^ 1]), {})  # one bit off
    monkeypatch.setenv("MOBILENETV2_TORCHVISION_URL", server.url + "/models")
    line = one_line_exit_2(capsys, ["convert", "torchvision:TEST", "--output", str(tmp_path / "a.pt")])
    assert "sha256" in line and not cached.exists()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(data[:1000])  # a damaged file in the cache
    assert "sha256" in one_line_exit_2(capsys, ["convert", "torchvision:TEST", "--output", str(tmp_path / "a.pt")])
    assert not (tmp_path / "a.pt").exists()


def test_offline_and_not_cached_names_the_file_and_where_to_put_it(torchvision_entry, monkeypatch, dataset, tmp_path,
                                                                  capsys):
    _network, _data, name, cached = torchvision_entry
    monkeypatch.setenv("MOBILENETV2_TORCHVISION_URL", "http://127.0.0.1:9/unreachable")
    line = one_line_exit_2(capsys, ["train", "--data", str(dataset), "--output", str(tmp_path / "run"),
                                    "--pretrained", "torchvision:TEST"])
    assert name in line and str(cached) in line
    assert "IMAGENET1K_V2" in one_line_exit_2(capsys, ["convert", "torchvision:IMAGENET9", "--output", "x.pt"])


def test_fine_tuning_from_published_weights(server, torchvision_entry, monkeypatch, dataset, tmp_path, capsys):
    _network, data, name, _cached = torchvision_entry
    server.files[f"/models/{name}"] = (data, {})
    monkeypatch.setenv("MOBILENETV2_TORCHVISION_URL", server.url + "/models")
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--pretrained",
                 "torchvision:TEST", "--filter-head", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                 "--max-steps", "1", "--workers", "0", "--eval-every", "0"]) == 0
    assert "loaded the backbone of torchvision:TEST" in capsys.readouterr().out


def _hub(args, env, cwd):
    """`mobilenetv2 ARGS` in a process of its own, so the Hugging Face client reads HF_ENDPOINT / HF_HOME from `env`
    (it is first imported there)."""
    return cli_run(args, env, cwd, timeout=120)


def test_timm_weights_through_the_hugging_face_hub(server, tmp_path, photos):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save

    torch.manual_seed(1)
    network = timm.create_model("mobilenetv2_050", pretrained=False).eval()
    data = save(network.state_dict())
    sha = hashlib.sha256(data).hexdigest()
    path = "/timm/mobilenetv2_050.lamb_in1k/resolve/main/model.safetensors"
    headers = {"X-Repo-Commit": "c" * 40, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
    server.files[path] = (data, headers)
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = _hub(["convert", "timm:mobilenetv2_050.lamb_in1k", "--output", str(tmp_path / "a.pt")], env, tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    model = load_model(tmp_path / "a.pt")
    assert (model.preprocess.interpolation, model.preprocess.resize_size) == ("bicubic", 256)
    images = _photo_batch(photos)
    with torch.no_grad():
        assert torch.allclose(model(images), network(images), atol=1e-5)
    downloads = [request for request in server.requests if request == ("GET", path)]
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    result = _hub(["convert", "timm:mobilenetv2_050.lamb_in1k", "--output", str(tmp_path / "b.pt")], offline, tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    assert [request for request in server.requests if request == ("GET", path)] == downloads
    # a server whose file does not match the sha256 it publishes, into an empty cache: refused
    server.files[path] = (data[:-1] + bytes([data[-1] ^ 1]), headers)
    refused = _hub(["convert", "timm:mobilenetv2_050.lamb_in1k", "--output", str(tmp_path / "c.pt")],
                   {**env, "HF_HOME": str(tmp_path / "hf2")}, tmp_path)
    assert refused.returncode == 2 and "sha256" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    missing = _hub(["convert", "timm:mobilenetv2_100.ra_in1k", "--output", str(tmp_path / "d.pt")], offline, tmp_path)
    assert missing.returncode == 2 and "model.safetensors" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
