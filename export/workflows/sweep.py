"""`nerveseg sweep`: the QAT fine-tunes of one float run, each exported and scored, then the report.

Every run of the sweep is a normal `RUN/qat/NAME/` run (`qat.run.run_qat`) from the same float checkpoint, with
the same seed and schedule (the recipe's [qat] table, `--epochs` for all of them):

    uniform  --bits 8,6,5,4,3,2     -> w8a8, w6a6, ...   (W = A bits); "w4a8" style entries -> w4a8
    learned  --learned 0.05,0.25,1.0 -> learned-0.05, ... (learned bits, bit-cost weight lambda as written)
    target   --target-bits 4         -> target-4          (learned bits, only the excess over 4 bits costs)
    --grid x86                        -> w8a8-x86, ...      (every name gets `nerveseg qat`'s "-x86" suffix)

The sweep is resumable by construction: a run with test_metrics.json is finished and skipped, a run folder
with a last checkpoint but no test metrics was interrupted and is resumed (`--resume` of `nerveseg qat`), a
folder without any checkpoint is left alone (it may be in training elsewhere), a run with an INT8 bundle is not
exported again. RUN/sweep.json records the command of each run and any export that failed (parity below the
exporter's limit), which the report shows; such a run is reported as the fake-quant model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json

from ..report.rows import SWEEP_STATE, read_json

BIT_RANGE = (2, 8)
MIXED = re.compile(r"^w(\d)a(\d)$", re.IGNORECASE)


@dataclass(frozen=True)
class Job:
    """One QAT run of the sweep: its folder name and the `nerveseg qat` settings that make it."""

    name: str
    bits: str  # "8", "w4a8" or "learned"
    bit_weight: float | None = None
    target_bits: float | None = None
    grid: str = "tensorrt"

    def flags(self, run_dir: Path, epochs: int | None) -> str:
        parts = [f"nerveseg qat --run-dir {shlex.quote(str(run_dir))} --bits {self.bits}"]
        if self.bit_weight is not None:
            parts.append(f"--bit-weight {self.bit_weight:g}")
        if self.target_bits is not None:
            parts.append(f"--target-bits {self.target_bits:g}")
        if self.grid != "tensorrt":
            parts.append(f"--grid {self.grid}")
        if epochs is not None:
            parts.append(f"--epochs {epochs}")
        parts.append(f"--name {self.name}")
        return " ".join(parts)


def _check_bits(value: int, text: str) -> int:
    if not BIT_RANGE[0] <= value <= BIT_RANGE[1]:
        raise InputError(f"--bits {text}: bitwidths must lie in {BIT_RANGE[0]}..{BIT_RANGE[1]}")
    return value


def plan(bits: list[str], learned: list[str], target_bits: list[str], grid: str = "tensorrt") -> list[Job]:
    """The sweep's runs from the flag values (strings as typed, so names keep the user's spelling), all on
    one activation grid (qat.config.GRIDS)."""
    from qat.config import GRIDS

    if grid not in GRIDS:
        raise InputError(f"--grid {grid!r}: choose one of {', '.join(GRIDS)}")
    jobs = []
    for text in bits:
        text = text.strip().lower()
        mixed = MIXED.match(text)
        if mixed:
            w, a = (_check_bits(int(g), text) for g in mixed.groups())
            jobs.append(Job(f"w{w}a{a}", f"w{w}a{a}"))
        elif text.isdigit():
            b = _check_bits(int(text), text)
            jobs.append(Job(f"w{b}a{b}", str(b)))
        else:
            raise InputError(f"--bits {text!r}: give bitwidths such as 8,6,4 or W4A8 entries")
    for text in (t.strip() for t in learned):
        weight = _number("--learned", text, "bit-cost weights (lambda) such as 0.05,0.25,1.0")
        if weight < 0:
            raise InputError(f"--learned {text}: lambda must be a non-negative number")
        jobs.append(Job(f"learned-{text}", "learned", bit_weight=weight))
    for text in (t.strip() for t in target_bits):
        target = _number("--target-bits", text, "mean bitwidths such as 4 or 4.5")
        if not BIT_RANGE[0] <= target <= BIT_RANGE[1]:
            raise InputError(f"--target-bits {text}: must lie in {BIT_RANGE[0]}..{BIT_RANGE[1]}")
        jobs.append(Job(f"target-{text}", "learned", target_bits=target))
    if grid != "tensorrt":  # the names `nerveseg qat --grid x86` gives, so both grids can share one RUN/qat/
        jobs = [dataclasses.replace(job, name=f"{job.name}-{grid}", grid=grid) for job in jobs]
    names = [job.name for job in jobs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"the sweep names {duplicates} twice; give each setting once")
    return jobs


def _number(flag: str, text: str, hint: str) -> float:
    """A finite number from one entry of a comma list, or a one-line error saying what the flag wants."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{flag} {text!r}: give {hint}") from None
    if not math.isfinite(value):
        raise InputError(f"{flag} {text}: give {hint}")
    return value


