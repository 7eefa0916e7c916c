"""int8 ONNX (quantize), per-image agreement (eval --compare), ExecuTorch, torchvision/timm weights out, bench."""

import json

import pytest
import torch

from conftest import MS_INPUT, assert_parity, one_line_exit_2, openvino_present, skip_unless_installed
from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.deploy.timing import cpu_description
from mobilenetv2.errors import UserError


@pytest.fixture(scope="module")
def five_data(pretrained_five):
    return pretrained_five.parents[2] / "data"


@pytest.fixture(scope="module")
def five_48(five_data, tmp_path_factory):
    """The demo's shape (width 0.5, 48 px) trained on five Fashion-MNIST classes in about ten seconds (95 % top-1
    measured). The 0.25-width, 32 px network of the other tests lost 3-4 points in int8 with every calibration tried
    (MinMax, percentile, entropy; first and last layers kept in fp32): too few channels to quantize well."""
    run = tmp_path_factory.mktemp("five_48") / "run"
    assert main(["train", "--data", str(five_data), "--output", str(run), "--width-mult", "0.5", "--image-size", "48",
                 "--workers", "0", "--log-every", "1000", "--batch-size", "20", "--epochs", "20", "--lr-max", "0.03",
                 "--min-scale", "0.5", "--color-jitter", "0", "--eval-every", "20", "--in-memory", "--seed", "2"]) == 0
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def int8_five(five_48, five_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "five.int8.onnx"
    assert main(["quantize", "--checkpoint", str(five_48), "--data", str(five_data), "--output", str(output),
                 "--calibration-images", "100", "--workers", "0"]) == 0
    return output


def test_int8_keeps_top1_within_two_points_and_says_so_in_its_metadata(int8_five, five_48, five_data, capsys):
    from mobilenetv2.deploy.quantize import quantization_record

    record = quantization_record(int8_five)
    assert record["calibration_images"] == 100 and record["evaluated_images"] == 100
    assert record["fp32_top1"] - record["int8_top1"] <= 0.02, record
    assert record["fp32_top1"] > 0.8  # a model that learned something, or the comparison means little
    # the fp32 figure is the checkpoint's own top-1, as eval measures it alone
    assert main(["eval", "--data", str(five_data), "--checkpoint", str(five_48), "--workers", "0"]) == 0
    assert f"'acc': {record['fp32_top1']}" in capsys.readouterr().out
    # eval reads the int8 file like any model and finds the top-1 the metadata records
    assert main(["eval", "--data", str(five_data), "--checkpoint", str(int8_five), "--workers", "0"]) == 0
    assert f"'acc': {record['int8_top1']}" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(int8_five), str(next((five_data / "val" / "Bag").iterdir()))]) == 0
    assert "Bag" in capsys.readouterr().out


