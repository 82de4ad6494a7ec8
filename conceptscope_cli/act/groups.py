"""`cscope groups`: bias groups per image, balancing weights and a group-robust training manifest.

For every bias claim (class y, concept c) of a categorization, the concept's image-level
activation a_c(x) (the sum of its member latents' a(x), from the dict stage's CSR; a claim on
one latent stands for the latents that fire with it, `act/concepts.py`) gets one
threshold, chosen on the categorized split from the class-vs-rest separation: the cut that
maximises Youden's J (= balanced accuracy) between y's images and the rest (`stats.youden_cut`,
scale-free: only the order of the values matters). On the split being grouped (the same or
another split under the same SAE), c is present ⇔ a_c(x) > threshold; an image of class y'
falls in group y' ∧ c or y' ∧ ¬c (group id 2·y' + present). For y' = y these are the
bias-aligned and bias-conflicting groups. Outputs (conceptscope_cli/FORMATS.md, "Bias groups"):
`groups.csv` / `groups.parquet` (one row per image, three columns per claim), `manifest.csv`
and `balanced_subset.csv` (`path,label,group,weight`), `groups.json` (claims, thresholds,
group sizes, legend).
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import conceptscope_cli
from conceptscope_cli.act import stats as A
from conceptscope_cli.act.claims import (
    BiasClaim,
    categorization_path,
    dictionary_latents,
    load_categorization,
    read_claims,
)
from conceptscope_cli.act.concepts import claim_concepts
from conceptscope_cli.cache.store import CacheEntry, content_key, write_json_atomic
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

THRESHOLD_RULE = ("present ⇔ a_c(x) > t, t = the cut between two observed values of a_c on the categorized split "
                  "that maximises Youden's J (TPR − FPR, i.e. balanced accuracy) of class y's images against the rest")


@dataclass
class ClaimGroups:
    claim: BiasClaim
    cut: A.Cut
    activation: np.ndarray  # (N,) float32 on the grouped split
    present: np.ndarray  # (N,) bool
    group: np.ndarray  # (N,) int64 = 2·label + present
    weight: np.ndarray  # (N,) float64, balances the claim's groups within each class

    def sizes(self, class_names: list[str]) -> dict[str, int]:
        ids, counts = np.unique(self.group, return_counts=True)
        return {group_name(int(g), class_names, self.claim): int(n) for g, n in zip(ids, counts)}

    def role_sizes(self) -> dict[str, int]:
        """aligned (y ∧ c), conflicting (y ∧ ¬c), other_with (y' ∧ c), other_without (y' ∧ ¬c)."""
        return {role: int(mask.sum()) for role, mask in roles(self.group, self.claim.label).items()}


def roles(group: np.ndarray, label: int) -> dict[str, np.ndarray]:
    mine = group // 2 == label
    present = group % 2 == 1
    return {"aligned": mine & present, "conflicting": mine & ~present,
            "other_with": ~mine & present, "other_without": ~mine & ~present}


def group_name(group: int, class_names: list[str], claim: BiasClaim | None = None) -> str:
    y, present = divmod(int(group), 2)
    cls = class_names[y] if 0 <= y < len(class_names) else str(y)
    concept = f"#{claim.concept}" if claim else "c"
    return f"{cls}∧{'' if present else '¬'}{concept}"


@dataclass
class GroupsResult:
    out_dir: Path
    up_to_date: bool
    dataset: str
    split: str
    claims_split: str
    class_names: list[str]
    labels: np.ndarray  # (N,)
    row_index: np.ndarray  # (N,)
    claims: list[ClaimGroups]
    manifest_groups: np.ndarray  # (N,)
    manifest_weights: np.ndarray  # (N,)
    subset: np.ndarray  # positions of the balanced subset
    files: dict[str, Path] = field(default_factory=dict)
    entries: dict[str, CacheEntry] = field(default_factory=dict)  # split -> its latents entry


def concept_columns(matrix: Any, members: dict[str, tuple[int, ...]], nnz_per_block: int = 1 << 20
                    ) -> dict[str, np.ndarray]:
    """a_c(x) = Σ_{k ∈ members(c)} a_k(x) for several concepts in one pass over the CSR: (N,) each.

    Per row block, the block restricted to the members' latents (b × m_w, sparse) times the 0/1
    membership matrix (m_w × K): work O(nnz · members per latent), memory O(N · K) for the result.
    """
    import torch

    from conceptscope_cli.dictionary import groups as G

    keys = list(members)
    wanted = np.array(sorted({k for ms in members.values() for k in ms}), dtype=np.int64)
    column_of = np.full(matrix.n_latents, -1, dtype=np.int64)
    column_of[wanted] = np.arange(len(wanted))
    membership = np.zeros((len(wanted), len(keys)), dtype=np.float64)
    for j, key in enumerate(keys):
        membership[column_of[list(members[key])], j] = 1.0
    out = np.zeros((matrix.n_images, len(keys)), dtype=np.float64)
    weights = torch.from_numpy(membership)
    for start, stop, indptr, indices, values in G.iter_csr_blocks(matrix, nnz_per_block):
        indptr, cols, vals = G.restrict_block(indptr, indices, values, column_of)
        if len(cols) == 0:
            continue
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is tested
            warnings.simplefilter("ignore", UserWarning)
            block = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(vals),
                                            size=(stop - start, len(wanted)), check_invariants=False)
            out[start:stop] = (block @ weights).numpy()
    return {key: out[:, j].astype(np.float32) for j, key in enumerate(keys)}


def sae_of(project: Project, meta: dict[str, Any]) -> tuple[Path, str]:
    """(folder, fingerprint as the dict stage keys it) of the SAE behind a dictionary's meta."""
    from conceptscope_cli.sae.checkpoint import sae_fingerprint

    if meta.get("sae"):
        folder = Path(meta["sae"])
        if not (folder / "sae.safetensors").is_file():
            raise CscopeError(f"the SAE of this categorization is gone: {folder}")
        return folder, sae_fingerprint(folder)
    entry = project.cache.lookup("sae", meta["sae_entry"])
    if entry is None:
        raise CscopeError("the SAE behind this categorization is no longer in the cache", hint="run `cscope train`")
    return entry.path, "cache:" + entry.key


