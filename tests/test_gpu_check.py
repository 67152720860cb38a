"""scripts/gpu_check.py on a CPU: the no-GPU exit, the dry-run plan and report, offline installs from a wheel
folder, benchmark rows and their "not run (reason)" rows, test counts. (On a GPU it runs tests/test_gpu.py.)"""
from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU path does not apply")
def test_without_a_gpu_it_says_so_and_exits_0(gpu_check, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert gpu_check.main(["--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["gpu"] is False and report["rows"] == []
    assert [s["name"] for s in report["stages"]] == ["env", "gpu"]
    assert "no CUDA GPU" in report["stages"][1]["detail"]
    assert "no CUDA GPU" in capsys.readouterr().out


def test_dry_run_on_cpu_writes_the_plan(gpu_check, tmp_path, capsys):
    report_path = tmp_path / "out" / "report.json"
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert set(stages) == {"env", "install", "tests", "bench"}
    assert "pytest -q -rs -m gpu tests" in stages["tests"]["detail"]
    assert len(report["rows"]) == len(gpu_check.BENCHMARKS)
    for row in report["rows"]:  # each planned command follows the benchmark contract (or the script is absent)
        assert row["status"].startswith(("not run (dry run:", "not run (script missing")), row
        if "dry run" in row["status"]:
            assert "--size large --device cpu --json" in row["status"]
    assert not list(report_path.parent.glob("*.tmp"))  # written whole
    assert "gpu-check on" in capsys.readouterr().out


def test_unknown_stage_is_refused(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "env,bogus"])


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("import argparse, json, sys, time\n" + body)
    return path


CONTRACT = """
p = argparse.ArgumentParser(); p.add_argument('--size'); p.add_argument('--device'); p.add_argument('--json')
a = p.parse_args()
rows = [{'measure': 'x', 'size': a.size, 'ours': 2.0, 'peer': 1.0, 'peer_name': 'y', 'unit': 'q/s', 'ratio': 2.0,
         'target': None, 'met': None}]
json.dump({'script': 'x', 'command': ' '.join(sys.argv), 'machine': a.device, 'rows': rows}, open(a.json, 'w'))
"""


def test_benchmark_rows_and_reasons_for_rows_not_run(gpu_check, tmp_path):
    env, py = gpu_check.child_env(), sys.executable

    def rows(script: str, timeout: float = 60) -> list[dict]:
        return gpu_check.run_benchmark("m", script, py, "cpu", "tiny", tmp_path, timeout, env)

    good = rows(str(_script(tmp_path, "good.py", CONTRACT)))
    assert good == [{"measure": "x", "size": "tiny", "ours": 2.0, "peer": 1.0, "peer_name": "y", "unit": "q/s",
                     "ratio": 2.0, "target": None, "met": None, "script": str(tmp_path / "good.py"), "status": "ok"}]
    old = rows(str(_script(tmp_path, "old.py", "p = argparse.ArgumentParser(); p.add_argument('--tiny'); "
                                                "p.parse_args()\n")))
    assert old[0]["ours"] is None and old[0]["status"].startswith("not run (exit 2:") and "contract" in old[0]["status"]
    slow = rows(str(_script(tmp_path, "slow.py", "time.sleep(30)\n")), timeout=6)
    assert slow[0]["status"] == "not run (over its 6 s share of the budget)"
    silent = rows(str(_script(tmp_path, "silent.py", "pass\n")))
    assert silent[0]["status"].startswith("not run (no contract JSON")
    assert rows("scripts/absent_benchmark.py")[0]["status"] == "not run (script missing)"
    assert rows(str(tmp_path / "good.py"), timeout=4)[0]["status"] == "not run (time budget spent)"


def _fake_wheel(folder: Path) -> Path:
    """A pure-Python wheel of one module, gpu_check_fakemod 1.0."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu_check_fakemod-1.0-py3-none-any.whl"
    info = "gpu_check_fakemod-1.0.dist-info"
    files = {
        "gpu_check_fakemod/__init__.py": "VALUE = 7\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu_check_fakemod\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_installs_what_the_image_lacks_from_the_wheel_folder_offline(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(gpu_check, "DEPS", tmp_path / "deps")
    monkeypatch.setattr(gpu_check, "WHEEL_MODULES", {"gpu_check_fakemod": "gpu_check_fakemod", "nowheel": "nowheel"})
    env = gpu_check.child_env()
    assert gpu_check.absent_modules(sys.executable, ["gpu_check_fakemod"], env) == ["gpu_check_fakemod"]
    _fake_wheel(tmp_path / "wheels")
    stage = gpu_check.install_stage(sys.executable, ["gpu_check_fakemod", "nowheel"], env, 120, dry_run=False)
    assert (tmp_path / "deps" / "gpu_check_fakemod" / "__init__.py").is_file()
    assert stage.data["installed"] == ["gpu_check_fakemod"] and stage.data["missing"] == ["nowheel"]
    assert stage.status == "failed" and "make gpu-wheels" in stage.data["problems"][0]
    assert gpu_check.absent_modules(sys.executable, ["gpu_check_fakemod", "nowheel"], env) == ["nowheel"]


def test_junit_counts(gpu_check, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_gpu" name="test_a"/>'
                   '<testcase classname="tests.test_gpu" name="test_b"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_d"/></testsuite></testsuites>')
    assert gpu_check.junit_counts(xml) == {"passed": 2, "failed": 1, "skipped": 1,
                                           "failed_tests": ["tests.test_gpu::test_b"], "unimportable_modules": []}


def test_junit_counts_of_a_real_run_with_an_unimportable_module(gpu_check, tmp_path):
    """pytest itself: one module that imports a missing package, one passing and one skipped test."""
    (tmp_path / "test_missing.py").write_text("import gpu_check_no_such_package\n")
    (tmp_path / "test_fine.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                                           "@pytest.mark.skip(reason='no GPU')\ndef test_skip():\n    pass\n")
    junit = tmp_path / "junit.xml"
    out = gpu_check.run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                                 "--continue-on-collection-errors", f"--junitxml={junit}"], 120, gpu_check.child_env())
    assert out.rc == 1, out.tail
    counts = gpu_check.junit_counts(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 0, 1), counts
    assert len(counts["unimportable_modules"]) == 1 and "test_missing" in counts["unimportable_modules"][0]


def test_a_python_without_torch_is_reported_not_raised(gpu_check, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    stage = gpu_check.env_stage(str(fake), gpu_check.child_env())
    assert stage.status == "failed" and stage.data["torch"] is None and stage.data["cuda"] is False
    assert "No module named torch" in stage.data["error"]
    assert set(stage.data["to_install"]) == set(gpu_check.WHEEL_MODULES)  # nothing could be found either
