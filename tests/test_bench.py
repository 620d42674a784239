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
