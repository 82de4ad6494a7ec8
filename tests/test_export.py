"""`cscope export`: the offline HTML report in a real browser, tables, SAE weights, size at scale.

The report is checked in headless Chromium (Debian's `chromium`): the DOM after the page's
script ran (`--dump-dom` with a virtual-time budget), with every host name unresolvable
and a net log that must show no request to the network. Screenshots go to
`<repo>/artifacts/` (gitignored) for a human to look at.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptscope_cli.config.sections import ExportConfig
from conceptscope_cli.export.report import ReportInputs, build_report_data, json_for_html, render_report
from conceptscope_cli.export.stage import export, sparse_columns
from conceptscope_cli.export.tables import COLUMNS
from conceptscope_cli.export.weights import export_sae
from conceptscope_cli.project import Project
from helpers import EVIL, EVIL_CLASS, Dom, assert_offline, browse, page_requests, synthetic_inputs

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


# --------------------------------------------------------------------------- browser


# --------------------------------------------------------------------------- tiny project
@pytest.fixture(scope="module")
def project_dir(categorized_tiny_project: Path) -> Path:
    return categorized_tiny_project


@pytest.fixture(scope="module")
def exported(project_dir: Path):  # noqa: ANN201 - ExportResult
    return export(Project.open(project_dir))


def _categorization(project_dir: Path) -> dict:
    return json.loads((project_dir / "outputs" / "shapes" / "train_concept_categorization.json").read_text())


@pytest.mark.slow  # headless browser
def test_report_renders_offline_in_chromium(project_dir: Path, exported, chromium: str, tmp_path: Path) -> None:
    report = exported.path("html")
    assert exported.report_form == "single" and report == project_dir / "outputs/report/shapes/train/report.html"
    html = report.read_text()
    assert_offline(html)
    categorization = _categorization(project_dir)
    concept = json.loads((project_dir / "outputs/shapes/train/concept_dict.json").read_text())

    net_log = tmp_path / "netlog.json"
    dom = Dom(browse(chromium, report, "", tmp_path, net_log=net_log))
    assert dom.view() == "overview"
    facts = dom.text("overview-facts")
    for expected in ("shapes", "train", "relu", "128 latents", "Classes3"):
        assert expected in facts
    ranking = dom.text("class-ranking")
    assert all(name in ranking for name in ("red", "green", "blue"))
    # ranked by evidence: a class without bias shows the plain "no evidence" state, the others their effect's CI
    for info in categorization["classes"].values():
        if not info["bias"]:
            assert "no evidence of bias at FDR 0.05" in ranking
        else:
            top = max(info["bias"], key=lambda e: e["effect_low"])
            assert f"[{top['effect_low']:.2f}, {top['effect_high']:.2f}]" in ranking
    assert page_requests(net_log) == []
    # ... and the check does see a page that reaches out.
    leak = tmp_path / "leak.html"
    leak.write_text('<img src="http://example.com/a.png"><script>fetch("https://example.org/b")</script>')
    browse(chromium, leak, "", tmp_path, net_log=tmp_path / "leak-netlog.json")
    assert page_requests(tmp_path / "leak-netlog.json") == ["http://example.com/a.png", "https://example.org/b"]

    red = categorization["classes"]["red"]
    dom = Dom(browse(chromium, report, "class/0", tmp_path))
    assert dom.view() == "class" and dom.text("class-title") == "red"
    circles = dom.inside("scatter", "circle")
    scored = red["target"] + red["context"] + red["uncertain"]
    assert len(circles) == len(scored)
    assert {c["attrs"]["data-latent"] for c in circles} == {str(e["latent"]) for e in scored}
    assert {c["attrs"]["fill"] for c in circles} <= {"#2166ac", "#8c8c8c", "#d6301d", "#e0a100"}
    dom.by_id("target-threshold")
    if red["thresholds"]["bias_strength_threshold"] is not None:
        dom.by_id("bias-threshold")
    assert len(dom.inside("list-target", "li")) == len(red["target"])
    assert len(dom.inside("list-bias", "li")) == len(red["bias"])
    tiles = list(dom.inside("list-target", "img"))
    assert tiles and all(e["attrs"]["src"].startswith("data:image/webp;base64,") for e in tiles) or not red["target"]

    latent = (red["bias"] or red["target"] or red["context"])[0]["latent"]
    dom = Dom(browse(chromium, report, f"concept/{latent}/0", tmp_path))
    assert dom.view() == "concept"
    assert dom.text("concept-title") == concept["latents"][str(latent)]["name"]
    top = dom.inside("top-images", "img")
    assert 1 <= len(top) <= 8 and all(e["attrs"]["src"].startswith("data:image/") for e in top)
    assert "red" in dom.text("top-classes") and "red" in dom.text("candidate-in")
    assert "highest activation" in dom.text("class-examples") and dom.inside("class-examples", "img")

    # A name search, then screenshots of the three views for a human to look at.
    ARTIFACTS.mkdir(exist_ok=True)
    for fragment, name in (("", "overview"), ("class/0", "class_0"), (f"concept/{latent}/0", "concept")):
        browse(chromium, report, fragment, tmp_path, screenshot=ARTIFACTS / f"export_report_{name}.png")
        with Image.open(ARTIFACTS / f"export_report_{name}.png") as shot:
            assert shot.size == (1400, 1000)
    print(f"\nreport {report.stat().st_size / 1e3:.0f} kB, screenshots in {ARTIFACTS}")


@pytest.mark.slow  # headless browser
def test_data_strings_are_text_never_markup(project_dir: Path, chromium: str, tmp_path: Path) -> None:
    # A copy of the project (next to the original, so its relative image path still works)
    # whose concept dictionary names a latent like an attacker would.
    evil = project_dir.parent / "proj-evil"
    if not evil.exists():
        shutil.copytree(project_dir, evil)
    dictionary = evil / "outputs/shapes/train/concept_dict.json"
    concept = json.loads(dictionary.read_text())
    red = _categorization(evil)["classes"]["red"]
    latent = str(red["target"][0]["latent"])
    concept["latents"][latent]["name"] = EVIL
    dictionary.write_text(json.dumps(concept))
    result = export(Project.open(evil), formats=["html", "csv"])
    html = result.path("html").read_text()
    assert EVIL not in html and "<img src=x" not in html

    for fragment, element in ((f"concept/{latent}/0", "concept-title"), ("class/0", "list-target")):
        dom = Dom(browse(chromium, result.path("html"), fragment, tmp_path))
        assert EVIL in dom.text(element)
        assert not [e for e in dom.elements if "onerror" in e["attrs"]]
        assert not [e for e in dom.elements if e["tag"] == "img" and e["attrs"].get("src") == "x"]
    with open(result.path("csv"), newline="") as handle:  # the tables keep the name verbatim
        assert EVIL in {row["name"] for row in csv.DictReader(handle)}

    # A class name that tries to close the data <script> element, built in memory.
    categorization = _categorization(project_dir)
    categorization["classes"] = {EVIL_CLASS if k == "red" else k: v for k, v in categorization["classes"].items()}
    inputs = ReportInputs(meta={"title": EVIL, "dataset": "shapes", "split": "train", "class_names": []},
                          categorization=categorization, concepts=concept["latents"])
    data, store = build_report_data(inputs, ExportConfig())
    page = render_report(data, store, tmp_path / "evil-class", ExportConfig()).path
    text = page.read_text()
    assert "</script><script>" not in text and text.count("<script") == 3
    assert json.loads(json_for_html(EVIL_CLASS)) == EVIL_CLASS
    dom = Dom(browse(chromium, page, "class/0", tmp_path))
    assert dom.text("class-title") == EVIL_CLASS
    assert "".join(dom.by_id("top")["text"]).startswith(EVIL)  # the title, shown as text
    assert len([e for e in dom.elements if e["tag"] == "script"]) == 3
    assert not [e for e in dom.elements if "onerror" in e["attrs"]]


def test_tables_equal_the_categorization(project_dir: Path, exported) -> None:
    categorization = _categorization(project_dir)
    expected = {}
    for name, info in categorization["classes"].items():
        bias = {e["latent"] for e in info["bias"]}
        for kind in ("target", "context", "uncertain"):
            for entry in info[kind]:
                expected[(info["class"], entry["latent"])] = {
                    **entry, "class": info["class"], "class_name": name, "n_images": info["n_images"],
                    "type": "bias" if entry["latent"] in bias else kind,
                    "members": ";".join(str(m) for m in entry["members"]), "replicate_fraction": None,
                    # no object boxes in this dataset: the context-only check did not run
                    "context_only_effect": None, "context_only_effect_low": None, "context_only_effect_high": None}
    assert expected

    rows = json.loads(exported.path("json").read_text())
    assert len(rows) == len(expected)
    for row in rows:
        want = expected[(row["class"], row["latent"])]
        assert set(row) == set(COLUMNS)
        assert {k: row[k] for k in COLUMNS} == {k: want[k] for k in COLUMNS}

    with open(exported.path("csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(expected)
    for row in csv_rows:
        want = expected[(int(row["class"]), int(row["latent"]))]
        assert row["class_name"] == want["class_name"] and row["type"] == want["type"] and row["name"] == (want["name"] or "")
        assert row["members"] == want["members"] and row["replicate_fraction"] == ""
        for key in COLUMNS[6:-5] + COLUMNS[-3:]:
            got = float(row[key] or "nan")  # an empty cell is a missing number
            assert got == want[key] or (math.isnan(got) and want[key] is None)

    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(exported.path("csv"))
    assert list(frame.columns) == list(COLUMNS) and len(frame) == len(expected)
    assert frame["concept_strength"].dtype.kind == "f"
    assert len(pd.read_json(exported.path("json"))) == len(expected)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, d_in: int) -> None:
    z = torch.randn(64, d_in, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        fa, fb = a.encode(z), b.encode(z)
        assert torch.equal(fa, fb) and fa.count_nonzero() > 0
        assert torch.equal(a.decode(fa), b.decode(fb))


def test_sae_weights_round_trip(project_dir: Path, exported, tmp_path: Path) -> None:
    from conceptscope_cli.sae.checkpoint import import_saelens, load_sae, sae_config_dict, save_sae
    from conceptscope_cli.sae.model import SparseAutoencoder

    concept = json.loads((project_dir / "outputs/shapes/train/concept_dict.json").read_text())
    entry = Project.open(project_dir).cache.lookup("sae", concept["meta"]["sae_entry"])
    original, _ = load_sae(entry.path)
    ours, _ = load_sae(exported.path("cscope-sae"))
    lens, _ = import_saelens(exported.path("saelens"))
    _same_outputs(original, ours, original.d_in)
    _same_outputs(original, lens, original.d_in)
    cfg = json.loads((exported.path("saelens") / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["d_in"] == 32 and cfg["d_sae"] == 128
    assert cfg["hook_name"] == "visual.transformer.resblocks.1" and cfg["hook_layer"] == 1
    assert cfg["context_size"] == 17 and cfg["prepend_bos"] is False  # CLS + 4x4 patches per image
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["metadata"]["hook_name"] == cfg["hook_name"]

    # topk (with k) and batchtopk (as SAELens' JumpReLU with one threshold per latent).
    for architecture in ("topk", "batchtopk"):
        sae = SparseAutoencoder(24, 96, architecture, k=5, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
            sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
            sae.threshold.fill_(0.4)
        source = save_sae(sae.eval(), tmp_path / architecture / "src",
                          sae_config_dict(sae, provenance={"backbone": "ViT-B-16", "layer": -2, "layer_index": 10}))
        folders = export_sae(source, tmp_path / architecture / "out", context_size=197, dataset_path="imagenet-1k")
        _same_outputs(sae, load_sae(folders["cscope"])[0], 24)
        lens_cfg = json.loads((folders["saelens"] / "cfg.json").read_text())
        assert lens_cfg["hook_name"] == "visual.transformer.resblocks.10" and lens_cfg["context_size"] == 197
        if architecture == "topk":
            assert lens_cfg["architecture"] == "topk" and lens_cfg["k"] == 5
            _same_outputs(sae, import_saelens(folders["saelens"])[0], 24)
        else:
            assert lens_cfg["architecture"] == "jumprelu"
            from safetensors.torch import load_file, save_file

            weights = load_file(str(folders["saelens"] / "sae_weights.safetensors"))
            z = torch.randn(32, 24, generator=torch.Generator().manual_seed(6))
            pre = (z - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
            jump = pre * (pre > weights["threshold"])  # SAELens JumpReLU
            with torch.no_grad():
                assert torch.allclose(jump, sae.encode(z), atol=1e-6)
            back = import_saelens(folders["saelens"])[0]  # and back: JumpReLU with one threshold = batchtopk
            assert back.architecture == "batchtopk" and back.k == 5 and float(back.threshold) == pytest.approx(0.4)
            _same_outputs(sae, back, 24)
            weights["threshold"][3] = 0.9  # per-latent thresholds have no cscope equivalent: refused
            save_file(weights, str(folders["saelens"] / "sae_weights.safetensors"))
            with pytest.raises(ValueError, match="per-latent"):
                import_saelens(folders["saelens"])


def test_sparse_columns_matches_dense_rows(project_dir: Path) -> None:
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    concept = json.loads((project_dir / "outputs/shapes/train/concept_dict.json").read_text())
    entry = Project.open(project_dir).cache.lookup("latents", concept["meta"]["latents_entry"])
    with LatentMatrix(entry.path / "latents.h5") as matrix:
        positions = np.array([0, 1, 2, 5, 9, 10, 3])  # runs and gaps, unsorted
        latents = [7, 3, 100, 64, 0]
        dense = matrix.rows(positions)[:, latents]
        assert np.array_equal(sparse_columns(matrix, positions, latents), dense) and dense.any()


# --------------------------------------------------------------------------- scale


@pytest.mark.slow  # 1000-class report
def test_thousand_class_report_size(tmp_path: Path, chromium: str) -> None:
    inputs = synthetic_inputs(tmp_path / "data")
    data, store = build_report_data(inputs, ExportConfig())
    single = render_report(data, store, tmp_path / "single", ExportConfig())
    size_mb = single.size_bytes / 1e6
    print(f"\n1000 classes x 20 candidates, {len(data['concepts'])} concepts, {single.n_images} tiles: "
          f"single-file report {size_mb:.1f} MB")
    assert single.form == "single" and size_mb < 40

    # Above single_file_max_mb the folder form is written instead, and the single file removed.
    small = ExportConfig(single_file_max_mb=2)
    folder = render_report(data, store, tmp_path / "single", small)
    index = folder.path
    print(f"folder form: index.html {index.stat().st_size / 1e6:.1f} MB + {len(store)} image files, "
          f"{folder.size_bytes / 1e6:.1f} MB in all")
    assert folder.form == "folder" and index.name == "index.html" and not (tmp_path / "single/report.html").exists()
    assert len(list((index.parent / "assets").iterdir())) == len(store)
    assert_offline(index.read_text())

    dom = Dom(browse(chromium, index, "class/999", tmp_path))
    assert dom.view() == "class" and dom.text("class-title").startswith("class 999")
    srcs = [e["attrs"]["src"] for e in dom.inside("list-target", "img")]
    assert srcs and all(s.startswith("assets/") and (index.parent / s).is_file() for s in srcs)
    dom = Dom(browse(chromium, index, "", tmp_path))
    assert dom.view() == "overview" and len(dom.inside("class-ranking", "tr")) == 101  # header + first 100
    ARTIFACTS.mkdir(exist_ok=True)
    browse(chromium, index, "class/999", tmp_path, screenshot=ARTIFACTS / "export_report_1000_classes.png")


def test_csv_cells_that_spreadsheets_would_run_are_neutralised(tmp_path: Path) -> None:
    """Issue 20: class and concept names come from data and a VLM; a leading = + - @ tab CR is defused."""
    import csv

    from conceptscope_cli.export.tables import COLUMNS, write_csv

    names = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain"]
    rows = [{**dict.fromkeys(COLUMNS), "class": i, "class_name": name, "name": name, "latent": i,
             "alignment_score": -0.25} for i, name in enumerate(names)]
    with open(write_csv(rows, tmp_path / "c.csv"), newline="", encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert [r["class_name"] for r in read] == ["'" + n for n in names[:-1]] + ["plain"]
    assert [r["name"] for r in read] == [r["class_name"] for r in read]
    assert {r["alignment_score"] for r in read} == {"-0.25"}  # numbers keep their sign


def test_group_members_and_replicate_fraction_in_the_report(project_dir: Path, exported, chromium: str,
                                                            tmp_path: Path) -> None:
    """A concept group's page shows every other member latent with its own reference tile; a bias
    claim's replicate fraction reaches the class rows and the tables."""
    red = _categorization(project_dir)["classes"]["red"]
    grouped = [e for e in red["target"] + red["context"] + red["uncertain"] if len(e["members"]) > 1]
    assert grouped, "the tiny project has multi-latent groups among red's candidates"
    entry = grouped[0]
    dom = Dom(browse(chromium, exported.path("html"), f"concept/{entry['latent']}/0", tmp_path))
    links = dom.inside("member-tiles", "a")
    assert {e["attrs"]["href"] for e in links} == {f"#concept/{m}" for m in entry["members"][1:]}
    assert len(dom.inside("member-tiles", "img")) == len(entry["members"]) - 1

    categorization = _categorization(project_dir)
    info = categorization["classes"]["red"]
    (info["context"] or info["target"])[0]["effect_typical"] = 0.375  # rows read the candidate lists
    claim = dict((info["context"] or info["target"])[0], replicate_fraction=0.5)
    info["bias"] = [claim]
    concept = json.loads((project_dir / "outputs/shapes/train/concept_dict.json").read_text())
    data, _ = build_report_data(ReportInputs(meta={"dataset": "shapes", "split": "train", "class_names": []},
                                             categorization=categorization, concepts=concept["latents"]),
                                ExportConfig())
    rows = {row[0]: row for c in data["classes"] if c["name"] == "red" for row in c["rows"]}
    assert rows[claim["latent"]][15] == 0.5
    assert rows[claim["latent"]][16] == 0.375  # the typical class-vs-class delta the default rule decides on
    assert all(row[15] is None for latent, row in rows.items() if latent != claim["latent"])
    from conceptscope_cli.export.tables import concept_rows

    table = {(r["class_name"], r["latent"]): r for r in concept_rows(categorization)}
    assert table[("red", claim["latent"])]["replicate_fraction"] == 0.5
    assert table[("red", entry["latent"])]["members"] == ";".join(map(str, entry["members"]))