def test_the_int8_file_holds_no_constant_that_nothing_reads(int8_five):
    """Quantization folds each ReLU6 into its QDQ range and left the clip's bounds behind: 70 dead constants in the
    demo's network, a warning line each whenever an engine opened the file."""
    import onnx

    graph = onnx.load(str(int8_five)).graph
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    assert all(read.intersection(node.output) for node in graph.node)
    assert {node.op_type for node in graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


def _fp32_convolutions(path) -> list[bool]:
    """For each Conv node of an ONNX file in graph order: does it take fp32 weights (no DequantizeLinear)?"""
    import onnx

    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [node.input[1] not in dequantized for node in graph.node if node.op_type == "Conv"]


def test_auto_keeps_the_layout_it_timed_faster_and_records_the_timings(int8_five):
    """quantize's default writes both layouts, times them here at batch 32 and keeps the faster: the file's fp32
    convolutions, its metadata and its timings must all name the same layout."""
    from mobilenetv2.deploy.quantize import quantization_record

    record = quantization_record(int8_five)
    rates = record["images_per_s_at_batch_32"]
    assert set(rates) == {"stem", "none", "fp32"} and min(rates.values()) > 0  # the fp32 file timed beside them
    assert record["timed_on"] == cpu_description()  # the choice holds for this CPU, and the file says which
    faster = max(("stem", "none"), key=rates.get)
    assert record["fp32_layers"] == {"stem": ["backbone.0", "backbone.1"], "none": []}[faster]
    fp32_count = 3 if faster == "stem" else 0
    assert _fp32_convolutions(int8_five) == [True] * fp32_count + [False] * (52 - fp32_count)


def test_quantize_says_so_where_int8_runs_slower_than_fp32_here():
    from mobilenetv2.deploy.quantize import speed_note

    # measured on a Zen 4 VM (AVX-512 VNNI) at 48 px: ONNX Runtime's int8 at 0.38x its fp32
    note = speed_note({"stem": 3100.0, "none": 3236.4, "fp32": 8566.6})
    assert note.startswith("int8 runs 0.38x fp32 in ONNX Runtime on this CPU") and "--runtime openvino" in note
    assert speed_note({"stem": 19306.4, "none": 18000.0, "fp32": 12455.7}) is None  # faster (the Intel VM): silent
    assert speed_note({"stem": 1.0, "none": 2.0}) is None and speed_note(None) is None  # fp32 not timed


def test_the_stem_layout_keeps_the_stem_and_first_block_fp32_and_none_keeps_nothing(five_48, tmp_path):
    """The seed's stem (one convolution) and first block (t=1: depthwise and project) stay fp32 with `stem`; every
    other convolution is int8. `none` quantizes them all."""
    from mobilenetv2.checkpoint import load_model
    from mobilenetv2.deploy.export import check_images, export_onnx
    from mobilenetv2.deploy.quantize import write_faster_int8

    model = load_model(five_48).eval()
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, batch_size=1, dynamic_batch=True, onnx_exporter="auto")  # as quantize starts from
    for layout, expected in (("stem", [True] * 3 + [False] * 49), ("none", [False] * 52)):
        int8 = tmp_path / f"{layout}.int8.onnx"
        assert write_faster_int8(model, fp32, int8, lambda: [check_images(model, 2).numpy()], layout) == (layout, None)
        assert _fp32_convolutions(int8) == expected, layout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fp32.onnx", "none.int8.onnx", "stem.int8.onnx"]
    with pytest.raises(UserError, match="keep_fp32"):
        write_faster_int8(model, fp32, tmp_path / "x.onnx", lambda: [], "head")


