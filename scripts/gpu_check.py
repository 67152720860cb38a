"""One command on a machine with one CUDA GPU: the GPU tests and the paper-scale benchmarks, in under 6 minutes.

    make gpu-check                                   # = python3 scripts/gpu_check.py, the machine's own Python
    python3 scripts/gpu_check.py --json runs/gpu_check/report.json --budget 330
    python3 scripts/gpu_check.py --stages env,tests  # a subset of the stages
    python3 scripts/gpu_check.py --device cpu --dry-run   # the plan and the report only (no GPU needed)

GPU images come with their own torch / transformers / lightning and often no network. The check runs
under the image's Python and never installs torch; what the image lacks (faiss-cpu, hydra-core,
omegaconf, antlr4, datasets, pytest, ...) comes from the wheel folder ``wheels/gpu`` that
``make gpu-wheels`` fills where a registry is reachable, installed with
``pip install --no-index --find-links wheels/gpu --no-deps --target .gpu_deps`` (a folder put on
PYTHONPATH behind the image's own packages, so nothing of the image is replaced).

Stages, each capped inside the total time budget (a stage that would not fit is reported, not run):
1. env: Python, torch, the GPU, and which modules the image lacks;
2. install: those modules from the wheel folder (a module without a wheel is reported missing);
3. tests: ``pytest -m gpu tests`` (tests/test_gpu.py and every other test marked gpu);
4. bench: each benchmark script with ``--size large --device cuda --json`` (the benchmark contract);
   a script that is missing, fails, or does not take the contract's arguments yields a row
   "not run (reason)".
Writes one JSON report (stages, test counts, benchmark rows) and prints a table. Without a CUDA GPU
it says so and exits 0; otherwise it exits 1 when a stage failed, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "wheels" / "gpu"
DEPS = ROOT / ".gpu_deps"
IMAGE_MODULES = ("torch", "transformers", "lightning", "tokenizers", "numpy", "yaml", "tqdm")  # never installed
# module the project imports -> the distribution whose wheel provides it (all in `make gpu-wheels`)
WHEEL_MODULES = {
    "faiss": "faiss-cpu", "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
    "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess", "xxhash": "xxhash",
    "pytest": "pytest", "iniconfig": "iniconfig", "pluggy": "pluggy", "pygments": "pygments",
    "psutil": "psutil", "pypdf": "pypdf",
}
# name, script, its share of the budget (s): the benchmark rows of the report
BENCHMARKS = (
    ("train step (BART-large + DPR-base, bf16, batch 8 x 5 docs)", "scripts/bench_training.py", 80),
    ("decoding (thorough 50 docs, RAG-Token greedy 15 docs)", "scripts/bench_decoding.py", 60),
    ("index (torch fp16 1M x 768 vs faiss Flat on CPU)", "scripts/bench_index.py", 60),
    ("DPR-base passage encoding", "scripts/bench_encode.py", 30),
)
MIN_BENCH_SECONDS = 5  # a benchmark given less is not started
STAGE_CAPS = {"env": 30, "install": 60, "tests": 120}
STAGES = ("env", "install", "tests", "bench")


@dataclass
class Outcome:
    """What one command did: exit status (None: killed at its time limit), seconds, and its output's tail."""

    rc: int | None
    seconds: float
    tail: str


@dataclass
class Stage:
    """One line of the report: a stage's status ("ok", "failed", "skipped", "dry run", "not run") and details."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


def run_command(cmd: list[str], timeout: float, env: dict[str, str]) -> Outcome:
    """Run ``cmd`` in the repository root, its whole process group killed after ``timeout`` seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and benchmarks may have children (spawned ranks)
        out, _ = proc.communicate()
        rc = None
    return Outcome(rc, round(time.perf_counter() - started, 1), (out or "")[-3000:])


def child_env() -> dict[str, str]:
    """The environment of every command: offline Hugging Face, the project and .gpu_deps on the path."""
    env = dict(os.environ)
    path = [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []), str(DEPS)]  # deps last
    env.update(PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("HF_HOME", str(ROOT / ".hf_home"))
    return env


def absent_modules(python: str, modules: tuple[str, ...] | list[str], env: dict[str, str]) -> list[str]:
    """The modules ``python`` cannot find (with the check's PYTHONPATH), without importing them."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    out = run_command([python, "-c", code, *modules], 60, env)
    found = last_json_line(out.tail) if out.rc == 0 else None
    return found if isinstance(found, list) else list(modules)


def last_json_line(text: str) -> object:
    """The JSON value on the last line of a command's output (warnings may come before it), or None."""
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def env_stage(python: str, env: dict[str, str]) -> Stage:
    """Python, torch, CUDA device; the image's own packages and the ones to install."""
    code = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(), "
            "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
            "'cuda_version': torch.version.cuda}))")
    out = run_command([python, "-c", code], STAGE_CAPS["env"], env)
    info = last_json_line(out.tail) if out.rc == 0 else None
    if not isinstance(info, dict):  # no torch in this Python, or it failed to start
        info = {"torch": None, "cuda": False, "error": out.tail.strip()[-300:]}
    info.update(python=platform.python_version(), image_missing=absent_modules(python, IMAGE_MODULES, env),
                to_install=absent_modules(python, list(WHEEL_MODULES), env))
    status = "ok" if info["torch"] and not info["image_missing"] else "failed"
    detail = f"torch {info['torch']}, GPU {info.get('gpu')}; lacks {info['to_install'] or 'nothing'}"
    if info["image_missing"]:
        detail += f"; the image itself lacks {info['image_missing']} (not installed by this check)"
    return Stage("env", status, out.seconds, detail, info)


