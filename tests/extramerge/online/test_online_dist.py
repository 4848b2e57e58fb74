"""extramerge.online on FSDP2 / DTensor shards: two gloo CPU processes, each updating its own shard; the
sharded EMA, SMA and Extra-Merge equal the unsharded ones, and a DCP save holds the full merge."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from extramerge.online import OnlineMerger
    from rivervalley import weights as rvw

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        ref = _model()
        sharded = _model()
        for layer in sharded:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        merger = OnlineMerger(sharded, "ema:0.8,sma:3,extra:0.5@2", every=2)
        ema = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(0.8))
        gen = torch.Generator().manual_seed(3)
        snaps = []
        for step in range(1, 15):
            with torch.no_grad():
                for (_, p), q in zip(sharded.named_parameters(), ref.parameters(), strict=True):
                    noise = torch.randn(q.shape, generator=gen)
                    q.add_(noise)
                    p.to_local().add_(distribute_tensor(noise, mesh, p.placements).to_local())
            merger.update(step)
            if step % 2 == 0:
                ema.update_parameters(ref)
                snaps.append(torch.cat([q.detach().flatten() for q in ref.parameters()]))
        traj = torch.stack(snaps)
        n = len(traj)
        for name, want in (
            ("ema", torch.cat([q.detach().flatten() for q in ema.module.parameters()])),
            ("sma", rvw.apply(rvw.sma(n, 3), traj)),
            ("extra", rvw.apply(rvw.extra(n, 3, 2, 0.5), traj)),
        ):
            merged = merger.state_dict_of(name)
            got = torch.cat([merged[k].full_tensor().flatten() for k, _ in sharded.named_parameters()])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            with merger.swapped(name):
                got = torch.cat([p.full_tensor().flatten() for p in sharded.parameters()])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        merger.save("extra", os.path.join(out, "extra_dcp"))
        if rank == 0:
            dcp_to_torch_save(os.path.join(out, "extra_dcp"), os.path.join(out, "extra.pt"))
            full = torch.load(os.path.join(out, "extra.pt"), weights_only=True)
            got = torch.cat([full[k].flatten() for k, _ in ref.named_parameters()])
            torch.testing.assert_close(got, rvw.apply(rvw.extra(n, 3, 2, 0.5), traj), atol=1e-6, rtol=1e-6)
            with open(os.path.join(out, "ok.json"), "w") as f:
                json.dump({"local_numel": sum(p.to_local().numel() for p in sharded.parameters())}, f)
    finally:
        dist.destroy_process_group()


def test_sharded_merges_equal_unsharded(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    ok = json.loads((tmp_path / "ok.json").read_text())
    full = sum(p.numel() for p in _model().parameters())
    assert ok["local_numel"] < full  # each rank held only its shard
    rec = json.loads((tmp_path / "extra_dcp" / "merge.json").read_text())
    assert rec["tool"] == "extramerge" and rec["output_format"] == "dcp" and rec["method"] == "online-extra"
    assert (tmp_path / "extra_dcp" / ".metadata").is_file()