def split_latents(project: Project, dataset: str, split: str, meta: dict[str, Any], *, device: str | None,
                  reporter: Reporter) -> CacheEntry:
    """The image-level latents of a split under the categorization's SAE, through the dict stage's own
    machinery (activations extracted and latents encoded when missing)."""
    from conceptscope_cli.context import run_context
    from conceptscope_cli.dictionary.stage import latents_entry
    from conceptscope_cli.extract.activations import extract_activations

    if split == meta.get("split") and meta.get("latents_entry"):
        entry = project.cache.lookup("latents", meta["latents_entry"])
        if entry is not None:
            return entry
    sae_dir, sae_key = sae_of(project, meta)
    activations = extract_activations(project, dataset, split, device=device, reporter=reporter, full_tokens=True).entry
    return latents_entry(project, run_context(project, dataset, split, device=device), activations, sae_dir, sae_key,
                         reporter=reporter)


def image_paths(project: Project, dataset: str, split: str, row_index: np.ndarray) -> list[str]:
    """The file path of every image (by row index), '' when the dataset does not store one."""
    from conceptscope_cli.data.datasets import open_split

    _, dataset_cfg = project.dataset(dataset)
    handle = open_split(dataset, dataset_cfg, split, project.root, project.cache)
    column = dataset_cfg.image_column
    wanted = {int(r) for r in row_index}
    found: dict[int, str] = {}
    stop = int(row_index.max()) + 1 if len(row_index) else 0
    for row, raw in handle.iter_raw(0, stop):
        if row in wanted:
            value = raw.get(column)
            found[row] = str(value.get("path") or "") if isinstance(value, dict) else ""
    return [found.get(int(r), "") for r in row_index]