def _wheel_for(distribution: str) -> Path | None:
    """The wheel of ``distribution`` in the wheel folder, if any (names normalized as wheel files spell them)."""
    stem = distribution.lower().replace("-", "_")
    found = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    return next((w for w in found if w.name.lower().split("-")[0] == stem), None)


def install_stage(python: str, modules: list[str], env: dict[str, str], timeout: float, dry_run: bool) -> Stage:
    """pip install --no-index --no-deps --target .gpu_deps each lacking module's wheel (unzipped if pip is absent)."""
    if not modules:
        return Stage("install", "skipped", detail="the image has every module")
    started, installed, failed = time.perf_counter(), [], []
    for module in modules:
        wheel = _wheel_for(WHEEL_MODULES[module])
        if wheel is None:
            failed.append(f"{module} (no wheel in wheels/gpu: run `make gpu-wheels` where a registry is reachable)")
            continue
        cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS), "--no-deps",
               "--target", str(DEPS), "--upgrade", str(wheel)]
        if dry_run:
            installed.append(" ".join(cmd))
            continue
        out = run_command(cmd, max(1.0, timeout - (time.perf_counter() - started)), env)
        if out.rc != 0 and "No module named pip" in out.tail:
            with zipfile.ZipFile(wheel) as archive:  # a wheel is a zip of its site-packages files
                archive.extractall(DEPS)
        elif out.rc != 0:
            failed.append(f"{module} (pip: {out.tail.strip().splitlines()[-1:]})")
            continue
        installed.append(module)
    still = [] if dry_run else absent_modules(python, modules, env)
    status = "dry run" if dry_run else ("ok" if not still else "failed")
    return Stage("install", status, round(time.perf_counter() - started, 1),
                 f"installed {installed}; missing {still or failed or 'nothing'}",
                 {"installed": installed, "missing": still, "problems": failed})


def tests_stage(python: str, env: dict[str, str], timeout: float, dry_run: bool, out_dir: Path) -> Stage:
    """``pytest -m gpu tests``; counts from its JUnit XML."""
    junit = out_dir / "gpu_tests.xml"
    # A test module that imports a package the image lacks (datasets without pyarrow) must not stop the rest.
    cmd = [python, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests", "--continue-on-collection-errors",
           f"--junitxml={junit}"]
    if dry_run:
        return Stage("tests", "dry run", detail=" ".join(cmd))
    out = run_command(cmd, timeout, env)
    counts = junit_counts(junit) if junit.is_file() else {}
    if out.rc is None:
        return Stage("tests", "failed", out.seconds, f"killed at its {timeout:.0f} s share of the budget", counts)
    ok = counts.get("failed", 1) == 0 and counts.get("passed", 0) > 0
    detail = (f"{counts['passed']} passed, {counts['failed']} failed {counts['failed_tests']}, {counts['skipped']} "
              f"skipped; modules not importable: {counts['unimportable_modules'] or 'none'}" if counts
              else out.tail[-300:])
    return Stage("tests", "ok" if ok else "failed", out.seconds, detail, {**counts, "tail": out.tail[-1500:]})


