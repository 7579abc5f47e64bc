"""device_runtime.core.manifest: the bundle round-trips, and the runtime refuses a bundle that does not verify."""

import json

import pytest

from device_runtime.core.errors import InputError
from device_runtime.core.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, Manifest, describe_file, load_manifest, write_manifest)
from device_runtime.core.postprocess import Morphology

MODEL = "model.fp32.onnx"


@pytest.fixture
def bundle(tmp_path):
    """A bundle folder with one dummy model file and its manifest."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / MODEL).write_bytes(b"not really onnx, but sha256 does not care")
    manifest = Manifest(
        architecture="mobilenet_v3_large",
        input_size=(256, 256),
        threshold=0.14,
        morphology=Morphology(open_radius=1, min_area=16),
        files=[describe_file(folder, MODEL, "fp32", "onnx")],
        metrics={"validation": {"dice": 0.78}},
    )
    write_manifest(folder, manifest)
    return folder, manifest


def edit_manifest(folder, change):
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip(bundle):
    folder, written = bundle
    loaded = load_manifest(folder)
    assert loaded == written
    assert loaded.input_size == (256, 256) and isinstance(loaded.morphology, Morphology)
    assert loaded.file("fp32").path == MODEL and loaded.file("int8") is None
    assert loaded.files[0].bytes == (folder / MODEL).stat().st_size
    on_disk = json.loads((folder / MANIFEST_NAME).read_text())
    assert on_disk["format_version"] == FORMAT_VERSION
    assert on_disk["model"]["input"]["shape"] == ["batch", 1, 256, 256]


def test_tampered_file_is_refused(bundle):
    folder, _ = bundle
    (folder / MODEL).write_bytes(b"changed")
    with pytest.raises(InputError, match="sha256"):
        load_manifest(folder)
    assert load_manifest(folder, verify=False).threshold == 0.14  # inspecting it is still possible


def test_missing_file_is_refused(bundle):
    folder, _ = bundle
    (folder / MODEL).unlink()
    with pytest.raises(InputError, match="missing"):
        load_manifest(folder)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None, "1"])
def test_wrong_format_version_is_refused(bundle, version):
    folder, _ = bundle
    edit_manifest(folder, lambda data: data.update(format_version=version))
    with pytest.raises(InputError, match="format version"):
        load_manifest(folder)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_json_is_refused(bundle, text):
    folder, _ = bundle
    (folder / MANIFEST_NAME).write_text(text)
    with pytest.raises(InputError, match=MANIFEST_NAME):
        load_manifest(folder)


@pytest.mark.parametrize(
    "change",
    [
        lambda data: data.pop("threshold"),
        lambda data: data.update(morphology={"open_radius": -1}),
        lambda data: data["files"][0].update(unexpected=1),
    ],
)
def test_malformed_fields_are_refused(bundle, change):
    folder, _ = bundle
    edit_manifest(folder, change)
    with pytest.raises(InputError, match="malformed"):
        load_manifest(folder)


@pytest.mark.parametrize("absolute", [False, True])
def test_path_outside_the_bundle_is_refused(bundle, absolute):
    folder, _ = bundle
    outside = folder.parent / "x.onnx"
    outside.write_bytes(b"x")  # it exists, so only its location can be the objection
    path = str(outside) if absolute else "../x.onnx"
    edit_manifest(folder, lambda data: data["files"][0].update(path=path))
    with pytest.raises(InputError, match="outside the bundle"):
        load_manifest(folder)


def test_missing_bundle_and_manifest(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_manifest(tmp_path / "absent")
    with pytest.raises(InputError, match=MANIFEST_NAME):
        load_manifest(tmp_path)


def test_describe_file_checks_precision(bundle):
    folder, _ = bundle
    with pytest.raises(ValueError, match="precision"):
        describe_file(folder, MODEL, "int4", "onnx")


@pytest.mark.parametrize(
    "field,change",
    [
        ("input_name", lambda data: data.pop("input_name")),
        ("model.input", lambda data: data.pop("model")),
        ("threshold", lambda data: data.update(threshold="0.5")),
        ("threshold", lambda data: data.update(threshold=float("nan"))),
        ("threshold", lambda data: data.update(threshold=True)),
        ("input_size", lambda data: data.update(input_size=["256", "256"])),
        ("morphology.fill_holes", lambda data: data["morphology"].update(fill_holes="no")),
        ("morphology.min_area", lambda data: data["morphology"].pop("min_area")),
        ("output_kind", lambda data: data.update(output_kind="softmax")),
        ("files", lambda data: data.update(files=[])),
        ("files[0].precision", lambda data: data["files"][0].update(precision="int4")),
        ("files[0].sha256", lambda data: data["files"][0].update(sha256=1234)),
        ("files[0].bytes", lambda data: data["files"][0].update(bytes="12")),
        ("model.input.name", lambda data: data["model"]["input"].update(name="images")),
        ("model.input.shape", lambda data: data["model"]["input"].update(shape=["batch", 3, 256, 256])),
        ("model.output.kind", lambda data: data["model"]["output"].update(kind="probabilities")),
        ("metrics", lambda data: data.update(metrics=[1, 2])),
    ],
)
def test_each_field_is_checked_by_presence_and_type(bundle, field, change):
    folder, _ = bundle
    edit_manifest(folder, change)
    with pytest.raises(InputError) as refused:
        load_manifest(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / MANIFEST_NAME}: malformed manifest: {field} must be"), message
    assert "\n" not in message


def test_fields_added_later_may_be_absent(bundle):
    """Bundles written before a file's `runtimes` (and `bytes`) existed still load: both have defaults."""
    folder, written = bundle
    edit_manifest(folder, lambda data: [data["files"][0].pop(key) for key in ("runtimes", "bytes")])
    assert load_manifest(folder).files[0].runtimes == []


def test_a_manifest_with_a_text_threshold_is_refused_by_the_command_line(bundle, capsys):
    from device_runtime.cli import main

    folder, _ = bundle
    edit_manifest(folder, lambda data: data.update(threshold="0.5"))
    assert main(["run", "--bundle", str(folder), "--source", "synthetic:32x32", "--max-frames", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and MANIFEST_NAME in lines[0] and "threshold must be a number" in lines[0]
