"""The GPU-only decisions of scoring and training, tested on CPU: precision by compute
capability, device from granted resources, device-safe checkpoints, SyncBatchNorm and
BatchNorm buffers across ranks (gloo), and hot loops without per-step host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cleaner.config import ScoringConfig
from cleaner.scoring.devices import _granted_gpu_ids, autocast_dtype, select_device
from tests.conftest import free_port
from training.checkpoint import load_checkpoint, read_states, save_checkpoint
from training.config import ScalingConf
from training.data import split_shards_by_samples
from training.devices import (
    amp_dtype_for,
    broadcast_buffers,
    configure_backends,
    make_scaler,
    maybe_sync_batchnorm,
)
from training.loop import epoch_batch_to_device
from training.mixfix import (
    MixFixState,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
    update_selection,
)
from training.networks import build_network


@pytest.fixture(autouse=True)
def _empty_working_directory(tmp_path_factory, monkeypatch):
    """Each test runs in an empty working directory: a checkpoint read or written at a
    relative path (a bug) finds nothing there instead of another test's files."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def syncs(profile) -> int:
    """Device-to-host scalar reads (float(t), t.item(), int(t[0])) in a profile."""
    return sum(e.count for e in profile.key_averages() if e.key == "aten::_local_scalar_dense")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 0), torch.float16),
        ((7, 5), torch.float16),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_auto_precision_is_bf16_only_where_native(capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16 (is_bf16_supported says yes): fp16 there."""
    assert amp_dtype_for(CUDA, "auto", capability) == expected
    assert autocast_dtype(CUDA, "auto", capability) == expected
    assert amp_dtype_for(CUDA, "bf16", (7, 5)) == torch.bfloat16  # asked for: given
    assert amp_dtype_for(CUDA, "fp32", capability) is None
    assert amp_dtype_for(CPU, "auto", capability) is None


def test_fp16_trains_with_a_grad_scaler_and_bf16_without():
    assert isinstance(make_scaler(torch.float16, CPU), torch.amp.GradScaler)
    assert make_scaler(torch.bfloat16, CUDA) is None and make_scaler(None, CPU) is None


def test_gpu_resources_are_validated():
    assert ScalingConf(use_gpu=True).gpus_per_worker == 1
    with pytest.raises(ValueError, match="NCCL"):
        ScalingConf(use_gpu=True, gpus_per_worker=0.5)
    with pytest.raises(ValueError, match="idle"):
        ScalingConf(use_gpu=True, gpus_per_worker=2)
    assert ScalingConf(use_gpu=False, gpus_per_worker=0).gpus_per_worker == 0
    assert ScoringConfig(gpus_per_actor=0.25).gpus_per_actor == 0.25  # 4 actors per GPU
    assert ScoringConfig(gpus_per_actor=2).gpus_per_actor == 2
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="gpus_per_actor"):
            ScoringConfig(gpus_per_actor=bad)


def test_device_follows_the_gpus_a_stage_was_granted(monkeypatch):
    """Ray 2.60 does not hide GPUs from num_gpus=0 workers: CUDA is visible to them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(gpu_ids=[]) == CPU  # reserved none: CPU although CUDA is visible
    assert select_device(gpu_ids=[3]) == CUDA  # Ray sets CUDA_VISIBLE_DEVICES to it
    assert select_device(gpu_ids=None) == CUDA  # outside Ray: what is visible
    assert select_device("cpu", gpu_ids=[0]) == CPU
    assert _granted_gpu_ids() is None  # a driver (or no Ray) has no reservation to follow


def mixfix_state_after_updates() -> MixFixState:
    """A state three updates in: absorbed samples outside the initial clean set and
    relabelled ones (initial-clean ones included), so that no field equals its initial
    value or another field."""
    initial_clean = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    state = MixFixState.initial(initial_clean, labels)
    pred_prob = np.array([0.9, 0.95, 0.99, 0.2, 0.97, 0.1, 0.96, 0.3])
    pred_label = np.array([0, 3, 2, 1, 2, 0, 0, 3])
    for _ in range(3):
        state = update_selection(state, pred_prob, pred_label, theta_r=0.8, theta_r2=0.9).state
    return state


def assert_same_mixfix_state(loaded: MixFixState, saved: MixFixState) -> None:
    """Field by field: values and dtypes of every array, and the epoch."""
    assert loaded.epoch == saved.epoch == 3
    for name in ("initial_clean", "original_labels", "selected", "current_labels"):
        ours, theirs = getattr(loaded, name), getattr(saved, name)
        assert ours.dtype == theirs.dtype, name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    # the absorbed (2) and relabelled (1, 4, 6) samples are what a resume must not lose
    np.testing.assert_array_equal(saved.selected, [1, 1, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(saved.current_labels, [0, 3, 2, 3, 2, 1, 0, 3])


def test_mixfix_state_round_trips_through_a_checkpoint_file(tmp_path):
    """state.npz alone (what a resuming rank reads besides the torch states)."""
    torch.manual_seed(0)
    model = build_network("tiny_cnn", 4)
    optimizer = make_optimizer(model, 0.1)
    scheduler = make_scheduler(optimizer, [2])
    state = mixfix_state_after_updates()
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, state, [])
    assert not (tmp_path / "scaler.pt").exists()  # no GradScaler: no scaler file
    loaded, history = load_checkpoint(
        str(tmp_path), model, make_optimizer(model, 0.1), scheduler, CPU
    )
    assert history == []
    assert_same_mixfix_state(loaded, state)
    loaded.selected[0] = False  # the loaded state is the loader's own copy
    assert state.selected[0]


def test_checkpoint_loads_onto_the_rank_device_with_its_grad_scaler(tmp_path):
    """Saved on one device type, read onto another (meta stands in for another GPU):
    every tensor lands on the reader's device; a CPU resume restores all states."""
    torch.manual_seed(0)
    model = build_network("tiny_cnn", 4)
    optimizer = make_optimizer(model, 0.1, 0.9, 5e-4)
    scheduler = make_scheduler(optimizer, [2], 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update(2.0**7)
    scheduler.step()
    state = mixfix_state_after_updates()
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, state, [{"epoch": 1}], scaler)

    states = read_states(str(tmp_path), "meta")
    assert set(states) == {"model", "optimizer", "scheduler", "scaler"}
    tensors = [t for t in states["model"].values()] + [
        t for s in states["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)
    ]
    assert tensors and all(t.device.type == "meta" for t in tensors)

    fresh = build_network("tiny_cnn", 4)
    fresh_opt = make_optimizer(fresh, 0.1, 0.9, 5e-4)
    fresh_sched = make_scheduler(fresh_opt, [2], 0.1)
    fresh_scaler = torch.amp.GradScaler("cpu")
    loaded, history = load_checkpoint(
        str(tmp_path), fresh, fresh_opt, fresh_sched, CPU, fresh_scaler
    )
    assert history == [{"epoch": 1}]
    assert_same_mixfix_state(loaded, state)
    assert fresh_scaler.get_scale() == 2.0**7
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    momentum = [s["momentum_buffer"] for s in fresh_opt.state.values()]
    assert momentum and all(m.device == CPU for m in momentum)
    assert fresh_sched.state_dict()["last_epoch"] == 1


def test_sync_batchnorm_on_multi_gpu_worlds_only():
    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    net = build_network("preact_resnet18", 10)
    assert kinds(maybe_sync_batchnorm(net, 2, CUDA, True)) == {nn.SyncBatchNorm}
    for world, device, enabled in ((1, CUDA, True), (2, CPU, True), (2, CUDA, False)):
        model = maybe_sync_batchnorm(build_network("preact_resnet18", 10), world, device, enabled)
        assert kinds(model) == {nn.BatchNorm2d}


def _rank_predictions(rank: int, world: int, port: int, out) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    model = build_network("tiny_cnn", 5)  # same weights on every rank, as after DDP steps
    model.train()
    with torch.no_grad():  # each rank's BatchNorm statistics from its own batches
        model(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(rank + 1)))
    probe = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    model.eval()
    with torch.no_grad():
        before = model(probe)
        broadcast_buffers(model, world)
        after = model(probe)
    gathered = [torch.zeros_like(before) for _ in range(world)]
    torch.distributed.all_gather(gathered, before)
    gathered_after = [torch.zeros_like(after) for _ in range(world)]
    torch.distributed.all_gather(gathered_after, after)
    if rank == 0:
        out.put((torch.stack(gathered).numpy(), torch.stack(gathered_after).numpy()))
    torch.distributed.destroy_process_group()


@pytest.mark.integration  # two spawned processes in a gloo group over a TCP port (a service)
def test_ranks_predict_alike_after_broadcasting_batchnorm_buffers():
    """Two gloo ranks with different running statistics predict differently until rank
    0's buffers are broadcast; then they predict exactly alike (1 or N workers decide
    alike). SyncBatchNorm itself needs CUDA and is covered above by its switch."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _rank_predictions, args=(2, free_port(), out), nprocs=2, start_method="spawn"
    )
    before, after = out.get()
    assert not np.allclose(before[0], before[1])
    np.testing.assert_array_equal(after[0], after[1])


def test_prediction_work_is_split_by_samples_not_shards():
    sizes = [100, 1, 1, 1, 100, 1, 50]
    shards = [f"s{i}.tar" for i in range(len(sizes))]
    offsets = dict(zip(shards, np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))
    split = split_shards_by_samples(shards, offsets, sum(sizes), 2)
    loads = [sum(sizes[shards.index(s)] for s in part) for part in split]
    assert sorted(s for part in split for s in part) == sorted(shards)  # each shard once
    assert max(loads) - min(loads) <= 50  # by shard count: 201 vs 53
    assert all(part == sorted(part, key=shards.index) for part in split)
    assert split == split_shards_by_samples(shards, offsets, sum(sizes), 2)
    assert split_shards_by_samples(shards[:1], {"s0.tar": 0}, 100, 3)[1:] == [[], []]


def test_training_steps_do_not_sync_with_the_host_each_step():
    """float(loss) per step was a device sync per step; now one per epoch."""
    torch.manual_seed(0)
    model = build_network("tiny_cnn", 4)
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
    rng = np.random.default_rng(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.softmax(torch.randn(8, 4), 1)) for _ in range(6)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stats = train_one_epoch(model, optimizer, batches, beta=1.0, device="cpu", generator=rng)
    assert stats["batches"] == 6 and np.isfinite(stats["loss"])
    assert syncs(prof) <= 1, syncs(prof)


def test_epoch_batches_check_the_epoch_on_the_host():
    mean = torch.zeros(1, 3, 1, 1)
    std = torch.ones(1, 3, 1, 1)
    batch = {
        "image": np.zeros((4, 8, 8, 3), np.uint8),
        "target": np.arange(4),
        "sample_id": np.arange(4),
        "epoch": np.full(4, 3),
    }
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        inputs, targets = epoch_batch_to_device(batch, 3, CPU, mean, std)
    assert syncs(prof) == 0
    assert inputs.shape == (4, 3, 8, 8) and targets.dtype == torch.int64
    with pytest.raises(RuntimeError, match="epoch 2 received rows expanded for epoch 3"):
        epoch_batch_to_device(batch, 2, CPU, mean, std)


def test_cudnn_benchmark_is_on_for_gpu_training_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(CPU)
    assert torch.backends.cudnn.benchmark is False
    configure_backends(CUDA)
    assert torch.backends.cudnn.benchmark is True


class Wrapped(torch.nn.Module):
    """A stand-in for DDP's wrapper: the network under `.module`, its keys prefixed."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def test_a_wrapped_network_saves_and_loads_as_the_bare_network(tmp_path):
    """Checkpoints hold the bare network's keys: a DDP rank saves what a single process
    (or a later rank count) loads, and a wrapped network loads a bare checkpoint."""
    torch.manual_seed(0)
    bare = build_network("tiny_cnn", 4)
    optimizer = make_optimizer(bare, 0.1)
    scheduler = make_scheduler(optimizer, [2])
    save_checkpoint(
        str(tmp_path), Wrapped(bare), optimizer, scheduler, mixfix_state_after_updates(), []
    )
    saved = torch.load(tmp_path / "model.pt", map_location="cpu")
    assert list(saved) == list(bare.state_dict())  # no "module." prefix
    fresh = Wrapped(build_network("tiny_cnn", 4))
    load_checkpoint(str(tmp_path), fresh, make_optimizer(fresh, 0.1), scheduler, CPU)
    for a, b in zip(bare.state_dict().values(), fresh.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_without_a_scaler_loads_and_pickled_objects_are_refused(tmp_path):
    torch.manual_seed(0)
    model = build_network("tiny_cnn", 4)
    optimizer = make_optimizer(model, 0.1)
    scheduler = make_scheduler(optimizer, [2])
    scaler = torch.amp.GradScaler("cpu")
    state = mixfix_state_after_updates()
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, state, [], scaler)
    loaded, _ = load_checkpoint(str(tmp_path), model, optimizer, scheduler, CPU)  # no scaler
    assert_same_mixfix_state(loaded, state)
    torch.save({"weights": Wrapped(model)}, tmp_path / "model.pt")  # a pickled module
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        read_states(str(tmp_path), CPU)  # only tensors and plain containers are read
