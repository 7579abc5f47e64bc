"""scripts/lowbit_folds.sh, the resumable queue of the morphology question's runs, against a stand-in `nerveseg` that
records its calls: which commands it runs, with which threads, and what it skips or resumes on a second call."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lowbit_folds.sh"

# Records "OMP_NUM_THREADS argv..."; `cv` makes the fold's folder, `qat` finishes the run it names unless FAIL_QAT
# names it.
STAND_IN = """#!/usr/bin/env bash
echo "$OMP_NUM_THREADS $*" >> "$CALLS"
command=$1
while [[ $# -gt 0 ]]; do
  case $1 in --run-dir) run=$2; shift;; --name) name=$2; shift;; --only-folds) fold=$2; shift;; esac; shift
done
[[ $command == cv ]] && mkdir -p "$run/fold-$fold"
if [[ $command == qat ]]; then
  mkdir -p "$run/qat/$name/checkpoints"
  [[ $name == "$FAIL_QAT" ]] && { echo "stopped"; exit 1; }
  echo '{}' > "$run/qat/$name/test_metrics.json"
  echo "done $name"
fi
"""


@pytest.fixture
def queue(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nerveseg").write_text(STAND_IN)
    (bin_dir / "nerveseg").chmod(0o755)
    calls = tmp_path / "calls.txt"

    def run(*args, fail_qat="", runs=None, cv_flags=None):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "FAIL_QAT": fail_qat}
        for name, value in (("RUNS", runs), ("CV_FLAGS", cv_flags)):
            env.pop(name, None)
            if value is not None:
                env[name] = value
        subprocess.run(["bash", str(SCRIPT), str(tmp_path / "CV"), *args], env=env, check=True, capture_output=True)
        lines = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return lines

    return run


def test_each_fold_trains_its_model_on_two_threads_then_both_runs_on_one_each(queue, tmp_path):
    calls = queue("/p/phantom", "3", "5")
    cv_calls = [c for c in calls if " cv " in f" {c} "]
    assert [c.split()[0] for c in cv_calls] == ["2", "2"]
    assert all("--phantom-dir /p/phantom" in c and "--mask-label 1" in c for c in cv_calls)
    assert ["--only-folds 3" in cv_calls[0], "--only-folds 5" in cv_calls[1]] == [True, True]
    qat_calls = sorted(c for c in calls if " qat " in f" {c} ")
    assert len(qat_calls) == 4 and all(c.startswith("1 qat ") for c in qat_calls)
    learned = [c for c in qat_calls if "--name learned-44-from-alloc-x86" in c]
    assert len(learned) == 2
    assert all("--bit-epochs 4 --bits learned --target-bits 4 --target-activation-bits 4" in c for c in learned)
    fixed = [c for c in qat_calls if "--name w4a4-low-walloc-x86" in c]
    assert len(fixed) == 2
    assert all("--bits 4 " in c and "--weight-allocation sensitivity" in c and "--epochs 12" in c for c in fixed)
    assert (tmp_path / "CV" / "fold-5" / "qat" / "w4a4-low-walloc-x86" / "test_metrics.json").is_file()


def test_a_second_call_skips_finished_runs_and_resumes_an_interrupted_one(queue):
    first = queue("", "3", fail_qat="learned-44-from-alloc-x86")
    assert sum(" qat " in f" {c} " for c in first) == 2
    calls = queue("", "3")
    assert not any("--phantom-dir" in c for c in calls)  # "" = the fold run's own phantom stage
    qat_calls = [c for c in calls if " qat " in f" {c} "]
    assert len(qat_calls) == 1  # W4A4 finished the first time
    assert "--name learned-44-from-alloc-x86" in qat_calls[0] and qat_calls[0].endswith("--resume")


def test_runs_chooses_the_qat_runs_and_the_floor_of_3_run_is_the_learned_one_with_b_min_3(queue, tmp_path):
    queue("", "3")  # the default pair first, as the queue of the morphology question made it
    calls = queue("", "3", runs="learned-44-b3-from-alloc-x86 learned-44-from-alloc-x86")
    qat_calls = [c for c in calls if " qat " in f" {c} "]
    assert len(qat_calls) == 1 and "--name learned-44-b3-from-alloc-x86" in qat_calls[0]  # the other one finished
    assert qat_calls[0].startswith("1 qat ") and qat_calls[0].endswith(
        "--bit-epochs 4 --bits learned --target-bits 4 --target-activation-bits 4 --b-min 3 "
        "--name learned-44-b3-from-alloc-x86")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        queue("", "3", runs="learned-44-b4")
    assert failed.value.returncode == 2
    assert b"RUNS: unknown run learned-44-b4" in failed.value.stderr


def test_cv_flags_reach_the_fold_models_and_w2a2_is_the_w4a4_run_at_2_bits(queue):
    calls = queue("", "3", runs="w4a4-low-walloc-x86 w2a2-low-walloc-x86", cv_flags="--relu-backbone")
    cv_calls = [c for c in calls if " cv " in f" {c} "]
    assert len(cv_calls) == 1 and cv_calls[0].endswith("--only-folds 3 --relu-backbone")
    qat_calls = {c.split("--name ")[1]: c for c in calls if " qat " in f" {c} "}
    assert set(qat_calls) == {"w4a4-low-walloc-x86", "w2a2-low-walloc-x86"}
    assert qat_calls["w2a2-low-walloc-x86"] == qat_calls["w4a4-low-walloc-x86"].replace("--bits 4", "--bits 2").replace(
        "w4a4", "w2a2")
    assert not any("--relu-backbone" in c for c in qat_calls.values())  # QAT reads the network from the fold's run
