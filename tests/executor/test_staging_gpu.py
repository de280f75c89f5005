"""PinnedStaging (services/executor/staging.py) on CUDA: uploads and downloads through the two
step slots keep their values across many steps, slot growth and overflow. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pagemesh.services.executor.staging import PinnedStaging

pytestmark = pytest.mark.gpu


def test_staging_round_trips_across_steps_growth_and_overflow() -> None:
    dev = torch.device("cuda")
    staging = PinnedStaging(dev, nbytes=4096)  # small: steps overflow, then the slots grow
    rng = np.random.default_rng(0)
    previous: list[tuple[torch.Tensor, np.ndarray]] = []
    for _ in range(40):
        staging.next_step()
        arrays = [
            rng.integers(0, 1 << 40, size=int(rng.integers(0, 3000)), dtype=np.int64),
            rng.integers(0, 1 << 20, size=(int(rng.integers(1, 50)), 2), dtype=np.int64),
            rng.random(int(rng.integers(1, 700)), dtype=np.float32),
            rng.integers(0, 1 << 30, size=int(rng.integers(1, 300)), dtype=np.int32),
        ]
        want = [a.copy() for a in arrays]
        uploaded = [staging.to_device(a) for a in arrays]
        for a in arrays:
            a[...] = 0  # the upload holds its own copy of the values
        downloads = [staging.to_host(u * 1) for u in uploaded]
        torch.cuda.synchronize()
        for up, down, w in zip(uploaded, downloads, want, strict=True):
            assert up.device.type == "cuda" and up.shape == w.shape
            np.testing.assert_array_equal(up.cpu().numpy(), w)
            np.testing.assert_array_equal(down.numpy(), w)
        # The step before (the other slot) is still intact after this step's copies: a step's
        # downloads are read when it lands, which may come after the next step's launch.
        for down, w in previous:
            np.testing.assert_array_equal(down.numpy(), w)
        previous = list(zip(downloads, want, strict=True))
    assert staging.num_overflows > 0  # the first steps did not fit in 4 KiB
    before = staging.num_overflows
    for _ in range(4):
        staging.next_step()
        staging.to_device(np.arange(3000, dtype=np.int64))
    assert staging.num_overflows == before  # both slots grew to the largest step seen
