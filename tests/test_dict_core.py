"""Concept-dictionary math: sparse storage, streaming statistics, valid latents, naming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conceptscope_cli.dictionary.clip_namer import name_latents_clip
from conceptscope_cli.dictionary.latents import (
    TAUS,
    LatentStatistics,
    encode_images,
    label_entropy,
    select_valid_latents,
)
from conceptscope_cli.dictionary.sparse import CSRWriter, LatentMatrix


def _sparse_random(n: int, m: int, active: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = np.zeros((n, m), dtype=np.float32)
    for i in range(n):
        cols = rng.choice(m, size=active, replace=False)
        dense[i, cols] = rng.exponential(0.3, size=active).astype(np.float32) + 1e-3
    return dense


def test_csr_round_trip_and_size(tmp_path: Path) -> None:
    dense = _sparse_random(1000, 2048, 40)
    labels = np.arange(1000) % 7
    writer = CSRWriter(tmp_path / "latents.h5", 2048)
    for start in range(0, 1000, 64):
        writer.append(dense[start:start + 64], labels[start:start + 64], np.arange(start, min(start + 64, 1000)) + 1000)
    writer.close()
    with LatentMatrix(tmp_path / "latents.h5") as matrix:
        np.testing.assert_array_equal(matrix.row_block(0, 1000), dense)  # values identical above zero
        np.testing.assert_array_equal(matrix.rows(np.array([299, 3, 150])), dense[[299, 3, 150]])
        np.testing.assert_array_equal(matrix.column(17), dense[:, 17])
        np.testing.assert_array_equal(matrix.column(17, chunk_nnz=100), dense[:, 17])  # bounded scan
        np.testing.assert_array_equal(matrix.class_positions(3), np.flatnonzero(labels == 3))
        positions, values = matrix.top_rows(5, 4)
        expected = np.argsort(-dense[:, 5], kind="stable")[:4]
        np.testing.assert_array_equal(positions, expected)
        np.testing.assert_array_equal(values, dense[expected, 5])
        assert matrix.row_index[0] == 1000 and matrix.nnz == 1000 * 40
    dense_bytes = dense.nbytes
    sparse_bytes = (tmp_path / "latents.h5").stat().st_size
    assert dense_bytes / sparse_bytes > 10  # 40 of 2048 active: ~25x smaller than float32 dense


def test_csr_writer_flushes_held_entries_in_order(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # The writer holds appended entries and writes them once ~_GROW are held: with a small
    # _GROW the flushes happen mid-stream (and between appended CSR blocks) and must land in order.
    from conceptscope_cli.dictionary import sparse

    monkeypatch.setattr(sparse, "_GROW", 1000)
    dense = _sparse_random(300, 512, 30)  # 9,000 entries: several flushes of ~1,000
    writer = CSRWriter(tmp_path / "latents.h5", 512)
    for start in range(0, 200, 16):
        writer.append(dense[start:min(start + 16, 200)], np.zeros(min(16, 200 - start)), np.arange(start, min(start + 16, 200)))
    rows, cols = np.nonzero(dense[200:] > 0)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=100))])
    writer.append_csr(indptr, cols, dense[200:][rows, cols], np.zeros(100), np.arange(200, 300))
    writer.close()
    with LatentMatrix(tmp_path / "latents.h5") as matrix:
        np.testing.assert_array_equal(matrix.row_block(0, 300), dense)
        assert matrix.nnz == 300 * 30


def test_statistics_match_direct_numpy() -> None:
    rng = np.random.default_rng(1)
    n, m, c = 90, 12, 3
    a = np.where(rng.random((n, m)) < 0.4, rng.exponential(0.4, (n, m)), 0).astype(np.float32)
    labels = rng.integers(0, c, n)
    stats = LatentStatistics(m, c, top_k=5)
    for start in range(0, n, 16):  # streamed in uneven blocks
        stop = min(start + 16, n)
        stats.update(torch.from_numpy(a[start:stop]), torch.from_numpy(labels[start:stop]), torch.arange(start, stop))
    out = stats.finalize(labels)
    for i, tau in enumerate(TAUS):
        np.testing.assert_allclose(out["frequency"][:, i], (a > tau).mean(0))
    np.testing.assert_allclose(out["mean"], a.mean(0), rtol=1e-6)
    active = (a > 0).sum(0)
    np.testing.assert_allclose(out["mean_when_active"], a.sum(0) / np.maximum(active, 1), rtol=1e-6)
    for k in range(c):
        rows = a[labels == k]
        np.testing.assert_allclose(out["class_mean"][k], rows.mean(0), rtol=1e-6)
        np.testing.assert_allclose(out["class_std"][k], rows.std(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["class_frequency"][k], (rows > 0).mean(0))
    for latent in range(m):
        expected = np.sort(a[:, latent])[::-1][:5]
        np.testing.assert_allclose(out["top_values"][latent], expected)
        np.testing.assert_allclose(a[out["top_positions"][latent], latent], expected)


def test_label_entropy_by_hand() -> None:
    labels = np.array([[0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 0, 0]])
    mask = np.array([[True] * 4, [True] * 4, [True, True, False, False]])
    entropy = label_entropy(labels, mask, 3)
    np.testing.assert_allclose(entropy, [np.log(2), 0.0, np.log(2)])


def test_valid_latent_rule_on_constructed_values() -> None:
    stats = {
        "mean_when_active": np.array([0.05, 0.2, 0.05, 0.08]),
        # top image values per latent (strongest first)
        "top_values": np.array([[0.9, 0.6, 0.1], [0.9, 0.8, 0.7], [0.9, 0.4, 0.3], [0.51, 0.51, 0.0]]),
    }
    valid, reasons = select_valid_latents(stats, noisy_threshold=0.1, min_strong_images=2, strong_value=0.5)
    # latent 1 is noisy, latent 2 has only one strong image
    assert valid.tolist() == [0, 3]
    assert reasons["noisy"].tolist() == [False, True, False, False]


def test_image_latents_are_token_means() -> None:
    class Square(torch.nn.Module):  # a stand-in SAE: f = relu(z) @ I, m = d
        W_enc = torch.eye(3)

        def encode(self, z: torch.Tensor) -> torch.Tensor:
            return torch.relu(z)

    acts = torch.tensor([[[1.0, -1.0, 2.0], [3.0, 1.0, -2.0]]])  # (1 image, 2 tokens, 3 dims)
    out = encode_images(Square(), acts, token_block=1)
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.5, 1.0]]))
    # The whole batch in one token block (the usual case) gives the same means.
    torch.testing.assert_close(encode_images(Square(), acts), torch.tensor([[2.0, 0.5, 1.0]]))


def test_clip_namer_scores_against_empty_prompt() -> None:
    # The empty-prompt baseline is the same for every label of a latent: it does not change the
    # argmax, it makes scores comparable across latents (how much a label adds over "any image").
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.2], [0.6, 0.8, 0.0]]), dim=-1)
    empty = torch.nn.functional.normalize(torch.tensor([0.6, 0.8, 0.0]), dim=-1)
    images = {0: torch.nn.functional.normalize(torch.tensor([0.8, 0.6, 0.0]), dim=0),
              1: torch.nn.functional.normalize(torch.tensor([0.9, 0.4, 0.1]), dim=0)}
    names = name_latents_clip({7: [0, 1]}, images, ["a", "b"], text, empty)
    mean = (images[0] + images[1]) / 2
    best = int(torch.argmax(text @ mean))
    assert names[7].name == "ab"[best] and names[7].runner_up == "ab"[1 - best]
    assert abs(names[7].score - float(text[best] @ mean - empty @ mean)) < 1e-6
    assert abs(names[7].clarity - float(images[0] @ images[1])) < 1e-6


def test_top_lists_keep_ties_by_position_and_pad_rare_latents() -> None:
    # latent 0: ties at 0.5 (positions 1, 3, 4) around a 0.9; latent 1 active once; latent 2 never.
    a = np.zeros((6, 3), dtype=np.float32)
    a[[0, 1, 2, 3, 4], 0] = [0.2, 0.5, 0.9, 0.5, 0.5]
    a[5, 1] = 0.7
    labels = np.array([0, 1, 0, 1, 0, 1])
    stats = LatentStatistics(3, 2, top_k=3)
    stats._merge_at = 1  # merge after every block: the streaming path, not one final sort
    for start in (0, 2, 4):
        stats.update(torch.from_numpy(a[start:start + 2]), torch.from_numpy(labels[start:start + 2]),
                     torch.arange(start, start + 2))
    out = stats.finalize(labels)
    assert out["top_positions"][0].tolist() == [2, 1, 3]
    np.testing.assert_allclose(out["top_values"][0], [0.9, 0.5, 0.5])
    assert out["top_positions"][1].tolist() == [5, -1, -1]
    np.testing.assert_allclose(out["top_values"][1], [0.7, -1.0, -1.0])
    assert out["top_labels"][1].tolist() == [1, -1, -1] and out["top_positions"][2].tolist() == [-1, -1, -1]
    assert out["top_label_entropy"][2] == 0.0


def test_statistics_from_csr_blocks_match_dense_updates(tmp_path) -> None:
    from conceptscope_cli.dictionary.latents import compute_statistics
    from conceptscope_cli.dictionary.sparse import CSRWriter

    rng = np.random.default_rng(3)
    n, m, c = 700, 40, 4
    a = np.where(rng.random((n, m)) < 0.1, rng.exponential(0.3, (n, m)), 0).astype(np.float32)
    labels = rng.integers(-1, c, n)  # some unlabelled rows
    writer = CSRWriter(tmp_path / "latents.h5", m)
    writer.append(a, labels, np.arange(n))
    writer.close()
    sparse = compute_statistics(tmp_path / "latents.h5", c, block=64)
    dense = LatentStatistics(m, c, top_k=100)
    dense.update(torch.from_numpy(a), torch.from_numpy(labels), torch.arange(n))
    expected = dense.finalize(labels)
    for name, value in expected.items():
        np.testing.assert_allclose(sparse[name], value, rtol=1e-12, atol=0, err_msg=name)
    top = np.sort(a, axis=0)[::-1][:100].T  # (m, 100), zeros where fewer than 100 active
    np.testing.assert_allclose(np.where(sparse["top_values"] < 0, 0, sparse["top_values"]), top)


def test_csr_indices_use_the_narrowest_unsigned_integer_and_old_files_read(tmp_path: Path) -> None:
    """Latent ids are stored in the narrowest unsigned integer holding m (lossless: the largest id
    m-1 survives at each boundary); int32 files of earlier versions read the same; a file whose ids
    cannot hold its latents is refused with a clear message; a CSR block with an out-of-range id is
    refused rather than wrapped."""
    import h5py
    import pytest

    from conceptscope_cli.errors import CscopeError

    for m, stored, per_entry in ((256, np.uint8, 1), (257, np.uint16, 2), (65_536, np.uint16, 2),
                                 (65_537, np.uint32, 4)):
        dense = np.zeros((3, m), dtype=np.float32)
        dense[0, [0, m - 1]] = [0.5, 1.25]
        dense[2, [m // 2, m - 2, m - 1]] = [2.0, 3.0, 0.125]
        path = tmp_path / f"m{m}.h5"
        writer = CSRWriter(path, m)
        writer.append(dense, np.array([0, 1, 2]), np.arange(3))
        writer.close()
        with h5py.File(path, "r") as f:
            assert f["indices"].dtype == stored, m
            # One HDF5 chunk of 2^15 ids, each `per_entry` bytes on disk.
            assert f["indices"].id.get_storage_size() == f["indices"].chunks[0] * per_entry == (1 << 15) * per_entry
        with LatentMatrix(path) as matrix:
            np.testing.assert_array_equal(matrix.row_block(0, 3), dense)
            indptr, indices, values = matrix.csr_block(0, 3)
            assert indices.dtype == np.int32 and indices.tolist() == [0, m - 1, m // 2, m - 2, m - 1]
            np.testing.assert_array_equal(matrix.column(m - 1), dense[:, m - 1])

    # A file of an earlier version: the same layout with int32 ids.
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f["indptr"] = np.array([0, 2, 2, 3], dtype=np.int64)
        f["indices"] = np.array([1, 511, 7], dtype=np.int32)
        f["values"] = np.array([0.5, 1.0, 2.0], dtype=np.float32)
        f["labels"] = np.array([0, 1, 0], dtype=np.int64)
        f["row_index"] = np.arange(3, dtype=np.int64)
        f.attrs["n_images"], f.attrs["n_latents"] = 3, 512
    with LatentMatrix(old) as matrix:
        expected = np.zeros((3, 512), np.float32)
        expected[0, [1, 511]], expected[2, 7] = [0.5, 1.0], 2.0
        np.testing.assert_array_equal(matrix.row_block(0, 3), expected)
    with h5py.File(old, "a") as f:
        del f["indices"]
        f["indices"] = np.array([1, 255, 7], dtype=np.uint8)  # cannot hold 512 latents
    with pytest.raises(CscopeError, match="uint8 cannot hold 512 latents"):
        LatentMatrix(old)

    writer = CSRWriter(tmp_path / "bad.h5", 300)
    with pytest.raises(ValueError, match="outside"):
        writer.append_csr(np.array([0, 1]), np.array([300], np.int32), np.array([1.0], np.float32), np.zeros(1),
                          np.zeros(1))
    writer.abort()


class _CountingWatch:
    """Stands in for devices.HeapWatch: counts the checks of every instance."""

    checks = 0

    def __init__(self, *args: object) -> None:
        pass

    def check(self) -> bool:
        _CountingWatch.checks += 1
        return False


def test_reference_tiles_are_drawn_in_bounded_batches(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Reference tiles read tokens and images a batch at a time (memory bounded by the batch, not
    by valid latents x top images) and come out byte-identical to one batch holding everything.
    Each batch is followed by a HeapWatch check and the whole by a trim: without them the tiles'
    forwards left ~180 MB of free heap resident through the Gram pass and the exit (dict at 8,000
    images: RSS at exit 1,425 -> 1,291 MB with them, README "Scaling out")."""
    from PIL import Image
    from torchvision import transforms as T

    from conceptscope_cli.backbone.views import model_view
    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.data.datasets import SplitHandle
    from conceptscope_cli.dictionary import reference
    from conceptscope_cli.dictionary.reference import write_reference_tiles
    from conceptscope_cli.sae.model import SparseAutoencoder

    trims: list[int] = []
    monkeypatch.setattr(reference, "HeapWatch", _CountingWatch)
    monkeypatch.setattr(reference, "release_free_memory", lambda: trims.append(1) or True)
    _CountingWatch.checks = 0

    n, grid, d, m = 12, (2, 2), 8, 16
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
    split = SplitHandle("s", "train", DatasetConfig(source="imagefolder", path="x", splits=["train"]),
                        [{"image": p} for p in pictures], "fp", None)
    tokens = torch.from_numpy(rng.normal(size=(n, 5, d)).astype(np.float32))  # CLS + 4 patches

    class Reader:
        row_index = np.arange(n, dtype=np.int64)[::-1].copy()  # positions are not rows
        labels = np.zeros(n, dtype=np.int64)
        n_images, n_tokens = n, 5
        largest = 0

        def read_images(self, positions: np.ndarray) -> np.ndarray:
            Reader.largest = max(Reader.largest, len(positions))
            return tokens[np.asarray(positions)].numpy()

    sae = SparseAutoencoder(d, m, "relu", generator=torch.Generator().manual_seed(0)).eval()
    view = model_view(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))
    latents = np.arange(m)
    top_positions = np.stack([rng.permutation(n)[:5] for _ in range(m)])
    top_values = np.where(rng.random((m, 5)) < 0.8, 1.0, -1.0)
    outputs = {}
    for batch in (3, 1000):
        Reader.largest = 0
        folder = tmp_path / f"b{batch}"
        outputs[batch] = write_reference_tiles(folder, latents, top_positions, top_values, reader=Reader(), sae=sae,
                                               split=split, view=view, grid=grid, device=torch.device("cpu"),
                                               n_images=5, batch_images=batch)
        if batch == 3:
            assert 0 < Reader.largest <= 5  # one latent's images at most when a latent exceeds the batch
    assert Reader.largest > 5  # the single batch read everything at once
    small, whole = outputs[3], outputs[1000]
    assert list(small) == list(whole) and len(small) > 10
    assert _CountingWatch.checks == len(small) + 1 and len(trims) == 2  # one latent per batch of 3, then one batch
    for latent in whole:
        assert small[latent]["rows"] == whole[latent]["rows"]
        assert (tmp_path / "b3" / small[latent]["path"].name).read_bytes() == whole[latent]["path"].read_bytes()


