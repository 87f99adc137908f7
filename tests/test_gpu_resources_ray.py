"""On a real local Ray with two logical GPUs: each actor's device follows what it reserved."""

from __future__ import annotations

import pytest

from tests.conftest import own_ray

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_with_gpus():
    """Ray with 2 logical GPUs (none physical): Ray grants ids and sets CUDA_VISIBLE_DEVICES."""
    ray = own_ray(num_cpus=2, num_gpus=2)
    yield ray
    ray.shutdown()


class DeviceProbe:
    """A stand-in scorer actor: which device would load_clip choose here?"""

    def device(self) -> tuple[str, list]:
        import torch

        from cleaner.scoring.devices import _granted_gpu_ids, select_device

        real = torch.cuda.is_available
        torch.cuda.is_available = lambda: True  # CUDA visible, as on a GPU node
        try:
            return str(select_device()), [int(i) for i in _granted_gpu_ids()]
        finally:
            torch.cuda.is_available = real


@pytest.mark.parametrize(("gpus", "device"), [(0, "cpu"), (0.5, "cuda"), (1, "cuda")])
def test_actor_device_follows_its_reserved_gpus(ray_with_gpus, gpus, device):
    ray = ray_with_gpus
    probe = ray.remote(DeviceProbe).options(num_gpus=gpus, num_cpus=0.1).remote()
    try:
        chosen, ids = ray.get(probe.device.remote(), timeout=120)
    finally:
        ray.kill(probe)
    assert chosen == device
    assert (len(ids) > 0) == (gpus > 0)
