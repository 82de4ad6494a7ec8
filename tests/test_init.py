"""`cscope init`: the generated manifest, `--dataset` layout detection, and labels in the usual shapes."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli, run_main

CLASSES = ["dog", "cat", "bird"]  # not sorted on purpose: the ClassLabel order is sorted


def write_own_dataset(root: Path, n_per_split: dict[str, int], *, class_folders: bool = True,
                      label_column: str | None = None, metadata: str | None = "csv", size: int = 24,
                      seed: int = 0) -> Path:
    """A user's imagefolder: `split/class/NNN.png` (or flat `split/NNN.png`), with a metadata
    file holding an attribute column (`background`) and optionally a string label column.
    Class c draws colour channel c bright, so the classes are learnable by any backbone."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in n_per_split.items():
        rows = []
        for i in range(n):
            c = i % len(CLASSES)
            name = f"{CLASSES[c]}/{i:03d}.png" if class_folders else f"{i:03d}.png"
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
            pixels[..., c] = 255
            background = ["grass", "water"][(i // len(CLASSES)) % 2]
            if background == "water":
                pixels[size // 2:, :, 2] = 200
            Image.fromarray(pixels).save(root / split / name)
            row = {"file_name": name, "background": background}
            if label_column:
                row[label_column] = CLASSES[c]
            rows.append(row)
        if metadata == "csv":
            with open(root / split / "metadata.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        elif metadata == "jsonl":
            (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _labels(folder: Path, split: str, **dataset_keys) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(class folder or csv label, integer label)]) as `open_split` reads them."""
    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.data.datasets import open_split

    cfg = DatasetConfig(source="imagefolder", path=str(folder), splits=["train", "test"], **dataset_keys)
    handle = open_split("own", cfg, split, folder)
    seen = [(Path(row["image"]["path"]).parent.name, handle.label_of(row)) for _, row in handle.iter_raw(0, None)]
    return handle.class_names, seen


def test_class_folders_with_metadata_keep_their_folder_labels(tmp_path: Path) -> None:
    """`datasets` drops folder labels when a metadata.csv exists; we derive them from the path."""
    folder = write_own_dataset(tmp_path / "own", {"train": 9, "test": 3})
    names, seen = _labels(folder, "train")
    assert names == sorted(CLASSES)
    assert seen and all(names[label] == parent for parent, label in seen)
    assert {label for _, label in seen} == {0, 1, 2}


def test_string_labels_map_to_sorted_classes_shared_by_all_splits(tmp_path: Path) -> None:
    folder = write_own_dataset(tmp_path / "own", {"train": 9, "test": 2}, class_folders=False, label_column="label")
    train_names, train = _labels(folder, "train")
    test_names, test = _labels(folder, "test")  # test holds only dog and cat: the numbering must not shift
    assert train_names == test_names == ["bird", "cat", "dog"]
    assert [label for _, label in test] == [2, 1]
    assert [label for _, label in train][:3] == [2, 1, 0]


def test_explicit_class_names_order_and_unknown_label_error(tmp_path: Path) -> None:
    from conceptscope_cli.errors import CscopeError

    folder = write_own_dataset(tmp_path / "own", {"train": 3, "test": 3}, class_folders=False, label_column="label")
    names, seen = _labels(folder, "train", class_names=["dog", "cat", "bird"])
    assert names == ["dog", "cat", "bird"] and [label for _, label in seen] == [0, 1, 2]
    with pytest.raises(CscopeError, match="'bird' is not one of the class_names"):
        _labels(folder, "train", class_names=["dog", "cat"])


def test_missing_label_column_hint_names_the_columns(tmp_path: Path) -> None:
    from conceptscope_cli.errors import CscopeError

    folder = write_own_dataset(tmp_path / "own", {"train": 3, "test": 3}, class_folders=False)
    with pytest.raises(CscopeError) as info:
        _labels(folder, "train")
    assert "background" in (info.value.hint or "") and "label_column" in (info.value.hint or "")


@pytest.mark.slow  # extract end to end
def test_extract_stores_folder_labels_of_a_string_label_dataset(tmp_path: Path, tiny_model_dir: Path) -> None:
    """End to end through `cscope extract`: no crash on string labels, labels follow the rows."""
    from conceptscope_cli.extract.store import ActivationReader
    from conceptscope_cli.project import Project

    folder = write_own_dataset(tmp_path / "own", {"train": 6, "test": 3}, class_folders=False, label_column="label")
    project = tmp_path / "proj"
    assert run_cli(["init", str(project), "--dataset", str(folder), "--model", f"local-dir:{tiny_model_dir}"],
                   tmp_path).exit_code == 0
    (project / "cscope.toml").write_text((project / "cscope.toml").read_text()
                                         .replace("# num_workers = 2", "num_workers = 0"))
    result = run_cli(["extract", "--split", "train"], project)
    assert result.exit_code == 0, result.output
    entry = next(e for e in Project.open(project).cache.entries() if e.kind == "activations")
    reader = ActivationReader(entry.path)
    assert reader.labels.tolist() == [2, 1, 0, 2, 1, 0]  # dog, cat, bird in sorted class order


# --------------------------------------------------------------------------- the template


def _sections_in(text: str) -> dict[str, str]:
    """{table header: its text} of a rendered manifest."""
    parts = re.split(r"^\[([^\]]+)\]$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_init_template_has_every_registered_key_and_runs_every_stage(tmp_path: Path) -> None:
    from conceptscope_cli.config.manifest import load_manifest, registered_sections
    from conceptscope_cli.config.sections import RunConfig
    from conceptscope_cli.pipeline.run import STAGES

    result = run_cli(["init", "proj"], tmp_path)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "proj" / "cscope.toml").read_text()
    tables = _sections_in(text)
    for name, spec in registered_sections().items():
        header = f"{name}.mydata" if spec.named else name
        assert header in tables, f"[{header}] missing from the template"
        for field in dataclasses.fields(spec.cls):
            assert re.search(rf"^(# )?{field.name} =", tables[header], flags=re.M), f"[{header}] {field.name} missing"
    manifest = load_manifest(tmp_path / "proj" / "cscope.toml")
    assert manifest.get(RunConfig).stages == list(STAGES)


def test_init_dataset_detects_layout(tmp_path: Path) -> None:
    from conceptscope_cli.config.manifest import load_manifest
    from conceptscope_cli.config.sections import DatasetConfig, RunConfig

    folder = write_own_dataset(tmp_path / "My Shapes", {"train": 6, "test": 3})
    result = run_cli(["init", "proj", "--dataset", str(folder), "--model", "example:tiny-clip"], tmp_path)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "proj" / "cscope.toml")
    dataset = manifest.named(DatasetConfig)["my_shapes"]
    assert manifest.get(RunConfig).dataset == "my_shapes"
    assert dataset.splits == ["train", "test"] and dataset.labels_from == "folder"
    assert dataset.class_names == ["bird", "cat", "dog"] and dataset.attribute_columns == ["background"]
    assert "3 class folders" in result.stdout


@pytest.mark.parametrize("metadata", ["csv", "jsonl"])
def test_init_dataset_single_split_with_string_label_column(tmp_path: Path, metadata: str) -> None:
    from conceptscope_cli.data.layout import detect_layout

    write_own_dataset(tmp_path / "flat", {"pics": 6}, class_folders=False, label_column="category", metadata=metadata)
    layout = detect_layout(tmp_path / "flat")  # "pics" is no split keyword: one train split, as datasets reads it
    assert layout.splits == ["train"] and layout.n_images == {"train": 6}
    assert (layout.labels_from, layout.label_column) == ("column", "category")
    assert layout.class_names == ["bird", "cat", "dog"] and layout.attribute_columns == ["background"]


def test_init_dataset_list_column_is_no_attribute_and_a_box_note(tmp_path: Path) -> None:
    """The example world's metadata has an object_box list column: not an attribute column, but a
    note that says how to use it as object_box_column."""
    from conceptscope_cli.data.layout import detect_layout
    from conceptscope_cli.example.world import WorldConfig, generate_world

    generate_world(tmp_path / "world", WorldConfig(n_train_per_class=2, n_test_per_class=1))
    layout = detect_layout(tmp_path / "world")
    assert layout.label_column == "label"
    assert layout.attribute_columns == ["background", "object_color", "object_texture", "co_object", "caption"]
    assert any('object_box_column = "object_box"' in n for n in layout.notes)


def _integer_labels(root: Path, names: list[str | None], labels: list[int]) -> Path:
    """A flat folder whose metadata.jsonl has an integer `label` and a `class_name` per row."""
    from PIL import Image

    (root / "train").mkdir(parents=True)
    with open(root / "train" / "metadata.jsonl", "w") as meta:
        for i, (label, name) in enumerate(zip(labels, names)):
            Image.new("RGB", (8, 8)).save(root / "train" / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "label": label, "class_name": name, "place": "ab"[i % 2]})
                       + "\n")
    return root


@pytest.mark.parametrize(("names", "labels", "expected"), [
    (["zebra", "ant", "zebra", "moth"], [2, 0, 2, 1], ["ant", "moth", "zebra"]),  # label order, not sorted
    (["zebra", "ant", "bee", "moth"], [2, 0, 2, 1], None),  # label 2 has two names
    (["zebra", "ant", "zebra", "ant"], [2, 0, 2, 1], None),  # "ant" names labels 0 and 1
    (["zebra", "ant", "zebra", "moth"], [3, 0, 3, 1], None),  # labels 0, 1, 3: no name for 2
    (["zebra", None, "zebra", "moth"], [2, 0, 2, 1], None),  # a row without a name
])
def test_init_names_integer_labels_from_a_column_with_one_name_per_label(
        tmp_path: Path, names: list[str | None], labels: list[int], expected: list[str] | None) -> None:
    from conceptscope_cli.data.layout import detect_layout

    layout = detect_layout(_integer_labels(tmp_path / "d", names, labels))
    assert layout.label_column == "label" and layout.class_names == expected
    if expected:
        assert layout.attribute_columns == ["place"] and layout.names_column == "class_name"
        assert any("named by the column 'class_name'" in n for n in layout.notes)
    else:
        assert layout.attribute_columns == ["class_name", "place"]
        assert any("set class_names to name them" in n for n in layout.notes)


def test_run_without_class_names_stops_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """categorize prompts CLIP with class names: a dataset without them is refused by `cscope run`
    before extract, train and dict spend their time, at the dataset's line, exit 2."""
    folder = _integer_labels(tmp_path / "d", ["zebra", "ant", "bee", "moth"], [2, 0, 2, 1])
    init = run_main(["init", "proj", "--dataset", str(folder), "--model", "example:tiny-clip"], tmp_path, capsys,
                    monkeypatch)
    assert init.exit_code == 0, init.output
    project = tmp_path / "proj"
    for args in (["run"], ["categorize"]):
        result = run_main(args, project, capsys, monkeypatch)
        assert result.exit_code == 2, result.output
        assert "cscope.toml:" in result.stderr and "`class_names` in section [datasets.d]" in result.stderr
        assert "its label column 'label' holds integers" in result.stderr
    assert not (project / ".cscope" / "cache" / "activations").exists()
    assert run_main(["run", "--stages", "extract"], project, capsys, monkeypatch).exit_code == 0  # needs no names
    assert (project / ".cscope" / "cache" / "activations").exists()


def test_init_dataset_mask_file_names_are_no_rows_and_a_mask_note(tmp_path: Path) -> None:
    """metadata.jsonl's `mask_file_name` names a second image per row: the mask files are not
    counted as images (datasets gives one row per metadata line), the column is no attribute, and
    a note says how to use it as object_mask_column."""
    import datasets
    from PIL import Image

    from conceptscope_cli.data.layout import detect_layout

    (tmp_path / "d" / "train").mkdir(parents=True)
    with open(tmp_path / "d" / "train" / "metadata.jsonl", "w") as meta:
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / f"{i}.png")
            Image.new("L", (8, 8)).save(tmp_path / "d" / "train" / f"{i}_mask.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "mask_file_name": f"{i}_mask.png", "label": "ab"[i % 2],
                                   "place": "x"}) + "\n")
    layout = detect_layout(tmp_path / "d")
    rows = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "d"), split="train")
    assert layout.n_images == {"train": len(rows)} == {"train": 3}
    assert layout.attribute_columns == ["place"] and layout.class_names == ["a", "b"]
    assert any('object_mask_column = "mask"' in n for n in layout.notes), layout.notes