def compute_groups(
    project: Project,
    dataset_name: str | None = None,
    split_name: str | None = None,
    *,
    claims_split: str | None = None,
    device: str | None = None,
    reporter: Reporter | None = None,
    write: bool = True,
) -> GroupsResult:
    """Bias groups of `split_name` (default: the claims split) for the claims of `claims_split`
    (default: the dataset's first split), written to `<outputs>/<dataset>/<split>/groups/`."""
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    reporter = reporter or NullReporter()
    name, dataset_cfg = project.dataset(dataset_name)
    source = project.split(dataset_cfg, claims_split)
    split = split_name or source
    if split not in dataset_cfg.splits:
        raise CscopeError(f"split {split!r} is not listed for dataset {name!r}",
                          hint=f"configured splits: {', '.join(dataset_cfg.splits)}")
    categorization = load_categorization(categorization_path(project.outputs_dir, name, source))
    meta = categorization["meta"]
    class_names: list[str] = list(meta["class_names"])
    latent_claims = read_claims(categorization)
    if not latent_claims:
        raise CscopeError(f"the categorization of {name}/{source} lists no bias", hint="nothing to group by")
    latents, threshold = dictionary_latents(project.outputs_dir / name / source)

    source_entry = split_latents(project, name, source, meta, device=device, reporter=reporter)
    with LatentMatrix(source_entry.path / "latents.h5") as matrix:
        claims, source_values = claim_concepts(matrix, latent_claims, latents, threshold)
        source_labels = matrix.labels.copy()
    members = {c.key: c.members for c in claims}
    cuts = {c.key: A.youden_cut(source_values[c.key], source_labels == c.label) for c in claims}
    if split == source:
        entry, values, labels = source_entry, source_values, source_labels
        with LatentMatrix(entry.path / "latents.h5") as matrix:
            row_index = matrix.row_index.copy()
    else:
        entry = split_latents(project, name, split, meta, device=device, reporter=reporter)
        with LatentMatrix(entry.path / "latents.h5") as matrix:
            values = concept_columns(matrix, members)
            labels, row_index = matrix.labels.copy(), matrix.row_index.copy()

    per_claim = []
    for claim in claims:
        present = values[claim.key] > cuts[claim.key].threshold
        group = A.group_ids(labels, present)
        per_claim.append(ClaimGroups(claim, cuts[claim.key], values[claim.key], present, group,
                                     A.balancing_weights(labels, group)))
    # The manifest's one group per image: its class and whether its class's strongest claim holds.
    primary: dict[Any, ClaimGroups] = {}
    for item in per_claim:
        primary.setdefault(item.claim.label, item)
    present_own = np.zeros(len(labels), dtype=bool)
    for y, item in primary.items():
        present_own[labels == y] = item.present[labels == y]
    manifest_groups = A.group_ids(labels, present_own)
    manifest_weights = A.balancing_weights(labels, manifest_groups)
    subset = A.balanced_subset(labels, manifest_groups, project.settings.seed)
    out_dir = project.outputs_dir / name / split / "groups"
    result = GroupsResult(out_dir, False, name, split, source, class_names, labels, row_index, per_claim,
                          manifest_groups, manifest_weights, subset, entries={source: source_entry, split: entry})
    if not write:
        return result
    stamp = content_key({"categorization": meta.get("stamp"), "latents": [source_entry.key, entry.key],
                         "seed": project.settings.seed, "rule": THRESHOLD_RULE, "claims": [c.to_json() for c in claims],
                         "format_version": conceptscope_cli.FORMAT_VERSION})
    files = {k: out_dir / f for k, f in (("csv", "groups.csv"), ("parquet", "groups.parquet"), ("json", "groups.json"),
                                         ("manifest", "manifest.csv"), ("subset", "balanced_subset.csv"))}
    result.files = files
    stamp_file = out_dir / ".groups.stamp"
    if stamp_file.is_file() and stamp_file.read_text() == stamp and all(p.is_file() for p in files.values()):
        result.up_to_date = True
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)  # a partial rewrite is never taken for a complete one
    paths = image_paths(project, name, split, row_index)
    _write_tables(result, paths, files)
    write_json_atomic(files["json"], _summary(result, meta, source_entry, entry, primary, project.settings.seed))
    stamp_file.write_text(stamp)
    return result


