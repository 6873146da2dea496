"""benchmarks/gpu.py runs end to end in its CPU dry run, so a GPU session does not find its Python errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def test_cpu_dry_run_writes_every_section(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CORPUS_MASK_KERNEL"}  # the script sets the path itself
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_dry_run.json"]  # never gpu.json
    report = json.loads((tmp_path / "gpu_dry_run.json").read_text(encoding="utf-8"))

    assert report["dry_run"] is True and "meaningless" in report["note"]
    assert report["machine"]["gpu"] is None
    assert {"triton_kernel", "gpu_ops_per_call", "positions_path_syncs_host", "smoke_training"} <= set(
        report["skipped"]
    )
    lengths = report["sizes"]["lengths"]
    target = str(lengths[-1])
    assert report["corpus"]["tokens"] >= report["sizes"]["tokens"]

    loader = report["loader"]
    timed = [r for r in loader if "samples_per_s" in r]
    variants = {"windows", "packed, no mask", "packed + mask built on the CPU", *report["mask_cost_on_device"]}
    assert {(r["max_length"], r["variant"]) for r in timed} == {(n, v) for n in lengths for v in variants}
    assert all(r["samples_per_s"] > 0 and len(r["rounds"]) == report["sizes"]["rounds"] for r in timed)
    alone = [r for r in loader if "device_us" in r]
    assert len(alone) == len(lengths) * 3
    assert all(r["host_us"] > 0 and r["loader_batch_us"] > 0 for r in alone)

    assert all(set(cost) == {str(n) for n in lengths} for cost in report["mask_cost_on_device"].values())
    assert report[f"mask_cost_{target}_best"]["variant"] in report["mask_cost_on_device"]
    assert isinstance(report[f"mask_cost_{target}_met"], bool)

    check = report["kernel_check"]
    assert check["masks_checked"] > 0 and check["all_equal"] == {"triton": True, "positions": True}
    ops_key = f"gpu_ops_per_call_{report['sizes']['check_lengths'][-1]}"
    assert check[ops_key] == {"positions": None, "triton": None, "torch": None}
    assert check["positions_path_syncs_host"] is None

    for path in ("positions", "triton"):
        diffs = report["packed_equivalence"][path]
        assert diffs["max_abs_diff_fp32"] < 1e-4 and diffs["max_abs_diff_bf16"] < 0.1

    scan = report["scan"]
    assert scan["samples"] == report["sizes"]["scan_samples"] and scan["scanned_params"] > 0
    assert scan["max_abs_cosine_diff"] < 1e-6 and scan["flagged_gpu"] == scan["flagged_cpu"]
