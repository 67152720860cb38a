"""Several nodes: the global rank picks shards and writers, the local rank only the device.

On every node torchrun (or SLURM) starts local ranks 0..G-1, so a process of node 1 has LOCAL_RANK=0 and
RANK=G. Code that took one for the other would, on node 1, search rank 0's slice, encode rank 0's shards
and write rank 0's files. Two ways to catch it:

- fast: this process posing as global rank 1 of 2 on node 1 (LOCAL_RANK=0), in torch's single-process
  "fake" process group (collectives return at once), through the functions that read the ranks;
- slow: two real "nodes" of one process each on this machine (torchrun --nnodes 2, gloo) train with
  the index sharded across them and evaluate, and match one process on the same global batch.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_ddp import COMMON, _weights, _weights_of_start

from index.build_cli import _init_distributed, build_index
from index.encode import encode_corpus, resolve_rank
from index.passages import PassageStore
from index.retrieval import Retriever
from index.sharded import ShardedIndex, slice_bounds
from tiny_setup import TinySetup, tiny_overrides
from training.config import compose, instantiate
from training.evaluation import processes
from training.lit.train_cli import train

REPO = Path(__file__).resolve().parents[1]
NODE_1 = {"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1", "NODE_RANK": "1", "WORLD_SIZE": "2",
          "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
          "TORCHELASTIC_RUN_ID": "test"}  # what torchrun sets for the one process of node 1 of 2


@pytest.fixture
def node_1(monkeypatch: pytest.MonkeyPatch):
    """This process as global rank 1 (local rank 0, node 1) of 2, in a single-process fake group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for name, value in NODE_1.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    yield
    dist.destroy_process_group()


def test_node_1_shards_slices_and_writes_by_global_rank(node_1, tiny_setup: TinySetup, tmp_path: Path):
    assert resolve_rank(None, None) == (1, 2)
    retriever = Retriever.from_dir(tiny_setup.index_dir, sharded=True)
    assert isinstance(retriever.index, ShardedIndex)
    count = len(retriever.index)
    assert retriever.index.start == slice_bounds(count, 1, 2)[0] > 0  # the second half, not rank 0's

    # rag-build-index on rank 1: rank 0 built the store; rank 1 encodes the odd shards and writes no index.
    out = tmp_path / "built"
    PassageStore.build(tiny_setup.world.v1_passages, out / "passages", progress=False)
    build_index(tiny_setup.world.v1_passages, tiny_setup.models.context_encoder, out, shard_size=10,
                max_length=32, keep_shards=True, progress=False)
    shards = sorted(path.name for path in (out / "shards").glob("shard_*.npy"))
    assert shards and all(int(name[6:11]) % 2 == 1 for name in shards)
    assert not (out / "index").exists()

    store = PassageStore.open(out / "passages")
    paths = encode_corpus(store, lambda titles, texts: np.zeros((len(titles), 4), np.float32), tmp_path / "enc",
                          shard_size=10, progress=False)
    assert [int(p.name[6:11]) for p in paths] == list(range(1, -(-len(store) // 10), 2))


def test_node_1_takes_its_device_from_the_local_rank(monkeypatch: pytest.MonkeyPatch):
    for name, value in NODE_1.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)  # joining is not the point here
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    assert _init_distributed(None) == "cuda:0"  # rag-build-index: GPU 0 of node 1, not GPU 1
    assert processes.rank_device("gpu", int(os.environ["LOCAL_RANK"])) == torch.device("cuda", 0)
    assert chosen == [0, 0]


def test_node_1_evaluates_its_share_as_global_rank_1(node_1, monkeypatch: pytest.MonkeyPatch):
    calls = []
    monkeypatch.setattr(processes, "run_rank", lambda job, rank, world, local_rank, **kwargs: calls.append(
        (rank, world, local_rank)))
    monkeypatch.setattr(processes, "tie_to_launcher", lambda: None)  # not this pytest process to its parent
    assert processes.launch(object()) == {}  # rank 1 returns no metrics and writes nothing
    assert calls == [(1, 2, 0)]


def test_multinode_trainer_reads_global_local_and_node_rank(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name, value in NODE_1.items():
        monkeypatch.setenv(name, value)
    # Lightning sets the process-wide rank_zero_only.rank to the trainer's global rank: restored after the test,
    # or every later test of this session would run as rank 1 (loggers and checkpoints silently off).
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    cfg = compose(["experiment=demo", f"paths.run_dir={tmp_path}", "trainer=multinode", "trainer.accelerator=cpu",
                   "trainer.devices=1", "trainer.precision=32-true"])
    assert cfg.trainer.num_nodes == 2
    trainer = instantiate(cfg.trainer)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (1, 0, 1, 2)
    assert not trainer.is_global_zero  # checkpoints, exports and train_config.yaml are rank 0's


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(script: str, overrides: list[str], cwd: Path) -> None:
    """Run ``script`` as 2 nodes x 1 process with torchrun on this machine; both must succeed."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in NODE_1}
    env.update(OMP_NUM_THREADS="1", PL_DISABLE_FORK="1", PYTHONPATH=str(REPO))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(REPO / "scripts" / script), *overrides],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]


@pytest.mark.slow  # two torchrun launchers, Lightning DDP and rag-eval: ~1-2 min on 2 busy cores
def test_two_nodes_train_and_evaluate_like_one_process(tiny_setup_no_dropout: TinySetup, tmp_path: Path):
    setup = tiny_setup_no_dropout
    single = train(compose([*COMMON, *tiny_overrides(setup, tmp_path / "single"), "data.batch_size=8"]))

    run_dir = tmp_path / "nodes"  # one directory both nodes see, as a shared file system
    _two_nodes("train.py", [*COMMON, *tiny_overrides(setup, run_dir), "data.batch_size=4", "trainer=multinode",
                            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                            "trainer.enable_progress_bar=false", "index.sharded=true", f"hydra.run.dir={run_dir}"],
               tmp_path)
    expected, got = _weights(single.export_dir), _weights(run_dir / "model")
    initial = _weights_of_start(setup)
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-3  # the runs did train
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"largest weight difference {worst} (largest update {moved})"
    assert (run_dir / "train_result.json").is_file() and (run_dir / "train_config.yaml").is_file()

    # rag-eval of the two-node model: one process, and the two nodes with the index sharded across them.
    # 9 questions in batches of 4: node 0 answers 4, node 1 answers 5 (two batches), uneven collectives.
    common = [f"checkpoint={run_dir / 'model'}", f"questions={setup.world.test}", f"index.path={setup.index_dir}",
              "limit=9", "batch_size=4", "progress=false"]
    from training.evaluation.eval_cli import evaluate

    one = evaluate(compose([*common, f"out_dir={tmp_path / 'eval_one'}"], config_name="eval"))
    _two_nodes("evaluate.py", [*common, f"out_dir={tmp_path / 'eval_nodes'}", "index.sharded=true",
                               "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'eval_nodes'}"], tmp_path)
    predictions = (tmp_path / "eval_one" / "predictions.jsonl").read_text()
    assert (tmp_path / "eval_nodes" / "predictions.jsonl").read_text() == predictions
    assert len(predictions.splitlines()) == 9
    metrics = (tmp_path / "eval_nodes" / "metrics.json").read_text()
    assert f'"exact_match": {one["exact_match"]}' in metrics