def test_entangled_claims_have_their_own_place_in_the_report(project_dir: Path, chromium: str, tmp_path: Path) -> None:
    """Claims the context-only check moved out of `bias` are shown as entangled (own colour, own
    list, their context-only effect), counted per class in the overview, and never as bias."""
    categorization = _categorization(project_dir)
    info = categorization["classes"]["red"]
    # Two of red's candidates become context claims (the report reads only these lists).
    candidates = info["context"] + info["target"] + info["uncertain"]
    assert len(candidates) >= 2, "the tiny project's red class has at least two candidates"
    kept, moved = dict(candidates[0]), dict(candidates[1])
    chosen = {kept["latent"], moved["latent"]}
    for kind in ("target", "uncertain"):
        info[kind] = [e for e in info[kind] if e["latent"] not in chosen]
    info["context"] = [kept, moved] + [e for e in info["context"] if e["latent"] not in chosen]
    kept["context_only"] = {"effect": 0.61, "effect_low": 0.42, "effect_high": 0.77, "survives": True}
    moved["context_only"] = {"effect": 0.03, "effect_low": -0.11, "effect_high": 0.18, "survives": False}
    info["bias"], info["entangled"] = [kept], [moved]
    categorization["meta"]["context_check"] = {"column": "object_box", "n_claims": 2, "n_entangled": 1,
                                               "n_images": 96, "no_box": 0, "no_context": 0}
    concept = json.loads((project_dir / "outputs/shapes/train/concept_dict.json").read_text())
    data, store = build_report_data(ReportInputs(meta={"dataset": "shapes", "split": "train", "class_names": []},
                                                 categorization=categorization, concepts=concept["latents"]),
                                    ExportConfig())
    rows = {row[0]: row for c in data["classes"] if c["name"] == "red" for row in c["rows"]}
    assert rows[kept["latent"]][1] == 2 and rows[moved["latent"]][1] == 4  # bias, entangled
    assert rows[moved["latent"]][17:20] == [0.03, -0.11, 0.18]
    page = render_report(data, store, tmp_path / "report", ExportConfig()).path

    dom = Dom(browse(chromium, page, "class/0", tmp_path))
    assert [e["attrs"]["data-latent"] for e in dom.inside("list-entangled", "li")] == [str(moved["latent"])]
    assert [e["attrs"]["data-latent"] for e in dom.inside("list-bias", "li")] == [str(kept["latent"])]
    assert str(moved["latent"]) not in {e["attrs"]["data-latent"] for e in dom.inside("list-context", "li")}
    entangled_dots = [c for c in dom.inside("scatter", "circle") if c["attrs"]["data-latent"] == str(moved["latent"])]
    assert [c["attrs"]["fill"] for c in entangled_dots] == ["#7b3294"]
    assert "without the object 0.03 [-0.11, 0.18]" in "".join(dom.inside("list-entangled", "li")[0]["text"])
    assert dom.text("context-only-effect") == "0.61 [0.42, 0.77]"  # the picked concept: the class's bias

    dom = Dom(browse(chromium, page, "", tmp_path))
    head = [("".join(e["text"])) for e in dom.inside("class-ranking", "th")]
    red_row = next(r for r in dom.inside("class-ranking", "tr") if "red" in "".join(r["text"]))
    cells = ["".join(e["text"]) for e in _cells_of(dom, red_row)]
    assert cells[head.index("entangled")] == "1" and cells[head.index("bias concepts")] == "1"
    assert "1 of 2 whole-image claims" in dom.text("context-check-note")


def _cells_of(dom: Dom, row: dict) -> list[dict]:
    """The <td> elements of one table row, in order (the flat DOM keeps document order)."""
    start = dom.elements.index(row)
    cells = []
    for element in dom.elements[start + 1:]:
        if element["tag"] == "tr":
            break
        if element["tag"] == "td":
            cells.append(element)
    return cells