def split_list(text: str | None) -> list[str]:
    return [part for part in (text or "").split(",") if part.strip()]


def qat_config(run_dir: Path, recipe: str, job: Job, epochs: int | None, device: str):
    """The job's QatConfig as `nerveseg qat` builds it: defaults, the float recipe's [qat] table, then its flags."""
    from qat.config import build_qat_config

    return build_qat_config(recipe, run_dir=str(run_dir), name=job.name, bits=job.bits, bit_weight=job.bit_weight,
                            target_bits=job.target_bits, grid=job.grid, epochs=epochs, device=device)


def is_finished(qat_dir: Path) -> bool:
    return (qat_dir / "test_metrics.json").is_file()


class SweepState:
    """RUN/sweep.json: what each run of the sweep is, how it was made, how far it got. Rewritten atomically."""

    def __init__(self, run_dir: Path, command: str):
        self.path = run_dir / SWEEP_STATE
        self.data = read_json(self.path) or {"runs": {}}
        self.data.setdefault("runs", {})
        self.data["command"] = command

    def update(self, name: str, **values) -> None:
        # re-read first: another sweep (or a person recording an export by hand) may have written other runs
        on_disk = (read_json(self.path) or {}).get("runs", {})
        for other, entry in on_disk.items():
            if other != name:
                self.data["runs"][other] = entry
        self.data["runs"].setdefault(name, {}).update(values)
        write_json(self.path, self.data)


def train_job(run_dir: Path, job: Job, qcfg, epochs: int | None, state: SweepState) -> None:
    """Run, resume or skip one QAT run."""
    from qat.run import run_qat

    qat_dir = run_dir / "qat" / job.name
    command = job.flags(run_dir, epochs)
    if is_finished(qat_dir):
        print(f"sweep: {job.name} finished earlier; skipped", flush=True)
        state.update(job.name, command=state.data["runs"].get(job.name, {}).get("command", command), status="finished")
        return
    resume = (qat_dir / "checkpoints" / "last.pt").is_file()
    if not resume and qat_dir.is_dir() and any(qat_dir.iterdir()):
        # started but no epoch finished: another process may be training it right now (its observe phase), or
        # it was stopped early; either way it is not the sweep's to delete. Listed as incomplete in the report.
        print(f"sweep: {job.name}: {qat_dir} exists without a checkpoint (being trained elsewhere, or stopped before "
              f"its first epoch); skipped. Remove the folder to let the sweep start it.", file=sys.stderr, flush=True)
        state.update(job.name, command=command, status="skipped: folder without checkpoint")
        return
    print(f"sweep: {'resuming' if resume else 'starting'} {job.name}: {command}{' --resume' if resume else ''}",
          flush=True)
    state.update(job.name, command=command, status="running")
    start = time.perf_counter()
    run_qat(qcfg, resume)
    state.update(job.name, status="finished", seconds=round(time.perf_counter() - start, 1))


# the rule that judged a refusal: refusals by an earlier rule are retried under this one (the 0.995 mask-Dice bound,
# "fixed bound" / "model bound" in older sweep.json files; "noise-floor gate" before the layer check excused rounding
# ties, which refused a faithful file of a kept start). Name the change here whenever the gate's logic changes; its
# numbers are part of the key by themselves
GATE_RULE = "noise-floor gate, ties excused in the layer check"


def gate_rule() -> str:
    """GATE_RULE with the layer check's bounds: a refusal under other numbers is retried too."""
    from export.bundle.layer_parity import LAYER_BOUND, LAYER_SLACK, TIE_TOLERANCE

    return f"{GATE_RULE} ({LAYER_BOUND:g} + {LAYER_SLACK}, ties within {TIE_TOLERANCE:.3g})"


def refusal_key(qat_dir: Path) -> str:
    """What a parity refusal depends on: the QAT checkpoint (its size and time) and the rule that judged it."""
    stat = (qat_dir / "checkpoints" / "best.pt").stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{gate_rule()}"