def test_compare_counts_the_predictions_that_flip(int8_five, five_48, five_data, capsys):
    from mobilenetv2.deploy.predict import compare_models

    agreement = compare_models(five_48, int8_five, five_data / "val", workers=0)
    record = json.loads(json.dumps(agreement.__dict__))
    assert agreement.count == 100 and agreement.flips == agreement.count - agreement.agree
    assert agreement.only_a_correct - agreement.only_b_correct == agreement.a_correct - agreement.b_correct
    assert agreement.agree >= 90, record  # int8 changes few predictions
    assert main(["eval", "--data", str(five_data), "--compare", str(five_48), str(int8_five),
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 agreement {agreement.agree}/100" in out and f"{agreement.flips} predictions flip" in out
    same = compare_models(five_48, five_48, five_data / "val", workers=0)
    assert same.flips == 0 and same.only_a_correct == same.only_b_correct == 0


def test_quantize_and_compare_refuse_bad_input_in_one_line(pretrained_five, five_data, tmp_path, capsys,
                                                           converted):
    import shutil

    no_val = tmp_path / "no_val"
    shutil.copytree(five_data / "train", no_val / "train")
    err = one_line_exit_2(capsys, ["quantize", "--checkpoint", str(pretrained_five), "--data", str(no_val)])
    assert "no val/ folder" in err
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a model")
    one_line_exit_2(capsys, ["quantize", "--checkpoint", str(foreign), "--data", str(five_data)])
    err = one_line_exit_2(capsys, ["eval", "--data", str(five_data), "--compare", str(pretrained_five),
                                   str(converted)])
    assert "different classes" in err or "preprocess differently" in err
    one_line_exit_2(capsys, ["eval", "--data", str(five_data)])  # neither --checkpoint nor --compare


@pytest.fixture(scope="module")
def converted_pte(converted, tmp_path_factory):
    """The seed's network as an ExecuTorch program, and its export's report (an export takes 30-50 s here: once)."""
    pytest.importorskip("executorch.exir")
    from mobilenetv2.deploy.export import export

    output = tmp_path_factory.mktemp("pte") / "model.pte"
    return output, export(load_model(converted), "executorch", output)


def test_executorch_reproduces_the_seeds_logits(converted_pte):
    from mobilenetv2.deploy.mobile import executorch_runner

    output, reports = converted_pte
    assert any("ExecuTorch runtime vs eager, batch 4: max abs difference" in line for line in reports)
    assert_parity(executorch_runner(output)(torch.from_numpy(MS_INPUT)).numpy())


def test_executorch_int8_stays_within_its_tolerance_of_eager(five_48, five_data, tmp_path, capsys):
    pytest.importorskip("executorch.exir")
    output = tmp_path / "five.int8.pte"
    assert main(["export", "--checkpoint", str(five_48), "--format", "executorch", "--int8", "--data",
                 str(five_data), "--calibration-images", "100", "--output", str(output)]) == 0
    assert "(int8) vs eager, 4 photos: max abs difference" in capsys.readouterr().out  # within INT8_TOLERANCE
    one_line_exit_2(capsys, ["export", "--checkpoint", str(five_48), "--format", "executorch", "--int8"])
    parameters = sum(p.numel() for p in load_model(five_48).parameters())
    assert output.stat().st_size < 0.4 * 4 * parameters  # int8 weights: well under the fp32 program's 4 bytes each


@pytest.mark.parametrize("fmt, suffix", [("torchvision", ".pth"), ("torchvision", ".safetensors"),
                                         ("timm", ".pth"), ("timm", ".safetensors")])
def test_weights_go_out_to_torchvision_and_timm(converted, tmp_path, capsys, fmt, suffix):
    """The other libraries load the file strictly, on their own, and give the seed's logits."""
    output = tmp_path / f"weights{suffix}"
    assert main(["export", "--checkpoint", str(converted), "--format", fmt, "--output", str(output)]) == 0
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(output))
    else:
        state = torch.load(output, weights_only=True)
    if fmt == "torchvision":
        from torchvision.models import mobilenet_v2

        network = mobilenet_v2(num_classes=10, width_mult=0.5)
    else:
        import timm

        network = timm.create_model("mobilenetv2_050", num_classes=10, pretrained=False)
    network.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_parity(network.eval()(torch.from_numpy(MS_INPUT)).numpy())


def test_bench_prints_a_row_per_runtime_and_batch(pretrained_five, five_48, int8_five, capsys):
    """Every runtime at each batch; the int8 rows time the file `quantize` wrote (quantizing here is what the
    quantize tests check)."""
    from mobilenetv2.engines.onnx_files import installed, openvino_has_bf16

    openvino = ["openvino"] + (["openvino-bf16"] if openvino_has_bf16() else []) + ["openvino-int8"]
    formats = ["torch", "onnx", "onnx-int8"] + (openvino if installed("openvino") else [])
    assert main(["bench", "--checkpoint", str(five_48), "--int8", str(int8_five), "--formats", ",".join(formats),
                 "--batch-sizes", "1,4", "--seconds", "0.2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["runtime"], row["batch_size"]) for row in rows] == [(n, b) for b in (1, 4) for n in formats]
    assert all(row["images_per_s"] > 0 and row["p90_ms"] >= row["p50_ms"] > 0 for row in rows)
    assert {row["cpu"] for row in rows} == {cpu_description()}
    assert {row["threads"] for row in rows} == {torch.get_num_threads()}
    err = one_line_exit_2(capsys, ["bench", "--checkpoint", str(pretrained_five), "--formats", "tflite"])
    assert "unknown --formats tflite" in err
    assert main(["bench", "--checkpoint", str(five_48), "--int8", str(int8_five), "--batch-sizes", "2", "--seconds",
                 "0.1", "--json"]) == 0  # by default every CPU engine installed here
    assert [row["runtime"] for row in json.loads(capsys.readouterr().out)] == formats


def test_bench_times_the_executorch_program_at_batch_1_on_the_same_threads(converted, converted_pte,
                                                                            pretrained_five, tmp_path, capsys):
    """The .pte given (what `export --format executorch` wrote; bench exports one itself when not given, through the
    same function) is timed at batch 1 only (what a phone runs), with ExecuTorch's pool given torch's threads; one
    of another network, or no program at all, is refused in one line."""
    from mobilenetv2.deploy.mobile import executorch_threads

    pte, _ = converted_pte
    assert main(["bench", "--checkpoint", str(converted), "--formats", "executorch,onnx", "--pte", str(pte),
                 "--batch-sizes", "1,2", "--seconds", "0.1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["runtime"], row["batch_size"]) for row in rows] == [("executorch", 1), ("onnx", 1), ("onnx", 2)]
    assert rows[0]["images_per_s"] > 0 and rows[0]["threads"] == torch.get_num_threads()
    assert executorch_threads() == torch.get_num_threads()  # its pool (all cores by default) got the same threads
    err = one_line_exit_2(capsys, ["bench", "--checkpoint", str(pretrained_five), "--formats", "executorch",
                                   "--pte", str(pte)])
    assert "not this checkpoint's network" in err or "cannot run it" in err
    (tmp_path / "junk.pte").write_bytes(b"not a program" * 100)
    for given in (tmp_path / "junk.pte", tmp_path / "missing.pte"):
        one_line_exit_2(capsys, ["bench", "--checkpoint", str(converted), "--formats", "executorch", "--pte",
                                 str(given)])


@skip_unless_installed("openvino", "OpenVINO is not installed (an extra)")
def test_openvino_runs_the_int8_file_close_to_onnxruntime_and_auto_keeps_onnxruntime(int8_five, five_48):
    from mobilenetv2.deploy.export import INT8_TOLERANCE, check_images
    from mobilenetv2.engines.choose import load_classifier

    images = check_images(load_model(five_48), 8)
    ort, ov = (load_classifier(int8_five, runtime_name=name) for name in ("onnx", "openvino"))
    assert (ort.runtime, ov.runtime) == ("onnx", "openvino")
    expected, actual = ort.forward(images), ov.forward(images)
    scale = max(1.0, float(expected.abs().max()))
    assert float((expected - actual).abs().max()) <= INT8_TOLERANCE * scale
    assert (expected.argmax(1) == actual.argmax(1)).float().mean() >= 0.75
    assert load_classifier(int8_five).runtime == "onnx"  # the engine its recorded top-1 was measured with


def test_auto_keeps_an_int8_file_in_onnxruntime_however_fast_openvino_is(int8_five, monkeypatch):
    from mobilenetv2.engines import choose

    openvino_present(monkeypatch, True)
    monkeypatch.setattr(choose, "_time", lambda candidates, size, batch: {
        name: (1000.0 if name == "openvino" else 10.0) for name in candidates})
    assert choose.load_classifier(int8_five).runtime == "onnx"  # the engine its recorded top-1 was measured with


def test_bench_names_the_cpu_and_its_int8_instructions(pretrained_five, capsys):
    """int8 is fast only where the CPU multiplies int8 in one instruction (VNNI, Arm dot product): a bench table
    says which this CPU has, read from the first processor's entry of /proc/cpuinfo."""
    zen4 = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: amx_int8\n")
    assert "AMD EPYC 9R14" in cpu_description(zen4)
    assert cpu_description(zen4).endswith("int8 dot-product instructions: AVX-512 VNNI")
    zen3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx_vnni_not_this\n"
    assert cpu_description(zen3).endswith("int8 dot-product instructions: none")
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n"
    assert cpu_description(arm).endswith("Arm dot product, Arm I8MM")
    assert cpu_description("").endswith("none (not listed by this OS)")
    assert torch.backends.cpu.get_cpu_capability() in cpu_description("")
    assert main(["bench", "--checkpoint", str(pretrained_five), "--formats", "onnx", "--batch-sizes", "1",
                 "--seconds", "0.1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"CPU: {cpu_description()}"


def test_bench_interleaves_the_runtimes_so_a_slow_spell_falls_on_all(monkeypatch):
    """A machine that slows down part-way through must not favour the runtime measured first: each runtime is timed
    in ROUNDS rounds taken in turn, and its throughput is its images over the time its calls took."""
    import time

    from mobilenetv2.deploy import bench as bench_module
    from mobilenetv2.deploy.timing import ROUNDS
    from mobilenetv2.model import MobileNetV2

    order, clock = [], [0.0]

    def fake(name, cost):
        def run(images):
            order.append(name)
            clock[0] += cost * (3 if len(order) > 40 else 1)  # the machine slows down after 40 calls

        return run

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench_module, "agreement", lambda model, found: dict.fromkeys(found, ""))  # counts no calls
    monkeypatch.setattr(bench_module, "runners",
                        lambda model, runtimes, folder, threads, int8, pte, tflite: {
                            "onnx": fake("onnx", 0.002), "onnx-int8": fake("onnx-int8", 0.001)})
    rows = bench_module.bench(MobileNetV2(num_classes=3, width_mult=0.25), ["onnx", "onnx-int8"], [2], seconds=0.1)
    timed = order[6:]  # after three warm-up calls each
    segments = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]
    assert segments == ["onnx", "onnx-int8"] * ROUNDS
    rate = {row.runtime: row.images_per_s for row in rows}
    # the true ratio despite the slow spell (timed one runtime after the other, it would read 0.67)
    assert rate["onnx-int8"] / rate["onnx"] == pytest.approx(2.0, rel=0.1)
