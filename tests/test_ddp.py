"""ACRCallback under DDP: 2 CPU processes (gloo, ``accelerate launch``) equal 1 process with the same global batch.

Run by pytest, this file launches itself as the worker: ``accelerate launch --multi_gpu
--num_processes 2 tests/test_ddp.py OUT`` trains with the default (global) and per-replica corruption.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_callback import ACRCallback, assert_close, make_dataset, make_model, train, weights

from acr_optim import ACR

GLOBAL_ROWS, MICRO_BATCHES, STEPS = 8, 2, 3


def acr_optimizer(model):
    return ACR(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), eps=0.1, p=2, alpha=0.5)


def run(out, processes, per_replica=False):
    model = make_model()
    settings = {
        "per_device_train_batch_size": GLOBAL_ROWS // (MICRO_BATCHES * processes),
        "gradient_accumulation_steps": MICRO_BATCHES,
        "max_steps": STEPS,
        "max_grad_norm": 1.0,
    }
    train(out, model, acr_optimizer(model), ACRCallback(per_replica=per_replica), **settings)
    return weights(model)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path):
    out = tmp_path / "distributed.pt"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        __file__,
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def per_replica_reference(model, optimizer, max_grad_norm=1.0):
    """Each replica corrupts from its own gradient; the mixed gradients are averaged (DDP) then clipped.

    Replica r holds rows {2r, 2r+1} and {4+2r, 5+2r} of each 8-row step; its loss is its token-loss
    sum over the step's global token count N, times the 2 replicas (``average_tokens_across_devices``).
    """
    dataset = make_dataset()
    ids, labels = torch.tensor(dataset["input_ids"]), torch.tensor(dataset["labels"])
    for step in range(STEPS):
        start = step * GLOBAL_ROWS
        tokens = (labels[start : start + GLOBAL_ROWS, 1:] != -100).sum()
        mixed = [torch.zeros_like(p) for p in model.parameters()]
        for replica in range(2):
            rows = [start + 2 * replica, start + 2 * replica + 1, start + 4 + 2 * replica, start + 5 + 2 * replica]
            batch = {"input_ids": ids[rows], "labels": labels[rows], "num_items_in_batch": tokens / 2}
            optimizer.zero_grad()
            model(**batch).loss.backward()
            with optimizer.perturbed() as active:
                assert active
                model(**batch).loss.backward()
            for m, p in zip(mixed, model.parameters()):
                m.add_(p.grad, alpha=0.5)
        for m, p in zip(mixed, model.parameters()):
            p.grad = m
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return weights(model)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    distributed = launch(tmp_path)
    assert_close(distributed["global"], run(tmp_path / "single", processes=1), rtol=1e-5, atol=1e-6)
    model = make_model()
    reference = per_replica_reference(model, acr_optimizer(model))
    assert_close(distributed["per_replica"], reference, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b) for a, b in zip(distributed["global"], distributed["per_replica"]))


if __name__ == "__main__":  # the worker, one per process
    out = Path(sys.argv[1])
    result = {
        mode: run(out.parent / mode, processes=2, per_replica=mode == "per_replica")
        for mode in ("global", "per_replica")
    }
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, out)


FSDP2_SCRIPT = """
import sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from acr_optim import ACR

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 4))


x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
y = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
for alpha in (0.3, 1.0):
    model, ref = make(), make()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = ACR(torch.optim.AdamW(model.parameters(), lr=0.01), eps=0.1, p=3, alpha=alpha)
    ref_opt = ACR(torch.optim.AdamW(ref.parameters(), lr=0.01), eps=0.1, p=3, alpha=alpha)
    for _ in range(3):
        for m, o, xb, yb in [(model, opt, x.chunk(2)[rank], y.chunk(2)[rank]), (ref, ref_opt, x, y)]:
            def closure():
                loss = nn.functional.mse_loss(m(xb), yb)
                loss.backward()
                return loss
            o.zero_grad()
            o.step(closure)
    err = max((a.full_tensor() - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    local_bytes = sum(q.to_local().numel() * 4 for q in model.parameters())
    print("ALPHA", alpha, "ERR", err, "HELD", opt.extra_memory_bytes() == local_bytes)
try:
    ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1, n=10)
except NotImplementedError as err:
    print("TOPN REFUSED", "top-n" in str(err))
dist.destroy_process_group()
"""


def test_fsdp2_two_processes_equal_one_process_and_top_n_is_refused(tmp_path):
    # FSDP2 (fully_shard) over gloo: ACR forms the norm of the sharded gradient across processes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT.format(port=port))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE, text=True) for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    for out in outputs:
        lines = [line.split() for line in out.splitlines() if line.startswith("ALPHA")]
        assert len(lines) == 2
        for line in lines:
            assert float(line[3]) < 1e-6 and line[5] == "True"
        assert "TOPN REFUSED True" in out
