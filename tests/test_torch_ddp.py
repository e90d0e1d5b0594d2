"""fusedlstm.torch.LSTM under torch.nn.parallel.DistributedDataParallel: two processes (gloo, on
localhost) each train on half of every global batch and end with the weights one process gets
from the whole batches (float64, SGD with momentum: equal to 1e-10 relative; only the order of
the gradient sums differs). This file is also the worker: run as a script it is one rank."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.heavy

STEPS, GLOBAL_BATCH, T, E, H = 6, 8, 7, 4, 6


def make_model(torch):
    from fusedlstm.torch import LSTM

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
            self.head = torch.nn.Linear(4 * H, 1, dtype=torch.float64)

        def forward(self, x, lengths):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.lstm(packed)
            return self.head(torch.cat([h[-2], h[-1], h[0], h[1]], dim=1)).squeeze(1)

    torch.manual_seed(0)
    return Model()


def global_batches(torch):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, T, E, generator=g, dtype=torch.float64)
        lengths = torch.randint(1, T + 1, (GLOBAL_BATCH,), generator=g)
        y = torch.randn(GLOBAL_BATCH, generator=g, dtype=torch.float64)
        yield x, lengths, y


def train(torch, model, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per = GLOBAL_BATCH // world
    for x, lengths, y in global_batches(torch):
        rows = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[rows], lengths[rows]), y[rows])
        loss.backward()  # under DDP: gradients averaged over the ranks (equal shares: the global mean)
        opt.step()


def weights(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import fusedlstm

    fusedlstm.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(make_model(torch))
        train(torch, ddp, rank, world)
        if rank == 0:
            tmp = out + ".tmp.npz"
            np.savez(tmp, **weights(ddp.module))
            os.replace(tmp, out)
        # Both ranks reach the teardown together: a rank that closes its connections while the
        # other still holds them open can make gloo's threads call std::terminate (seen once in
        # CI as "terminate called without an active exception" from one worker).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    import fusedlstm

    out = tmp_path / "ddp.npz"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(rank), "2", str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    threads = fusedlstm.get_num_threads()
    fusedlstm.set_num_threads(1)
    try:
        model = make_model(torch)
        before = weights(model)
        train(torch, model)
    finally:
        fusedlstm.set_num_threads(threads)
    want = weights(model)
    with np.load(out) as got:
        assert sorted(got.files) == sorted(want)
        for k, w in want.items():
            assert np.abs(w - before[k]).max() > 1e-3, f"{k} did not train"
            np.testing.assert_allclose(got[k], w, rtol=1e-10, atol=1e-12, err_msg=k)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