def export_finished(run_dir: Path, device: str, state: SweepState) -> None:
    """INT8 bundle of every finished QAT run that has none; an export the exporter refuses is recorded, not fatal.

    A parity refusal (no INT8 file passed the gate) is deterministic (the same checkpoint, the same rule, the same
    integers): it is remembered in sweep.json and not retried by the next sweep or cv-quant (each retry is an
    export and a parity run); a changed checkpoint or another rule tries again. Other refusals (a missing file,
    say) are retried."""
    from ..bundle.writer import ParityError
    from ..bundle.int8 import export_int8_bundle

    for qat_dir in sorted(p for p in (run_dir / "qat").glob("*") if p.is_dir() and not p.name.startswith(".")):
        if not is_finished(qat_dir) or (qat_dir / "bundle" / "manifest.json").is_file():
            continue
        key = refusal_key(qat_dir)
        earlier = state.data["runs"].get(qat_dir.name, {})
        if earlier.get("export_refused_for") == key:
            print(f"sweep: {qat_dir.name} not exported (refused earlier, same checkpoint and rule; not retried): "
                  f"{earlier.get('export_error', '')}", file=sys.stderr)
            continue
        print(f"sweep: exporting {qat_dir.name} to INT8")
        try:
            bundle, manifest = export_int8_bundle(run_dir, qat_dir.name, device=device)
        except InputError as err:  # e.g. no INT8 file passed the gate: the run stays, scored as fake-quant
            print(f"sweep: {qat_dir.name} not exported: {err}", file=sys.stderr)
            state.update(qat_dir.name, export_error=f"not exported: {err}",
                         export_refused_for=key if isinstance(err, ParityError) else None)
            continue
        state.update(qat_dir.name, export_error=None, export_refused_for=None, bundle=str(bundle),
                     left_out=manifest.quantization.get("refused", {}))  # INT8 files the gate left out, and why


def refused_exports(run_dir: Path, names: list[str]) -> dict[str, str]:
    """{name: why} for the finished QAT runs among `names` left without an INT8 bundle: their exports were
    refused (the reason as sweep.json recorded it, when it did)."""
    runs = (read_json(Path(run_dir) / SWEEP_STATE) or {}).get("runs", {})
    return {name: runs.get(name, {}).get("export_error") or "no INT8 bundle"
            for name in names if is_finished(Path(run_dir) / "qat" / name)
            and not (Path(run_dir) / "qat" / name / "bundle" / "manifest.json").is_file()}


def refusal_line(refused: dict[str, str], attempted: int) -> str:
    """The last line of a sweep or pipeline whose INT8 exports were not all written."""
    return (f"incomplete: {len(refused)} of {attempted} INT8 exports refused ({', '.join(refused)}): no INT8 bundle "
            "written for them; their report rows are the fake-quant model; reasons above and in sweep.json")


def ensure_float_bundle(run_dir: Path, device: str) -> None:
    """The float run's FP32 bundle: the report's float row and the PTQ baseline are made from its graph."""
    if (run_dir / "bundle" / "manifest.json").is_file():
        return
    from ..bundle.writer import export_bundle
    from training.stages import best_checkpoint

    print(f"sweep: exporting the float run {run_dir}")
    export_bundle(best_checkpoint(run_dir), device=device)


def run_sweep(run_dir: str | Path, bits: list[str], learned: list[str], target_bits: list[str] | None = None,
              epochs: int | None = None, device: str = "auto", threads: int = 2, latency_runs: int = 50,
              command: str | None = None, grid: str = "tensorrt") -> Path:
    """Train (or resume, or skip) every run, export each, make the PTQ baseline, write the report; returns
    the report folder."""
    from ..report.write import write_report
    from ..report.ptq_row import ensure_ptq
    from training.config import load_run_config
    from training.stages import best_checkpoint

    run_dir = Path(run_dir)
    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    jobs = plan(bits, learned, target_bits or [], grid)
    if not jobs:
        raise InputError("nothing to sweep: give --bits and/or --learned / --target-bits values")
    best_checkpoint(run_dir)  # a one-line error before anything starts when the float run is not trained
    recipe = load_run_config(run_dir).recipe
    # every config built (and checked) before the first run starts: a bad combination fails now, in one line
    configs = [qat_config(run_dir, recipe, job, epochs, device) for job in jobs]
    # argv[1:] starts with the subcommand ("sweep") when run as `nerveseg sweep ...`
    state = SweepState(run_dir, command or "nerveseg " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    state.data["epochs"] = epochs
    ensure_float_bundle(run_dir, device)
    for index, (job, qcfg) in enumerate(zip(jobs, configs), 1):
        print(f"sweep: run {index}/{len(jobs)}", flush=True)
        train_job(run_dir, job, qcfg, epochs, state)
    export_finished(run_dir, device, state)
    ensure_ptq(run_dir)
    return write_report(run_dir, threads, latency_runs, make_ptq=False)
