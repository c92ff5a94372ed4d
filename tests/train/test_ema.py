import torch
from torch import nn

from flowmill.train.ema import EMA


def test_ema_averages_parameters_and_copies_buffers():
    live = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(live, decay=0.5, warmup=False)
    start = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
    live(torch.randn(16, 3))  # training mode: BatchNorm moves its running statistics
    ema.update(live)
    torch.testing.assert_close(ema.module[0].weight, start + 0.5)
    # Running statistics are averages already: the EMA model uses the live ones.
    assert torch.equal(ema.module[1].running_mean, live[1].running_mean)
    assert torch.equal(ema.module[1].running_var, live[1].running_var)
    assert ema.module[1].num_batches_tracked.item() == 1


def test_state_dict_round_trip_keeps_weights_and_update_count():
    live = nn.Linear(3, 4)
    ema = EMA(live, decay=0.9)
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)
    ema.update(live)
    restored = EMA(nn.Linear(3, 4), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and restored.current_decay() == ema.current_decay()
    torch.testing.assert_close(restored.module.weight, ema.module.weight, rtol=0, atol=0)
