"""The bench harness itself (CPU, tiny model): JSON schema, every ladder rung present or skipped with a reason,
speedups recomputed from the repeats in the JSON, the table printed last."""

import json
import statistics

import pytest
from fastp2p.bench import cli, ladder

ENV_KEYS = {"device", "cpu", "cores", "gpu", "driver", "torch", "triton", "dali", "tensorrt", "git_sha"}
MEASURED_KEYS = {"ms_per_iter", "img_per_s", "speedup", "peak_mem_mb", "setup_s", "repeats_s"}


def _check_speedups(rows):
    by = {r["rung"]: r for r in rows}
    for r in rows:
        if r["skipped"]:
            assert isinstance(r["skipped"], str) and len(r["skipped"]) > 10, r
            continue
        assert MEASURED_KEYS <= r.keys(), r
        assert r["repeats_s"] and all(t > 0 for t in r["repeats_s"])
        med = statistics.median(r["repeats_s"])
        assert r["ms_per_iter"] == pytest.approx(med * 1e3, rel=1e-9)
        assert r["img_per_s"] == pytest.approx(r["items"] / med, rel=1e-9)
        base = by[r["baseline"]]
        assert r["speedup"] == pytest.approx(statistics.median(base["repeats_s"]) / med, rel=1e-9)
        if r["rung"] == r["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)


def test_train_ladder_json_and_table(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["train", "--tiny", "--device", "cpu", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["schema"] == "fastp2p.bench/1"
    assert ENV_KEYS <= res["env"].keys()
    assert res["env"]["device"] == "cpu" and res["env"]["gpu"] is None
    assert res["matmul_peaks"]["fp32"] > 0
    assert res["config"]["plan"]["tiny"] is True and "train:b1" in res["config"]["train"]
    rows = res["rows"]
    for bs in res["config"]["plan"]["batches"]:
        names = [r["rung"] for r in rows if r["group"] == f"train:b{bs}"]
        assert names[: len(ladder.TRAIN_RUNGS) - 1] == [f"train:b{bs}:{n}" for n in ladder.TRAIN_RUNGS[:-1]]
        assert set(names) == {f"train:b{bs}:{n}" for n in ladder.TRAIN_RUNGS}
        g = {r["rung"].rsplit(":", 1)[1]: r for r in rows if r["group"] == f"train:b{bs}"}
        assert g["baseline"]["skipped"] is None and g["fastp2p"]["skipped"] is None
        for gpu_only in ("triton", "cuda-graphs", "dali-gpu-cache"):
            assert g[gpu_only]["skipped"]
        assert g["baseline"]["flops_per_iter"] > 0 and g["baseline"]["tflops"] > 0
        for r in g.values():
            if not r["skipped"]:
                assert r["pct_matmul_peak"] == pytest.approx(
                    100 * r["flops_per_iter"] / statistics.median(r["repeats_s"]) / 1e9
                    / res["matmul_peaks"][r["peak_key"]], rel=1e-9)
    _check_speedups(rows)
    # the table is the last thing printed, one line per row
    lines = printed.rstrip().splitlines()
    assert lines[-len(rows) - 2].startswith("group")
    assert lines[-1].startswith("train:b2") and "data-included" in lines[-1]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_data_and_kernels_sections(tmp_path, capsys):
    out = tmp_path / "d.json"
    plan = ladder.Plan.make("cpu", quick=True, tiny=True)
    res = ladder.run_bench("kernels", plan, log=lambda m: None)
    (k,) = res["rows"]
    assert k["skipped"].startswith("GPU only")
    data_rows, _ = ladder.run_data(plan, log=lambda m: None)
    if data_rows[0]["skipped"]:
        pytest.skip(data_rows[0]["skipped"])
    names = [r["rung"].rsplit(":", 1)[1] for r in data_rows]
    assert names == ["reference-pil", "fastp2p-loader", "dali-cpu", "gpu-cache-cpu", "dali-cuda", "gpu-cache-cuda"]
    by = {n: r for n, r in zip(names, data_rows, strict=True)}
    assert not by["gpu-cache-cpu"]["skipped"]  # runs on host tensors here
    assert by["dali-cuda"]["skipped"] and by["gpu-cache-cuda"]["skipped"]  # no GPU on this machine
    from fastp2p.data.backends import dali_available

    assert bool(by["dali-cpu"]["skipped"]) != dali_available()
    _check_speedups(data_rows)
    out.write_text(json.dumps(data_rows))


def test_subcommand_wiring():
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    cli.add_bench_subcommand(sub)
    args = p.parse_args(["bench", "all", "--quick", "--device", "cpu", "--json", "x.json", "--plot", "x.png"])
    assert args.func is cli.run and args.section == "all" and args.quick and args.json == "x.json"


# -- infer: deployment rungs (issue 16) ------------------------------------------------------------------------------
DEPLOY = {("torch-eager", "fp32"), ("fastp2p", "fp32"), ("fastp2p", "bf16"), ("onnxruntime", "fp32"),
          ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")}


def test_infer_models_random_weights():
    plan = ladder.Plan.make("cpu", quick=True, tiny=True)
    models = ladder.infer_models(plan, log=lambda m: None)
    assert [m.name for m in models] == [f"unet_256-ngf{n}" for n in ladder.TINY_NGF]
    assert all(m.weights == "random" and m.cfg is None for m in models)
    assert models[0].params > models[1].params > models[2].params > 0
    # halving ngf divides the inner convs' FLOPs by 4 and the first/last (3-channel) ones by 2
    for big, small in zip(models, models[1:], strict=False):
        assert 2 < big.gflop_per_image / small.gflop_per_image <= 4


def test_busy_neighbours_are_stopped():
    with ladder.busy_neighbours(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_infer_only_flags_are_refused_elsewhere(capsys, tmp_path):
    assert cli.main(["train", "--tiny", "--neighbours", "1"]) == 2
    assert "--neighbours" in capsys.readouterr().err
    assert cli.main(["infer", "--tiny", "--teacher", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "missing.safetensors" in err


def test_infer_deployment_rungs(tmp_path):
    """The whole infer section at --tiny, in its own process (OpenVINO once crashed a shared pytest process), with
    checkpoints for the teacher and one student and one busy neighbour; asserts on its JSON and its table."""
    import subprocess
    import sys

    from fastp2p.checkpoint import save
    from fastp2p.config import Config, DataConfig, ModelConfig
    from fastp2p.models import build_generator

    ckpts = {}
    for role, ngf in (("teacher", 8), ("student", 2)):
        cfg = Config(ModelConfig(netG="unet_256", ngf=ngf), DataConfig(direction="BtoA"))
        ckpts[role] = save(tmp_path / f"{role}.safetensors", cfg=cfg, G=build_generator("unet_256", 3, 3, ngf))
    out = tmp_path / "infer.json"
    p = subprocess.run([sys.executable, "-m", "fastp2p.bench.cli", "infer", "--tiny", "--neighbours", "1",
                        "--teacher", str(ckpts["teacher"]), "--students", str(ckpts["student"]), "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = [r for r in res["rows"] if r["section"] == "infer"]
    _check_speedups(rows)
    teacher, student = "unet_256-ngf8", "unet_256-ngf2"
    cfg = res["config"]["infer"]
    assert [m["name"] for m in cfg["models"]] == [teacher, student] and cfg["neighbours"] == 1
    try:
        import openvino  # noqa: F401
        have_ov = True
    except ImportError:
        have_ov = False
    for bs in (1, 2):
        group = [r for r in rows if r["batch"] == bs]
        assert all(r["neighbours"] == 1 for r in group)
        assert all(r["baseline"] == f"infer:b{bs}:torch-eager" for r in group if r["runtime"] != "tensorrt")
        for model, ngf in ((teacher, 8), (student, 2)):
            mine = {(r["runtime"], r["precision"]): r for r in group if r["model"] == model}
            assert DEPLOY <= mine.keys(), DEPLOY - mine.keys()
            for r in mine.values():
                assert r["weights"] == str(ckpts["teacher" if ngf == 8 else "student"])
                assert r["params"] > 0 and r["gflop_per_image"] > 0
            assert mine[("fastp2p", "bf16")]["skipped"]  # --tiny compiles nothing
            assert mine[("torch-eager", "fp32")]["max_abs_err"] == 0
            for key in (("fastp2p", "fp32"), ("onnxruntime", "fp32")) + ((("openvino", "fp32"),) if have_ov else ()):
                assert not mine[key]["skipped"] and mine[key]["max_abs_err"] < 1e-4, mine[key]  # fp32 reorderings
            int8 = [mine[("onnxruntime", "int8")]] + ([mine[("openvino", "int8")]] if have_ov else [])
            for r in int8:  # lossy, but within a few int8 steps of an output in [-1, 1]
                assert not r["skipped"], r
                assert 0 < r["max_abs_err"] < 0.05 and "calibrated on" in r["note"]
            if have_ov and bs == 2:  # both OpenVINO hints measured at the larger batch, the faster kept
                ov = mine[("openvino", "int8")]["note"]
                assert ov.startswith(("hint latency (", "hint throughput (")) and "vs throughput" in ov
        t, s = (next(r for r in group if r["model"] == m) for m in (teacher, student))
        assert s["params"] < t["params"] and s["gflop_per_image"] < t["gflop_per_image"]
    assert any(t.startswith("targets (issue 16; checkpoint weights; 1 busy neighbour(s)") for t in cfg["targets"])
    assert any(t.startswith(f"  student {student} b1, fastest") for t in cfg["targets"])
    # the table is printed last, grouped by batch, each line within 120 columns
    lines = p.stdout.rstrip().splitlines()
    assert lines[-1] == cfg["targets"][-1]
    assert "batch 1 (neighbours: 1)" in lines and "batch 2 (neighbours: 1)" in lines
    table = lines[lines.index("batch 1 (neighbours: 1)"):]
    assert all(len(line) <= 120 for line in table if not line.startswith("  "))