def _frame(result: GroupsResult, paths: list[str]) -> dict[str, Any]:
    names = np.array(result.class_names + ["?"], dtype=object)
    columns: dict[str, Any] = {
        "position": np.arange(len(result.labels), dtype=np.int64),
        "row_index": result.row_index.astype(np.int64),
        "image_id": [f"{result.dataset}/{result.split}/{int(r)}" for r in result.row_index],
        "path": paths,
        "label": result.labels.astype(np.int64),
        "class": list(names[np.where(result.labels >= 0, result.labels, len(result.class_names))]),
    }
    for item in result.claims:
        key = item.claim.key
        columns[f"{key}:activation"] = item.activation.astype(np.float32)
        columns[f"{key}:present"] = item.present.astype(bool)
        columns[f"{key}:group"] = item.group.astype(np.int64)
        columns[f"{key}:weight"] = item.weight.astype(np.float64)
    return columns


def _write_tables(result: GroupsResult, paths: list[str], files: dict[str, Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _frame(result, paths)
    table = pa.table(columns)
    meta = {"cscope": json.dumps({"dataset": result.dataset, "split": result.split, "claims_split": result.claims_split,
                                  "format_version": conceptscope_cli.FORMAT_VERSION})}
    tmp = files["parquet"].with_name(files["parquet"].name + ".tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    tmp.replace(files["parquet"])
    _write_csv(files["csv"], list(columns), [list(r) for r in zip(*columns.values())])
    manifest_rows = [[p, int(y), int(g), float(w)] for p, y, g, w in
                     zip(paths, result.labels, result.manifest_groups, result.manifest_weights)]
    _write_csv(files["manifest"], ["path", "label", "group", "weight"], manifest_rows)
    _write_csv(files["subset"], ["path", "label", "group", "weight"],
               [[manifest_rows[i][0], manifest_rows[i][1], manifest_rows[i][2], 1.0] for i in result.subset])


def _cell(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # round-trips exactly
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value  # a spreadsheet must not run a path as a formula
    return value


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([_cell(v) for v in row] for row in rows)
    tmp.replace(path)


def _summary(result: GroupsResult, meta: dict[str, Any], source: CacheEntry, entry: CacheEntry,
             primary: dict[int, ClaimGroups], seed: int) -> dict[str, Any]:
    names = result.class_names
    legend = {}
    for g in np.unique(result.manifest_groups):
        mask = result.manifest_groups == g
        y = int(g) // 2
        legend[str(int(g))] = {"name": group_name(int(g), names, primary[y].claim if y in primary else None),
                               "n": int(mask.sum()), "weight": float(result.manifest_weights[mask][0]),
                               "n_subset": int(np.isin(np.flatnonzero(mask), result.subset).sum())}
    return {
        "meta": {"dataset": result.dataset, "split": result.split, "claims_split": result.claims_split,
                 "categorization_stamp": meta.get("stamp"), "sae": meta.get("sae_entry") or meta.get("sae"),
                 "latents_entries": {result.claims_split: source.key, result.split: entry.key},
                 "n_images": int(len(result.labels)), "class_names": names, "threshold_rule": THRESHOLD_RULE,
                 "seed": seed, "cscope_version": conceptscope_cli.__version__},
        "claims": [{**item.claim.to_json(), "key": item.claim.key, "threshold": item.cut.threshold,
                    "youden_j": item.cut.j, "tpr": item.cut.tpr, "fpr": item.cut.fpr,
                    "roles": item.role_sizes(), "groups": item.sizes(names)} for item in result.claims],
        "manifest": {"claims": {names[y]: item.claim.key for y, item in sorted(primary.items())},
                     "groups": legend, "n_subset": int(len(result.subset))},
    }


def load_groups_table(path: Path) -> Any:
    """groups.parquet as a pyarrow Table (the one reader of the format)."""
    import pyarrow.parquet as pq

    return pq.read_table(path)
