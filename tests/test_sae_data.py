"""Streaming shuffle loader: coverage, bounded buffer, determinism, resume, eval split, rank split."""

import numpy as np
import torch

from conceptscope_cli.sae.data import (
    ShuffledTokenStream,
    iter_eval_batches,
    open_cache,
    sample_tokens,
    split_train_eval,
)
from conceptscope_cli.sae.synthetic import write_synthetic_cache

torch.set_num_threads(1)


def _indexed_cache(tmp_path, n_images=30, n_tokens=5, d=3, images_per_shard=7):
    """Cache whose token (image i, position t) carries the id i*T + t in every dimension."""
    entry = write_synthetic_cache(tmp_path / "entry", n_images=n_images, n_tokens=n_tokens, d=d,
                                  images_per_shard=images_per_shard, dtype="float32")
    import h5py

    start = 0
    for path in sorted((entry / "shards").glob("shard-*.h5")):
        with h5py.File(path, "r+") as handle:
            n = handle["activations"].shape[0]
            ids = np.arange(start * n_tokens, (start + n) * n_tokens, dtype=np.float32).reshape(n, n_tokens, 1)
            handle["activations"][...] = np.repeat(ids, d, axis=2)
            start += n
    return entry


def _ids(batch):
    return batch.tokens[:, 0].round().long().tolist()


def test_every_token_once_per_epoch_with_bounded_buffer(tmp_path):
    entry = _indexed_cache(tmp_path)
    layout = open_cache(entry)
    n_train, n_eval = split_train_eval(layout.n_images, 0.1)
    assert (n_train, n_eval) == (27, 3)
    stream = ShuffledTokenStream(layout, batch_size=9, shuffle_buffer=20, seed=3, n_train_images=n_train)
    epoch_tokens = n_train * 5  # 135 = 15 batches of 9
    seen = [i for _ in range(15) for i in _ids(stream.next_batch())]
    assert sorted(seen) == list(range(epoch_tokens))  # exactly once, no eval tokens
    assert seen != sorted(seen)  # actually shuffled
    assert stream.peak_buffer_tokens <= 20  # window = ⌊20/5⌋ = 4 images
    second = [i for _ in range(15) for i in _ids(stream.next_batch())]
    assert sorted(second) == list(range(epoch_tokens)) and second != seen  # new order next epoch


def test_deterministic_with_seed_and_resumable(tmp_path):
    layout = open_cache(_indexed_cache(tmp_path))

    def run(seed, n):
        stream = ShuffledTokenStream(layout, 8, 20, seed, n_train_images=27)
        return [_ids(stream.next_batch()) for _ in range(n)]

    assert run(1, 10) == run(1, 10)
    assert run(1, 10) != run(2, 10)
    full = run(1, 25)
    stream = ShuffledTokenStream(layout, 8, 20, 1, n_train_images=27)
    for _ in range(11):
        stream.next_batch()
    state = stream.state_dict()
    resumed = ShuffledTokenStream(layout, 8, 20, 1, n_train_images=27)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch()) for _ in range(14)] == full[11:]


def test_ranks_partition_each_global_batch(tmp_path):
    layout = open_cache(_indexed_cache(tmp_path))
    single = ShuffledTokenStream(layout, 12, 20, 4, n_train_images=27)
    ranks = [ShuffledTokenStream(layout, 12, 20, 4, n_train_images=27, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):
        expected = sorted(_ids(single.next_batch()))
        parts = [r.next_batch() for r in ranks]
        assert all(p.global_batch_size == 12 for p in parts)
        assert sorted(_ids(parts[0]) + _ids(parts[1])) == expected
    # each rank only ever held its half of a window
    assert max(r.peak_buffer_tokens for r in ranks) <= 10


def test_eval_slice_and_sample(tmp_path):
    layout = open_cache(_indexed_cache(tmp_path))
    batches = list(iter_eval_batches(layout, 27, 3, batch_size=4))
    ids = [int(v) for b in batches for v in b[:, 0].round()]
    assert ids == list(range(27 * 5, 30 * 5))
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert sum(len(b) for b in iter_eval_batches(layout, 27, 3, batch_size=4, max_tokens=6)) == 6
    sample = sample_tokens(layout, 27, 40)
    assert sample.shape == (40, 3)
    assert int(sample[:, 0].max()) < 27 * 5  # never from the held-out images


def test_synthetic_entries_are_read_by_the_one_shard_reader(tmp_path):
    """The synthetic writer goes through ShardWriter: extract's reader sees every attribute it needs,
    and the training loader lists the same shards (it used to glob them, and accepted entries
    that shard_infos rejects with KeyError 'row_start')."""
    from conceptscope_cli.extract.store import shard_infos

    entry = write_synthetic_cache(tmp_path / "entry", n_images=30, n_tokens=5, d=3, images_per_shard=7)
    infos = shard_infos(entry)
    assert [(i.row_start, i.row_stop, i.n_images, i.skipped) for i in infos] == [
        (0, 7, 7, []), (7, 14, 7, []), (14, 21, 7, []), (21, 28, 7, []), (28, 30, 2, [])]
    layout = open_cache(entry)
    assert layout.shard_paths == [i.path for i in infos] and layout.shard_images == [7, 7, 7, 7, 2]
    (entry / "shards" / "shard-000005.h5.tmp").write_bytes(b"a shard still being written")
    assert open_cache(entry).shard_paths == layout.shard_paths  # an unfinished shard is not read
