"""End-to-end training: quality on synthetic data, SIGKILL-and-resume equality, 2-process DDP equality."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptscope_cli.config.sections import SAEConfig
from conceptscope_cli.sae.checkpoint import load_sae
from conceptscope_cli.sae.synthetic import write_synthetic_cache
from conceptscope_cli.sae.trainer import train_sae

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_cache")
    return write_synthetic_cache(root / "entry", n_images=200, n_tokens=16, d=32, images_per_shard=64,
                                 n_features=64, active=3)


def _small_cfg(**overrides) -> SAEConfig:
    values = dict(d_sae=128, batch_size=256, total_tokens=256 * 600, warmup_steps=20, lr=4e-3, shuffle_buffer=1024,
                  checkpoint_every=0, metrics_every=50, eval_fraction=0.1, dead_metric_tokens=20000)
    values.update(overrides)
    return SAEConfig(**values)


@pytest.mark.parametrize("architecture, overrides, max_fvu, max_l0", [
    ("topk", {"k": 4}, 0.12, 4.0),
    ("batchtopk", {"k": 4}, 0.15, 6.0),
    ("relu", {"l1_coefficient": 1e-2, "mse_normalization": "none"}, 0.12, 32.0),
])
def test_training_reaches_quality_on_synthetic_data(entry, tmp_path, architecture, overrides, max_fvu, max_l0):
    records = []
    result = train_sae(_small_cfg(architecture=architecture, **overrides), entry, tmp_path / "run",
                       provenance={"backbone": "synthetic", "layer": 0, "token_selection": "all"},
                       on_metrics=records.append)
    assert result.eval_metrics["fvu"] < max_fvu
    assert result.eval_metrics["l0"] <= max_l0
    assert [r["step"] for r in records] == list(range(50, 601, 50))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    assert records[-1]["fvu"] < records[0]["fvu"]
    sae, cfg = load_sae(tmp_path / "run")
    assert cfg["eval"]["fvu"] == result.eval_metrics["fvu"]
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result.eval_metrics
    assert cfg["training"]["total_tokens"] == 256 * 600 and cfg["provenance"]["backbone"] == "synthetic"


def test_scale_inputs_is_folded_into_saved_weights(entry, tmp_path):
    result = train_sae(_small_cfg(architecture="topk", k=4, scale_inputs=True, total_tokens=256 * 100), entry,
                       tmp_path / "run")
    assert result.input_scale != 1.0
    sae, cfg = load_sae(tmp_path / "run")
    assert cfg["input_scale_folded"] == result.input_scale
    # the saved SAE takes raw activations: its held-out FVU matches the one computed during training
    assert result.eval_metrics["fvu"] < 0.5
    norms = sae.W_dec.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 1.0 / result.input_scale), rtol=1e-4)


_TRAIN_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from conceptscope_cli.config.sections import SAEConfig
from conceptscope_cli.sae.trainer import train_sae
slow = sys.argv[3] == "slow"
cfg = SAEConfig(architecture="topk", k=4, d_sae=128, batch_size=128, total_tokens=128 * 300, warmup_steps=20,
                lr=4e-3, shuffle_buffer=512, checkpoint_every=20, metrics_every=1, eval_fraction=0.1,
                dead_window=5, aux_k=16, dead_metric_tokens=5000, seed=7)
train_sae(cfg, sys.argv[1], sys.argv[2], on_metrics=(lambda r: time.sleep(0.01)) if slow else None)
"""


def _run_training(entry, run_dir, mode):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, str(entry), str(run_dir), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow  # kill test
def test_sigkill_and_resume_matches_uninterrupted_run(entry, tmp_path):
    reference = _run_training(entry, tmp_path / "reference", "fast")
    killed = _run_training(entry, tmp_path / "killed", "slow")
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline:
        steps = [int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")] if checkpoints.exists() else []
        if steps and max(steps) >= 100:
            break
        assert killed.poll() is None, killed.stderr.read().decode()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "sae.safetensors").exists(), "run finished before it could be killed"
    resumed = _run_training(entry, tmp_path / "killed", "fast")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()
    expected = load_file(str(tmp_path / "reference" / "sae.safetensors"))
    actual = load_file(str(tmp_path / "killed" / "sae.safetensors"))
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=1e-6, rtol=1e-5), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))  # records after the checkpoint were rewritten, not duplicated


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_cfg() -> SAEConfig:
    # relu without ghost grads: the loss is a mean of per-token terms, so rank-split batches with
    # averaged, share-weighted gradients must reproduce the single-process step.
    return _small_cfg(architecture="relu", l1_coefficient=1e-2, ghost_grads=False, total_tokens=256 * 60,
                      metrics_every=20)


def _ddp_worker(rank: int, world_size: int, port: int, entry: str, run_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        train_sae(_ddp_cfg(), Path(entry), Path(run_dir))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two torch processes
def test_two_process_ddp_matches_single_process(entry, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(entry), str(tmp_path / "ddp")), nprocs=2, join=True)
    train_sae(_ddp_cfg(), entry, tmp_path / "single")
    single = load_file(str(tmp_path / "single" / "sae.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "sae.safetensors"))
    for name in single:
        assert torch.allclose(ddp[name], single[name], atol=2e-5, rtol=1e-4), name
    cfg = json.loads((tmp_path / "ddp" / "cfg.json").read_text())
    assert cfg["training"]["world_size"] == 2


def test_metrics_after_a_resume_equal_an_uninterrupted_run(entry, tmp_path):
    """Issue 20: checkpoint_every (7) not a multiple of metrics_every (5): the interval in progress
    at the checkpoint is resumed, so every record (timing aside) equals the uninterrupted run's."""
    cfg = _small_cfg(architecture="topk", k=4, total_tokens=256 * 40, checkpoint_every=7, metrics_every=5,
                     keep_checkpoints=10)
    train_sae(cfg, entry, tmp_path / "reference", device="cpu")

    class StopError(Exception):
        pass

    def stop_inside_an_interval(record):
        if record["step"] == 25:  # after the checkpoint of step 21, inside the interval 21..25
            raise StopError

    with pytest.raises(StopError):
        train_sae(cfg, entry, tmp_path / "resumed", device="cpu", on_metrics=stop_inside_an_interval)
    train_sae(cfg, entry, tmp_path / "resumed", device="cpu")

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert [r["step"] for r in records("resumed")] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert records("resumed") == records("reference")
