"""Is each INT8 file the fake-quant model? Its probabilities on the parity frames against the model's own two
evaluations, judged by the gate (export.bundle.parity.tie_gate, docs/QUANTIZATION.md "How the INT8 parity gate decides"),
and its integers quantizer by quantizer, teacher-forced on a few frames (export.bundle.layer_parity.layer_check).

Per file, not per bundle: a file the gate refuses is left out of the bundle and the others stay
(export/bundle/int8.py); only a bundle with no INT8 file left is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from device_runtime.core.postprocess import Morphology
from training.data.dataset import load_pairs, load_split
from training.evaluation.predict import predict_probabilities

from .layer_parity import LAYER_BOUND, LAYER_FRAMES, LAYER_SLACK, layer_check
from .parity import GATE_FACTOR, GATE_SLACK, compare, onnx_probabilities, tie_gate

# Validation frames first, then training frames up to this many in all: the gate's statistics are pooled over
# pixels, and on 20 frames a rare departure (one blob) is either absent or a large share. 256 covers every
# frame of the phantom demo (24 + 192) and of usgra-seg (20 + 163); each costs one float64 pass of the
# fake-quant model, the costliest step of the export (about 0.3 s a frame at 256x256 on 2 cores).
PARITY_FRAMES = 256
FLOOR_KEY = "model_float32_vs_float64"  # the manifest's parity entry of the model against itself


def parity_frames(run_dir: Path, cfg, cap: int = PARITY_FRAMES) -> tuple[np.ndarray, dict]:
    """(N, H, W) frames the gate is measured on: every validation frame, then the first training frames of the
    split up to `cap` in all; and their counts {"val": n, "train": m}."""
    splits = load_split(Path(run_dir) / "split.json")
    val = splits["val"][:cap]
    train = splits["train"][:max(cap - len(val), 0)]
    images, _ = load_pairs(val + train, tuple(cfg.input_size), cfg.mask_label, "decode parity frames")
    return images, {"val": len(val), "train": len(train)}


@torch.no_grad()
def float64_probabilities(model: torch.nn.Module, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(N, H, W) probabilities of the fake-quant model evaluated in float64 on the CPU: the same integer grids
    and float32 steps, without float32's accumulation error."""
    exact = copy.deepcopy(model).cpu().double().eval()
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).double()[:, None]
        out[start:start + len(batch)] = torch.sigmoid(exact(batch)["out"][:, 0]).float().numpy()
    return out


# TIE NUDGES. One float32-vs-float64 comparison is one draw of which ties go which way, and on a model whose integers
# cascade (a 2-epoch W8A8 model: 40 % of the last layers' integers differ between float32 and float64, by up to 28
# steps) one draw is a poor yardstick: ONNX Runtime's integer kernels, which follow float64 exactly through the first
# dozen layers, departed 12x further at the median than float32 did on one such model, and 3x closer on another. So
# the floor is the envelope of three draws: float32, and float32 with the input of every activation quantizer
# scaled by 1 +- 2^-20 (values within ~1e-6 of a rounding tie, about what float32 accumulation moves them by, round
# the other way; nothing else changes), each against float64.
TIE_NUDGES = (2.0 ** -20, -2.0 ** -20)


def model_references(deployed: torch.nn.Module, images: np.ndarray, device: torch.device,
                     batch_size: int) -> dict[str, np.ndarray]:
    """The fake-quant model (as deployed: flip-averaged where tuned so) evaluated in float64, in float32, and in
    float32 with its rounding ties nudged (TIE_NUDGES): {"float64", "float32", "float32, ties x(1+2^-20)", ...}.

    float32 and float64 are both the model: which one a runtime follows depends on its kernels (ONNX Runtime's
    QLinearConv accumulates exactly in int32; a float emulation of Q/DQ rounds in float32). Their disagreements
    with float64 are the model's own noise floor."""
    evaluations = {"float64": float64_probabilities(deployed, images),
                   "float32": predict_probabilities(deployed.to(device), images, device, batch_size, amp=False)}
    for nudge in TIE_NUDGES:
        evaluations[nudge_name(nudge)] = nudged_probabilities(deployed, images, device, batch_size, nudge)
    return evaluations


def nudge_name(nudge: float) -> str:
    return f"float32, ties x(1{'+' if nudge > 0 else '-'}2^{np.log2(abs(nudge)):.0f})"


def nudged_probabilities(deployed: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int,
                         nudge: float) -> np.ndarray:
    """float32 probabilities with every activation quantizer's input multiplied by (1 + nudge)."""
    from qat.prepare import activation_quantizers

    factor = 1.0 + nudge
    hooks = [q.register_forward_pre_hook(lambda _module, args: (args[0] * factor, *args[1:]))
             for q in activation_quantizers(deployed)]
    try:
        return predict_probabilities(deployed.to(device), images, device, batch_size, amp=False)
    finally:
        for hook in hooks:
            hook.remove()


