"""The learning-rate schedules of `zoplan run`: Hugging Face's, so a run and ZOTrainer agree."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from zoplan.runtime.zo import learning_rate


@pytest.mark.parametrize(
    "schedule,hugging_face",
    [("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)],
)
@pytest.mark.parametrize("total", [1, 2, 20, 1000])
def test_a_schedule_is_hugging_faces_and_its_last_step_still_trains(schedule, hugging_face, total: int) -> None:
    """The last step trained at lr 0 (the schedule reached 0 at step total - 1): two forward
    passes for no update."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = hugging_face(optimizer, num_warmup_steps=0, num_training_steps=total)
    for step in range(total):
        assert learning_rate(1.0, schedule, step, total) == pytest.approx(
            theirs.lr_lambdas[0](step), rel=1e-12, abs=1e-15
        )
    assert learning_rate(1.0, schedule, total - 1, total) > 0
    assert learning_rate(3e-4, "constant", total - 1, total) == 3e-4