def test_init_dataset_without_labels_says_so(tmp_path: Path) -> None:
    from conceptscope_cli.data.layout import detect_layout

    write_own_dataset(tmp_path / "flat", {"train": 4}, class_folders=False, metadata=None)
    layout = detect_layout(tmp_path / "flat")
    assert layout.labels_from is None and layout.class_names is None
    assert any("no labels found" in n for n in layout.notes)


# --------------------------------------------------------------------------- a new user, end to end


def write_user_world(root: Path, n_train_per_class: int = 24, n_test_per_class: int = 8) -> Path:
    """The example's shapes as a user would lay them out: `split/<shape>/NNNNNN.png` class folders
    and a metadata.csv with a string label (`shape`) and an attribute column (`background`)."""
    import shutil

    from conceptscope_cli.example.world import WorldConfig, generate_world

    source = root / "generated"
    generate_world(source, WorldConfig(n_train_per_class=n_train_per_class, n_test_per_class=n_test_per_class))
    target = root / "my-shapes"
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (source / split / "metadata.jsonl").read_text().splitlines()]
        out = []
        for row in rows:
            name = f"{row['class_name']}/{row['file_name']}"
            (target / split / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / split / row["file_name"], target / split / name)
            out.append({"file_name": name, "shape": row["class_name"], "background": row["background"]})
        with open(target / split / "metadata.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["file_name", "shape", "background"])
            writer.writeheader()
            writer.writerows(out)
    shutil.rmtree(source)
    return target


@pytest.mark.slow
def test_new_user_runs_own_imagefolder_without_editing(tmp_path: Path) -> None:
    """Issue 16's acceptance: class folders + metadata.csv (string labels, an attribute column), then
    `cscope init --dataset` and `cscope run`, no manual edit: valid latents and every class categorized."""
    folder = write_user_world(tmp_path)
    init = run_cli(["init", "proj", "--dataset", str(folder), "--model", "example:tiny-clip"], tmp_path)
    assert init.exit_code == 0, init.output
    project = tmp_path / "proj"
    run = run_cli(["--strict", "run"], project, timeout=1200)
    assert run.exit_code == 0, run.output
    outputs = project / "outputs" / "my-shapes"
    valid = json.loads((outputs / "train" / "valid_latents.json").read_text())
    assert len(valid["valid_latents"]) >= 10, valid["thresholds"]
    categorization = json.loads((outputs / "train_concept_categorization.json").read_text())
    shapes = ["circle", "cross", "ring", "square", "triangle"]
    assert sorted(categorization["classes"]) == shapes
    assert categorization["meta"]["class_names"] == shapes  # the sorted string labels
    for name, info in categorization["classes"].items():
        assert info["target"] or info["context"] or info.get("uncertain"), name
    assert (project / "outputs" / "report" / "my-shapes" / "train" / "report.html").is_file()