def junit_counts(path: Path) -> dict:
    """Counts of a pytest JUnit XML file: passed, failed (failures and errors), skipped, and the test modules
    that could not be imported (a package the image lacks: reported, their tests not run)."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed, unimportable = [], []
    for case in root.iter("testcase"):
        error, failure = case.find("error"), case.find("failure")
        if error is not None and "collection failure" in (error.get("message") or ""):
            unimportable.append(case.get("name") or case.get("classname"))
        elif error is not None or failure is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": len(failed), "skipped": total["skipped"], "failed_tests": failed,
            "unimportable_modules": unimportable}


def not_run(measure: str, script: str, reason: str) -> dict:
    """A report row for a benchmark that gave no numbers."""
    return {"measure": measure, "script": script, "ours": None, "peer": None, "status": f"not run ({reason})"}


def run_benchmark(measure: str, script: str, python: str, device: str, size: str, out_dir: Path, timeout: float,
                  env: dict[str, str], dry_run: bool = False) -> list[dict]:
    """The rows of one contract benchmark (``--size --device --json``), or one "not run (reason)" row."""
    path = ROOT / script
    if not path.is_file():
        return [not_run(measure, script, "script missing")]
    out_json = out_dir / f"{path.stem}.json"
    cmd = [python, str(path), "--size", size, "--device", device, "--json", str(out_json)]
    if dry_run:
        return [not_run(measure, script, "dry run: " + " ".join(cmd))]
    if timeout < MIN_BENCH_SECONDS:
        return [not_run(measure, script, "time budget spent")]
    out_json.unlink(missing_ok=True)
    out = run_command(cmd, timeout, env)
    if out.rc is None:
        return [not_run(measure, script, f"over its {timeout:.0f} s share of the budget")]
    last = (out.tail.strip().splitlines() or [""])[-1][:200]
    if out.rc != 0:
        hint = "; does it take the contract's --size/--device/--json?" if out.rc == 2 else ""
        return [not_run(measure, script, f"exit {out.rc}: {last}{hint}")]
    try:
        rows = json.loads(out_json.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [not_run(measure, script, f"no contract JSON at {out_json.name}: {err}")]
    return [{**row, "script": script, "status": "ok"} for row in rows]


def print_table(report: dict) -> None:
    """The stages, then one line per benchmark row."""
    print(f"\ngpu-check on {report['machine']} ({report['seconds']:.0f} s of {report['budget_s']:.0f} s)")
    for stage in report["stages"]:
        print(f"  {stage['name']:<8} {stage['status']:<8} {stage['seconds']:>6.1f} s  {stage['detail'][:150]}")
    if report["rows"]:
        print(f"\n  {'measure':<58} {'ours':>10} {'peer':>10} {'unit':<6} {'ratio':>6}  status")
    for row in report["rows"]:
        cells = [row.get(key) for key in ("ours", "peer", "ratio")]
        ours, peer, ratio = (f"{c:.4g}" if isinstance(c, (int, float)) else "-" for c in cells)
        print(f"  {str(row.get('measure'))[:58]:<58} {ours:>10} {peer:>10} {str(row.get('unit') or ''):<6} "
              f"{ratio:>6}  {row['status'][:90]}")


def write_report(report: dict, path: Path) -> None:
    """The JSON report, written whole or not at all (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "gpu_check" / "report.json")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when present, else report that there is no GPU and exit 0")
    parser.add_argument("--size", choices=["tiny", "mid", "large"], default="large", help="benchmark sizes")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for everything (< 6 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="record the commands instead of running them")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; use a subset of {','.join(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, python, env = time.perf_counter(), sys.executable, child_env()

    def left() -> float:
        """Seconds of the budget still unspent."""
        return args.budget - (time.perf_counter() - started)

    out_dir = args.json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stages: list[Stage] = []
    rows: list[dict] = []
    info = env_stage(python, env)
    stages.append(info if "env" in args.stages else Stage("env", "skipped", info.seconds, info.detail, info.data))
    has_gpu = bool(info.data.get("cuda"))
    device = ("cuda" if has_gpu else "cpu") if args.device == "auto" else args.device
    if args.device == "auto" and not has_gpu:
        stages.append(Stage("gpu", "skipped", detail="no CUDA GPU on this machine: nothing to check (exit 0)"))
    elif args.device == "cuda" and not has_gpu:
        stages.append(Stage("gpu", "failed", detail="--device cuda but torch sees no CUDA GPU"))
    else:
        if "install" in args.stages:
            to_install = info.data.get("to_install", [])
            stages.append(install_stage(python, to_install, env, min(STAGE_CAPS["install"], left()), args.dry_run))
        if "tests" in args.stages:
            stages.append(tests_stage(python, env, min(STAGE_CAPS["tests"], left()), args.dry_run, out_dir))
        if "bench" in args.stages:
            bench_started = time.perf_counter()
            for measure, script, cap in BENCHMARKS:
                rows += run_benchmark(measure, script, python, device, args.size, out_dir, min(cap, left() - 5),
                                      env, args.dry_run)
            ran = sum(row["status"] == "ok" for row in rows)
            stages.append(Stage("bench", "dry run" if args.dry_run else "ok",
                                round(time.perf_counter() - bench_started, 1),
                                f"{ran} rows measured, {len(rows) - ran} not run"))
    report = {"script": "scripts/gpu_check.py", "command": " ".join([Path(python).name, *sys.argv]),
              "machine": f"{platform.node()}: {info.data.get('gpu') or 'no CUDA GPU'}, torch {info.data.get('torch')}, "
                         f"Python {platform.python_version()}",
              "device": device, "gpu": has_gpu, "budget_s": args.budget,
              "seconds": round(time.perf_counter() - started, 1), "stages": [asdict(s) for s in stages], "rows": rows}
    write_report(report, args.json)
    print_table(report)
    print(f"\nreport: {args.json}")
    if args.device == "auto" and not has_gpu:
        return 0  # no GPU is not a failure: there was nothing to check
    return 1 if any(stage.status == "failed" for stage in stages) else 0


if __name__ == "__main__":
    sys.exit(main())
