"""Where the random draws of a training step or a generation happen, so that nothing meets a tensor on
another device (a CPU ``torch.Generator`` handed to a CUDA ``randn`` raises; a CPU flag times a CUDA tensor
raises).

Two kinds of randomness:

* **data on the device** (noise, timesteps, A2M's latent sample): drawn with ``device_generator(device,
  seed)``, a generator that lives on the model's device, straight into device memory.
* **host decisions** (which samples drop which condition, which frames the pixel losses decode): drawn on the
  CPU with ``host_generator(generator)``, because Python needs their values (a slice start, whether any
  sample drops its reference and so needs the masked attention kernel); reading them back from the GPU would
  stall it. The few resulting flags are moved to the device once, before they meet any device tensor.

The meta device (shapes only, used by the tests to check device placement at full size without a GPU) has
no generators: ``device_generator`` returns ``None`` there and draws use the global RNG.
"""

from __future__ import annotations

import torch


def device_generator(device: torch.device | str, seed: int) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``; ``None`` on ``meta``, which has none."""
    device = torch.device(device)
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def host_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for host decisions: ``generator`` itself if it is a CPU one (so CPU runs draw exactly
    the sequence they always did), else a CPU generator with its seed (reading the seed needs no device
    sync); ``None`` stays ``None`` (the global CPU RNG)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed() ^ 0x5EED)


__all__ = ["device_generator", "host_generator"]
