"""The offline HTML report: data model, images, and the single-file or folder form.

The report is one HTML page with inline CSS and vanilla JS (conceptscope_cli/export/page.py).
All data travels as JSON inside `<script type="application/json">` tags and is rendered
client-side with `textContent`, one view at a time (hash routes `#overview`, `#class/3`,
`#concept/123`, `#concept/123/3`), so a 1000-class report opens quickly. Images are
thumbnails: data URIs in the single-file form, files under `assets/` in the folder form,
chosen by size (`[export] single_file_max_mb`).

This module only needs in-memory inputs (`ReportInputs`) and, optionally, an `ImageSource`
for the top images and class examples; `export.stage` builds both from a project.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from conceptscope_cli.categorize.scores import STRENGTH_FIELDS
from conceptscope_cli.config.sections import ExportConfig
from conceptscope_cli.export.assets import AssetStore
from conceptscope_cli.export.page import PAGE_CSS, PAGE_JS
from conceptscope_cli.progress import NullReporter, Reporter

_TYPE_CODE = {"target": 0, "context": 1, "bias": 2, "uncertain": 3, "entangled": 4}
_STRENGTH_LABELS = {"mean": "concept strength", "relative": "concept strength (class mean / split mean)",
                    "effect": "concept strength (effect size, class vs rest)"}


class ImageSource(Protocol):
    """Where the report's dataset images come from (a project, or a fake in tests)."""

    def concept_images(self, latents: list[int], n: int, store: AssetStore) -> dict[int, list[tuple[str, int, float]]]:
        """Up to n strongest images per latent, heatmap drawn: {latent: [(asset id, label, value)]}."""

    def class_examples(self, label: int, latents: list[int], n: int,
                       store: AssetStore) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
        """For one class: {latent: ([(asset, value)] highest n, [(asset, value)] lowest n)}."""


@dataclass
class ReportInputs:
    """Everything the report shows, as the stages wrote it.

    meta: overview facts (title, dataset, split, backbone, layer, sae {architecture, d_in,
    d_sae, k, fvu, l0}, n_images, ...); categorization: `<split>_concept_categorization.json`;
    concepts: `concept_dict.json["latents"]`; latent_stats: `latent_stats.json["latents"]`;
    reference_dir: the folder `reference_image` paths are relative to (None: no tiles);
    class_mean / class_frequency: (C, m) from stats.h5 for the top classes of a concept
    (None: the top classes stored in latent_stats are used).
    """

    meta: dict[str, Any]
    categorization: dict[str, Any]
    concepts: dict[str, dict[str, Any]]
    latent_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference_dir: Path | None = None
    class_mean: np.ndarray | None = None
    class_frequency: np.ndarray | None = None
    act: dict[str, Any] | None = None  # `cscope groups` / `check-model` figures (act/report.py)


@dataclass
class RenderedReport:
    path: Path
    form: str  # "single" or "folder"
    size_bytes: int  # the HTML file, plus assets/ in the folder form
    n_images: int


