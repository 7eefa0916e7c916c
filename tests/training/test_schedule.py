"""Device / precision decisions, the seed's loss and schedule, and the fp16 overflow path — all on CPU."""

import math

import pytest

from mobilenetv2.training.schedule import SeedSchedule


def test_schedule_warmup_cosine_and_floor():
    schedule = SeedSchedule(lr_init=0.1, lr_max=1.0, lr_end=0.0, warmup_epochs=2, total_epochs=10, steps_per_epoch=5)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(30) == pytest.approx((1 + math.cos(math.pi * 20 / 40)) / 2)
    assert schedule(49) > 0 and schedule(49) < 0.01
    negative = SeedSchedule(0.0, 0.5, -1.0, 0, 1, 10)
    assert negative(9) == 0.0  # floored
