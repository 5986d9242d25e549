import threading
import time

import torch

from lightning_hessian.callbacks.allreduce_clock import AllReduceClock


class Bucket:
    def __init__(self, values):
        self.values = values

    def buffer(self):
        return self.values


def delayed(seconds):
    """A communication hook whose 'all-reduce' completes ``seconds`` later on another thread (as gloo's does)."""

    def hook(state, bucket):
        future = torch.futures.Future()
        threading.Timer(seconds, lambda: future.set_result(bucket.buffer() * 2)).start()
        return future

    return hook


def test_times_each_bucket_from_hand_over_to_completion():
    clock = AllReduceClock()
    assert clock.seconds() == 0.0
    hook = clock.wrap(delayed(0.2))
    assert torch.equal(hook(None, Bucket(torch.ones(3))).wait(), torch.full((3,), 2.0))  # the hook's values pass
    assert 0.2 <= clock.seconds() < 0.35
    hook(None, Bucket(torch.ones(3))).wait()
    assert 0.4 <= clock.seconds() < 0.7  # cumulative


def test_buckets_in_flight_together_count_once():
    clock = AllReduceClock()
    slow, fast = clock.wrap(delayed(0.3)), clock.wrap(delayed(0.1))
    futures = [slow(None, Bucket(torch.ones(1))), fast(None, Bucket(torch.ones(1)))]  # the second within the first
    for future in futures:
        future.wait()
    assert 0.3 <= clock.seconds() < 0.39  # the union, not 0.4


def test_the_default_hook_averages_over_the_group(tmp_path):
    # one process: the all-reduce of a group of one is the identity (DDP's own averaging would give the same)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        clock = AllReduceClock()
        start = time.perf_counter()
        out = clock.wrap()(None, Bucket(torch.arange(4.0))).wait()
        assert torch.equal(out, torch.arange(4.0))
        assert 0 < clock.seconds() <= time.perf_counter() - start
    finally:
        torch.distributed.destroy_process_group()