def noise_floor(evaluations: dict[str, np.ndarray], threshold: float, morphology: Morphology) -> dict:
    """Each float32 draw against float64 (`draws`), and per statistic the largest of them: the floor the gate
    holds a file to."""
    draws = {name: compare(evaluations["float64"], prob, threshold, morphology)
             for name, prob in evaluations.items() if name != "float64"}
    worst = {key: min if key == "mask_dice" else max for key in draws["float32"] if key not in ("frames", "pixels")}
    floor = {key: pick(draw[key] for draw in draws.values()) for key, pick in worst.items()}
    return {"frames": draws["float32"]["frames"], "pixels": draws["float32"]["pixels"], **floor, "draws": draws}


def parity_of(path: Path, images: np.ndarray, references: dict[str, np.ndarray], threshold: float,
              morphology: Morphology) -> dict:
    """The file's figures (ONNX Runtime CPU, all optimisations, as the device runs it) against the closer of
    the model in float32 and in float64 (of `references`, see model_references) by mean |dp|, the figures against each under `against_<precision>`, and those of the graph
    run as written (ORT_DISABLE_ALL, every Q/DQ executed) against the same reference under `reference_*`: where
    the fused kernels depart and the graph as written does not, the kernels' rounding is the cause."""
    deployed = onnx_probabilities(path, images, optimization="all")
    against = {precision: compare(references[precision], deployed, threshold, morphology)
               for precision in ("float32", "float64")}
    closer = min(against, key=lambda precision: against[precision]["mean_prob_diff"])
    exact = compare(references[closer], onnx_probabilities(path, images, optimization="none"), threshold, morphology)
    result = dict(against[closer])
    result.update({f"against_{precision}": figures for precision, figures in against.items()})
    result.update({f"reference_{key}": value for key, value in exact.items() if key not in ("frames", "pixels")})
    result["reference_model"] = f"the PyTorch fake-quant model in {closer} (the closer of {' / '.join(against)})"
    result["optimization"] = "ORT_ENABLE_ALL (reference_*: ORT_DISABLE_ALL)"
    return result


def judge_files(paths: list[Path], images: np.ndarray, references: dict[str, np.ndarray], threshold: float,
                morphology: Morphology, frames_from: dict,
                model: torch.nn.Module) -> tuple[dict, dict[str, str]]:
    """Every file measured and judged: (the manifest's parity entries: one per file with its `gate` verdict and its
    teacher-forced per-quantizer check under `layers`, the model's own floor under FLOOR_KEY and the rule under
    "gate"; {name: why} of the files the gate refused). `model`: the fake-quant model as the bundle runs it (as_deployed).

    A file must pass both as ONNX Runtime CPU fuses it (what `ort-cpu` runs; ONNX Runtime can run any INT8 file of
    the bundle) and as written (every Q/DQ executed: the explicit-quantization semantics TensorRT and the CUDA
    provider implement). A wrong graph fails both; a file that fails only the first is let down by the kernels.
    And every layer of it must compute the model's integers from what that layer reads (layer_parity.layer_check):
    the end-to-end statistics cannot see a fault in one layer of a model whose ties cascade."""
    floor = noise_floor(references, threshold, morphology)
    parity = {FLOOR_KEY: {**floor, "frames_from": frames_from},
              "gate": {"factor": GATE_FACTOR, "slack": dict(GATE_SLACK), "tie_nudges": list(TIE_NUDGES),
                       "rule": "each statistic <= factor x the model's own (the largest of its float32 draws against "
                               "float64) + slack, both as ONNX Runtime CPU runs the file and as written "
                               "(ORT_DISABLE_ALL); and, teacher-forced layer by layer on the first "
                               f"{LAYER_FRAMES} frames, at most {LAYER_BOUND:g} x its elements + {LAYER_SLACK} of each "
                               "activation quantizer's integers differing from the model's "
                               "(export/bundle/layer_parity.py)"}}
    refused = {}
    for path in paths:
        result = parity_of(path, images, references, threshold, morphology)
        deployed = tie_gate(result, floor)
        written = tie_gate({key: result[f"reference_{key}"] for key in GATE_SLACK}, floor)
        try:
            layers = layer_check(path, model, images)
        except ValueError as error:  # its tensors do not fit the model's: not this model's graph, so not kept
            layers = {"frames": 0, "passed": False, "failure": str(error), "worst": None, "worst_ratio": None}
        result["layers"] = layers
        result["gate"] = {"passed": deployed["passed"] and written["passed"] and layers["passed"],
                          "worst_ratio": max(deployed["worst_ratio"], written["worst_ratio"]),
                          "deployed": deployed, "as_written": written}
        result["frames_from"] = frames_from
        parity[path.name] = result
        if not result["gate"]["passed"]:
            refused[path.name] = (
                f"on {result['frames']} frames, as ONNX Runtime CPU runs it: "
                f"{'; '.join(deployed['failures']) or 'within the allowance'}; as written (ORT_DISABLE_ALL): "
                f"{'; '.join(written['failures']) or 'within the allowance (the fused kernels depart, not the graph)'}"
                f"; layer by layer (teacher-forced, {layers['frames']} frames): {layers['failure'] or 'passed'}")
    return parity, refused
