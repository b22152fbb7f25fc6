"""The accelerator benchmark runs every section at toy size on the CPU, and its checks hold.

``benchmarks/accelerator.py`` is what a lent GPU or TPU runs; here it runs ``--tiny`` in this process (on the
fake CPU devices), so a broken section is found before device time is spent on it. The asserted values are
the benchmark's own cross-checks: a run's accuracy matrix does not depend on how many runs share its
program, and the 64-run sweep gives the same matrices as the runs one at a time.
"""

import importlib.util
import json
import math
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
# About a minute of compilation on a 2-core CPU: `make test-all` runs it, `make test` (CI) does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("accelerator_bench", ROOT / "benchmarks" / "accelerator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("acc") / "accelerator.json"
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction mixes float and int32
        report = module.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    return report


def rows(report, prefix):
    return [r for r in report["rows"] if r["workload"].startswith(prefix)]


def test_every_section_ran(report):
    assert not [r for r in report["rows"] if "skipped" in r]
    assert [r["workload"] for r in rows(report, "permuted")] == [
        "permuted MNIST naive, 1 seeds",
        "permuted MNIST naive, 3 seeds",
    ]
    assert len(rows(report, "EWC sweep")) == 1
    assert len(rows(report, "MAML")) == 2
    assert rows(report, "deltanet training")
    assert report["device"].startswith("cpu")
    for line in ("permuted MNIST naive, 3 seeds", "EWC sweep, 4 runs", "MAML sinusoid, first order"):
        assert line in report["table"]


def test_a_run_does_not_depend_on_its_program(report):
    for r in rows(report, "permuted"):
        assert r["seed0_max_abs_diff"] <= 1e-6
        assert 0.0 <= r["final_avg_acc"] <= 1.0
    (sweep,) = rows(report, "EWC sweep")
    assert sweep["max_abs_acc_difference"] <= 1e-6


def test_rates_are_measured(report):
    for r in rows(report, "MAML"):
        assert r["nestlearn_it_per_s"] > 0 and math.isfinite(r["first_call_s"])
    for r in rows(report, "deltanet training"):
        assert r["chunk_tokens_per_s"] > 0 and r["token_tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["chunk_tokens_per_s"] / r["token_tokens_per_s"])