def _num(x: Any) -> float | None:
    """A float with 5 significant digits (the report shows 3): a third of the JSON size."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.5g}")


def _replicate_fraction(class_info: dict[str, Any], latent: int) -> float | None:
    """Fraction of SAE-seed replicates making this class's bias claim on `latent` (None: no replicates
    or not a bias claim)."""
    for e in class_info.get("bias", []):
        if int(e["latent"]) == latent:
            return _num(e.get("replicate_fraction"))
    return None


def _class_list(categorization: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(categorization["classes"].items(), key=lambda item: item[1]["class"])


def build_report_data(inputs: ReportInputs, cfg: ExportConfig, images: ImageSource | None = None,
                      reporter: Reporter | None = None) -> tuple[dict[str, Any], AssetStore]:
    """The JSON the page renders, and the thumbnails it refers to."""
    reporter = reporter or NullReporter()
    store = AssetStore(cfg.image_format, cfg.quality)
    class_names: list[str] = list(inputs.meta.get("class_names") or [])
    classes_out: list[dict[str, Any]] = []
    candidate_of: dict[int, list[list[int]]] = {}  # latent -> [[class, type code]]
    members_of: dict[int, list[int]] = {}  # a concept group's representative -> its member latents
    # The scatter's y axis is the strength the bias rule used, so its threshold line is meaningful.
    flavour = inputs.categorization.get("meta", {}).get("categorize", {}).get("strength") or "mean"
    strength_key = STRENGTH_FIELDS.get(flavour, "concept_strength")
    for class_name, info in _class_list(inputs.categorization):
        y = int(info["class"])
        bias = {int(e["latent"]) for e in info.get("bias", [])}
        # Claims the context-only check moved out of `bias` (METHOD §Categorization): their own type,
        # with the check's effect and CI, so the page can say why they are not biases.
        checked = {int(e["latent"]): e["context_only"] for kind in ("bias", "entangled")
                   for e in info.get(kind, []) if e.get("context_only")}
        entangled = {int(e["latent"]) for e in info.get("entangled", [])}
        rows = []
        for kind in ("target", "context", "uncertain"):
            for e in info.get(kind, []):
                latent = int(e["latent"])
                shown_as = kind
                if kind == "context":
                    shown_as = "bias" if latent in bias else "entangled" if latent in entangled else kind
                check = checked.get(latent, {})
                # Row layout (page.py): latent, type, A, A', S, N, strength, class freq, freq, then the
                # evidence: effect (Cliff's delta), its CI, q, presence in class and in the rest, then the
                # replicate fraction, the typical class-vs-class delta (the base_rate = "typical" test),
                # and the context-only check's effect and CI (None where it did not run).
                code = _TYPE_CODE[shown_as]
                rows.append([latent, code] + [_num(e.get(key)) for key in (
                    "alignment_score", "normalized_alignment_score", "sufficiency", "necessity",
                    strength_key, "class_frequency", "frequency", "effect", "effect_low", "effect_high", "q_value",
                    "present_class", "present_rest")] + [_replicate_fraction(info, latent), _num(e.get("effect_typical"))]
                    + [_num(check.get(key)) for key in ("effect", "effect_low", "effect_high")])
                if len(e.get("members") or []) > 1:
                    members_of[latent] = [int(x) for x in e["members"]]
                candidate_of.setdefault(latent, []).append([y, code])
        thresholds = info.get("thresholds") or {}
        evidence = info.get("evidence") or {}
        classes_out.append({"id": y, "name": class_name, "n": info.get("n_images"), "rows": rows,
                            "tt": _num(thresholds.get("target_threshold")),
                            "bt": _num(thresholds.get("bias_strength_threshold")),
                            "rank": evidence.get("rank"), "status": evidence.get("status"),
                            "notes": list(info.get("notes") or [])})
        while len(class_names) <= y:
            class_names.append(str(len(class_names)))
        class_names[y] = class_name

    if cfg.concepts == "all":
        shown = sorted({int(k) for k in inputs.concepts} | set(candidate_of))
    else:
        shown = sorted(candidate_of)
    # Every member of a shown group gets its own entry (tile, statistics) on the concept page.
    shown = sorted(set(shown) | {m for members in members_of.values() for m in members})

    # Reference tiles.
    reporter.task("export: reference tiles", len(shown), unit="latents")
    concepts_out: dict[str, dict[str, Any]] = {}
    for latent in shown:
        info = inputs.concepts.get(str(latent), {})
        stats = inputs.latent_stats.get(str(latent), {})
        tile = None
        if inputs.reference_dir is not None and info.get("reference_image"):
            path = inputs.reference_dir / info["reference_image"]
            if path.is_file():
                with Image.open(path) as image:
                    tile = store.add(f"tile/{latent}", image, height=cfg.tile_height)
        freq = stats.get("frequency")
        concepts_out[str(latent)] = {
            "name": info.get("name"), "score": _num(info.get("score")), "clarity": _num(info.get("clarity")),
            "source": info.get("source"), "error": info.get("error"), "tile": tile,
            "freq": _num(freq[0]) if freq else None, "mwa": _num(stats.get("mean_when_active")),
            "max": _num(stats.get("max_value")), "ent": _num(stats.get("top_label_entropy")),
            "tc": _top_classes(inputs, latent, stats, cfg.top_classes),
            "in": candidate_of.get(latent, []), "top": [],
            "members": members_of.get(latent, []),
        }
        reporter.advance(1)

    examples: dict[str, list[list[list[Any]]]] = {}
    if images is not None and cfg.max_images_per_concept > 0:
        reporter.task("export: top images with heatmaps", len(shown), unit="latents")
        block = 64  # latents per call: the source batches its image decoding and SAE passes
        for start in range(0, len(shown), block):
            part = shown[start:start + block]
            found = images.concept_images(part, cfg.max_images_per_concept, store)
            for latent in part:
                concepts_out[str(latent)]["top"] = [[a, int(y), _num(v)] for a, y, v in found.get(latent, [])]
            reporter.advance(len(part))
    if images is not None and cfg.class_examples > 0:
        reporter.task("export: class examples", len(classes_out), unit="classes")
        for c in classes_out:
            latents = [row[0] for row in c["rows"]]
            if latents:
                found_examples = images.class_examples(c["id"], latents, cfg.class_examples, store)
                for latent, (high, low) in found_examples.items():
                    examples[f"{c['id']}/{latent}"] = [[[a, _num(v)] for a, v in high], [[a, _num(v)] for a, v in low]]
            reporter.advance(1)

    meta = dict(inputs.meta)
    meta["class_names"] = class_names
    meta["n_classes"] = len(classes_out)
    meta["n_concepts"] = len(concepts_out)
    run = inputs.categorization.get("meta", {})
    meta = {**meta, "strength_label": _STRENGTH_LABELS.get(flavour, "concept strength"),
            "bias_rule": run.get("bias_rule", "reference"), "alignment_estimator": run.get("alignment_estimator"),
            "fdr": (run.get("evidence") or {}).get("fdr"), "min_effect": (run.get("evidence") or {}).get("min_effect"),
            "base_rate": (run.get("evidence") or {}).get("base_rate"),
            "context_check": _context_check_summary(run.get("context_check"))}
    data = {"meta": meta, "classes": classes_out, "concepts": concepts_out, "examples": examples}
    if inputs.act:
        data["act"] = inputs.act
    return data, store


def _context_check_summary(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the overview says of the context-only check (None: it did not run)."""
    if not check:
        return None
    return {key: check.get(key) for key in ("column", "n_claims", "n_entangled", "n_images", "no_box", "no_context")}


