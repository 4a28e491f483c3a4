"""Training under `torchrun` on CPU: two processes (gloo DDP) end with the same adapter; only rank 0
writes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from widelora.testing.models import save_tiny_folder

SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from widelora.train import train
from widelora.train.checkpoint import trainable_state
import widelora.train.loop as loop

cfg, run_dir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
captured = {}
real_build = loop.build_run
def spy(*a, **k):
    built = real_build(*a, **k)
    captured["model"] = built.model
    return built
loop.build_run = spy
result = train(cfg, run_dir)
rank = os.environ["RANK"]
save_file(trainable_state(captured["model"]), f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump(result, fh)
"""


@pytest.mark.integration
def test_two_process_torchrun_gives_identical_adapters(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    (tmp_path / "c.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(80))
    )
    save_tiny_folder(tmp_path / "llama", "llama")
    (tmp_path / "run.py").write_text(SCRIPT)
    cfg = {
        "model": str(tmp_path / "llama"),
        "dataset": str(tmp_path / "c.txt"),
        "targets": ["q_proj", "v_proj"],
        "rank": 4,
        "steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-2,
        "eval_examples": 4,
        "progress": False,
        "dropout": 0.1,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "run.py"),
        json.dumps(cfg),
        str(tmp_path / "run"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "rank0.safetensors")
    b = load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and len(a) == 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    b_keys = [k for k in a if k.endswith("lora_B")]
    assert len(b_keys) == 4 and all(a[k].abs().sum() > 0 for k in b_keys)  # trained away from B = 0
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["status"] == r1["status"] == "done"
    assert r0["checkpoint"] and r1["checkpoint"] is None  # rank 1 wrote nothing
    assert r0["final"]["train_loss"] == r1["final"]["train_loss"]  # the logged loss is averaged over ranks
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert all(torch.equal(saved[k], a[k]) for k in a)