def test_image_token_reader_watches_the_heap_after_every_forward(monkeypatch) -> None:  # noqa: ANN001
    """Tokens recomputed from the images (dict's tiles without a token cache) run the backbone in
    batches, a batch loop like the stages': each forward is followed by a HeapWatch check; the
    tokens are each image's, in the order asked."""
    from PIL import Image

    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.data.datasets import SplitHandle
    from conceptscope_cli.dictionary import tokens as tokens_module
    from conceptscope_cli.dictionary.tokens import ImageTokenReader

    monkeypatch.setattr(tokens_module, "HeapWatch", _CountingWatch)
    _CountingWatch.checks = 0
    pictures = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(7)]
    split = SplitHandle("s", "train", DatasetConfig(source="imagefolder", path="x", splits=["train"]),
                        [{"image": p} for p in pictures], "fp", None)

    class Backbone:
        d_model = 2

        @staticmethod
        def preprocess(image: Image.Image) -> torch.Tensor:
            return torch.full((3,), float(image.getpixel((0, 0))[0]))

    class Tokens:
        backbone, n_tokens = Backbone(), 1

        def __call__(self, batch: torch.Tensor) -> torch.Tensor:
            return batch[:, None, :2]

    reader = ImageTokenReader(Tokens(), split, np.arange(7)[::-1].copy(), np.zeros(7, np.int64), batch_size=3)
    out = reader.read_images(np.array([0, 6, 2, 3, 1]))
    assert out[:, 0, 0].tolist() == [6, 0, 4, 3, 5] and out.shape == (5, 1, 2)
    assert _CountingWatch.checks == 2  # 5 images in batches of 3
