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
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
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

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
EVIL = "<img src=x onerror=alert(1)>"
EVIL_CLASS = "</script><script>document.title='pwned'</script><!--"


# --------------------------------------------------------------------------- browser
@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt only when running as root in CI, else the test skips."""
    def found() -> str | None:
        for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
            if candidate and os.path.exists(candidate):
                return candidate
        return None

    path = found()
    if path is None and os.geteuid() == 0 and os.environ.get("CI"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=False, timeout=900)
        path = found()
    if path is None:
        pytest.skip("the report test needs Chromium: `apt-get install chromium` (the test installs it itself "
                    "when run as root with CI set)")
    return path


def browse(chromium: str, page: Path, fragment: str, work: Path, *, screenshot: Path | None = None,
           net_log: Path | None = None) -> str:
    """Open page#fragment from disk in headless Chromium; returns the DOM after the script ran
    (or writes a 1400×1000 screenshot). Host names all fail to resolve, so nothing can be fetched."""
    profile = work / "chromium-profile"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
            "--disable-extensions", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=5000", "--window-size=1400,1000", "--hide-scrollbars"]
    if net_log is not None:
        args.append(f"--log-net-log={net_log}")
    args += [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    proc = subprocess.run(args + [url], capture_output=True, text=True, timeout=120)
    if screenshot is not None:
        assert screenshot.is_file(), proc.stderr[-2000:]
        return ""
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


class Dom(HTMLParser):
    """The dumped DOM as a flat list of elements with their attributes and full text."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "text": [], "parents": [e["attrs"].get("id") for e in self._open]}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"].append(data)

    def by_id(self, element_id: str) -> dict:
        matches = [e for e in self.elements if e["attrs"].get("id") == element_id]
        assert matches, f"no element #{element_id}"
        return matches[0]

    def text(self, element_id: str) -> str:
        return "".join(self.by_id(element_id)["text"])

    def inside(self, element_id: str, tag: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and element_id in e["parents"]]

    def view(self) -> str:
        return self.by_id("main")["attrs"].get("data-view", "")


def assert_offline(html: str) -> None:
    """No src/href/url() that points at another host (the SVG namespace is a name, not a fetch)."""
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", html, re.I)
    assert not re.search(r"@import|<link\b|<iframe\b|fetch\(|XMLHttpRequest|WebSocket|EventSource", html)
    assert "connect-src 'none'" in html  # the page's CSP forbids any connection


def page_requests(net_log: Path) -> list[str]:
    """URLs the *page* asked the network stack for, from Chromium's net log.

    Chromium itself talks to Google services in the background (time, updates) even with
    background networking disabled; those requests carry the initiator "not an origin",
    while a page opened from disk starts its requests with the opaque origin "null".
    """
    text = net_log.read_text(errors="replace").rstrip()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # killed before the closing brackets were written
        log = json.loads(text.rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({event["params"].get("url", "") for event in log["events"]
                   if event["type"] == start_job and event.get("params", {}).get("initiator") != "not an origin"
                   and event["params"].get("url") and not event["params"]["url"].startswith(("file:", "data:"))})


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
                    "type": "bias" if entry["latent"] in bias else kind}
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
        for key in COLUMNS[6:]:
            assert float(row[key]) == want[key] or (math.isnan(float(row[key] or "nan")) and want[key] is None)

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
def synthetic_inputs(folder: Path, n_classes: int = 1000, n_latents: int = 4000, candidates: int = 20,
                     seed: int = 0) -> ReportInputs:
    """An ImageNet-sized categorization made without any model: names, scores, statistics and a
    reference tile (5 crops of 64 px, smooth colour with noise, like masked photos) per latent."""
    rng = np.random.default_rng(seed)
    (folder / "reference").mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 1, 64)
    bases = []
    for _ in range(40):
        hue = rng.random(3)
        crop = np.stack([np.outer(x ** (1 + hue[c]), 1 - x * hue[c]) for c in range(3)], -1) * 255
        tile = np.concatenate([crop * rng.random() + rng.normal(0, 12, crop.shape) for _ in range(5)], 1)
        bases.append(Image.fromarray(tile.clip(0, 255).astype(np.uint8)))
    concepts, stats = {}, {}
    for k in range(n_latents):
        name = f"reference/latent_{k:05d}.png"
        bases[k % len(bases)].save(folder / name)
        concepts[str(k)] = {"name": f"concept {k} " + "abcdefghij"[k % 10] * (4 + k % 7), "score": float(rng.random()),
                            "clarity": float(rng.random()), "source": "clip", "error": None,
                            "reference_image": name, "reference_rows": [1, 2, 3, 4, 5]}
        stats[str(k)] = {"frequency": [float(rng.random())] * 7, "mean": 0.1, "mean_when_active": 0.3,
                         "top_label_entropy": 1.2, "max_value": 2.0,
                         "top_classes": [{"label": int(c), "name": f"class {c}", "mean": float(rng.random()),
                                          "frequency": float(rng.random())} for c in rng.choice(n_classes, 5)]}
    classes = {}
    for y in range(n_classes):
        chosen = rng.choice(n_latents, candidates, replace=False)
        z = rng.normal(0, 1, candidates)
        strength = rng.gamma(2, 0.2, candidates)
        entries = [{"latent": int(k), "name": concepts[str(k)]["name"], "alignment_score": float(rng.normal(0, 0.05)),
                    "normalized_alignment_score": float(z[i]), "sufficiency": float(rng.random()),
                    "necessity": float(rng.random()), "concept_strength": float(strength[i]),
                    "class_frequency": float(rng.random()), "frequency": float(rng.random())}
                   for i, k in enumerate(chosen)]
        target = [e for e in entries if e["normalized_alignment_score"] >= 0]
        context = [e for e in entries if e["normalized_alignment_score"] < 0]
        cut = np.mean([e["concept_strength"] for e in context]) + np.std([e["concept_strength"] for e in context])
        classes[f"class {y} " + "xyz" * (y % 5)] = {
            "class": y, "n_images": 1300, "target": target, "context": context,
            "bias": [e for e in context if e["concept_strength"] >= cut],
            "thresholds": {"target_threshold": 0.0, "bias_sigma": 1.0, "bias_strength_threshold": float(cut)}, "notes": []}
    meta = {"title": "synthetic ImageNet-size report", "dataset": "synthetic", "split": "train", "n_images": 1_281_167,
            "backbone": "ViT-B-16", "layer": -2, "layer_index": 10,
            "sae": {"architecture": "topk", "d_in": 768, "d_sae": 49152, "k": 32, "fvu": 0.2, "l0": 32}}
    return ReportInputs(meta=meta, categorization={"meta": {}, "classes": classes}, concepts=concepts,
                        latent_stats=stats, reference_dir=folder)


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