def _top_classes(inputs: ReportInputs, latent: int, stats: dict[str, Any], n: int) -> list[list[Any]]:
    """[[label, mean strength, frequency]] of the classes where the latent is strongest."""
    if n <= 0:
        return []
    if inputs.class_mean is not None and latent < inputs.class_mean.shape[1]:
        column = inputs.class_mean[:, latent]
        order = np.argsort(-column, kind="stable")[:n]
        freq = inputs.class_frequency[:, latent] if inputs.class_frequency is not None else None
        return [[int(c), _num(column[c]), _num(freq[c]) if freq is not None else None]
                for c in order if column[c] > 0]
    return [[int(t["label"]), _num(t.get("mean")), _num(t.get("frequency"))] for t in stats.get("top_classes", [])[:n]]


def json_for_html(payload: Any) -> str:
    """JSON that is safe inside a <script> element.

    `<`, `>` and `&` are written as \\u escapes (so no `</script>` or `<!--` can end or
    change the element), and U+2028/U+2029 likewise; JSON.parse reads the same strings back.
    """
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def page_html(title: str, data_json: str, assets_json: str) -> str:
    """The whole page. A Content-Security-Policy allows only our own inline script and style
    (by hash) and images from data: URIs or the report's own folder: a second line of
    defence, on top of textContent, against script in the data, and a guarantee that the
    page cannot reach the network."""
    csp = (f"default-src 'none'; script-src {_csp_hash(PAGE_JS)}; style-src {_csp_hash(PAGE_CSS)}; "
           "img-src data: 'self'; connect-src 'none'; form-action 'none'; base-uri 'none'")
    safe_title = (title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                  .replace('"', "&quot;"))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        f"<title>{safe_title}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n"
        "<header id=\"top\"></header>\n<main id=\"main\"><noscript>This report needs JavaScript.</noscript></main>\n"
        f"<script type=\"application/json\" id=\"cscope-data\">{data_json}</script>\n"
        f"<script type=\"application/json\" id=\"cscope-assets\">{assets_json}</script>\n"
        f"<script>{PAGE_JS}</script>\n</body>\n</html>\n"
    )


def render_report(data: dict[str, Any], store: AssetStore, out_dir: Path, cfg: ExportConfig,
                  name: str = "report") -> RenderedReport:
    """Write `<name>.html` (single file) or `<name>/index.html` + `<name>/assets/` (folder form),
    whichever fits `single_file_max_mb`, and remove the other form if an earlier export left it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = str(data["meta"].get("title") or "cscope report")
    data_json = json_for_html(data)
    single_path = out_dir / f"{name}.html"
    folder = out_dir / name
    estimate = len(page_html(title, data_json, "{}").encode("utf-8")) + store.inline_size()
    if estimate <= cfg.single_file_max_mb * 1e6:
        assets = json_for_html({a: store.data_uri(a) for a in store.blobs})
        html = page_html(title, data_json, assets)
        _write_text(single_path, html)
        _remove_folder_form(folder)
        return RenderedReport(single_path, "single", single_path.stat().st_size, len(store))
    if (folder / "assets").is_dir():
        shutil.rmtree(folder / "assets")  # drop thumbnails of an earlier export: ids are reassigned
    written = store.write_files(folder / "assets")
    assets = json_for_html({a: "assets/" + store.file_name(a) for a in store.blobs})
    index = folder / "index.html"
    _write_text(index, page_html(title, data_json, assets))
    if single_path.is_file():
        single_path.unlink()
    return RenderedReport(index, "folder", index.stat().st_size + written, len(store))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _remove_folder_form(folder: Path) -> None:
    """Remove what the folder form writes (index.html, assets/), nothing else."""
    if (folder / "assets").is_dir():
        shutil.rmtree(folder / "assets")
    if (folder / "index.html").is_file():
        (folder / "index.html").unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
