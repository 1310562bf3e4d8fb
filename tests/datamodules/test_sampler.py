import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.sampler import ResumableSampler


def epoch_list(sampler: ResumableSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_is_the_documented_function_of_seed_and_epoch():
    n, seed, world = 103, 7, 4
    for epoch in (0, 3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        expected = perm[: (n // world) * world]
        for rank in range(world):
            s = ResumableSampler(n, seed=seed, rank=rank, world_size=world)
            assert epoch_list(s, epoch) == expected[rank::world].tolist()


def test_same_seed_and_epoch_reproduce_other_epochs_and_seeds_differ():
    a, b = ResumableSampler(50, seed=1), ResumableSampler(50, seed=1)
    assert epoch_list(a, 2) == epoch_list(b, 2)
    # Independent of iteration history: epoch 2 looks the same after visiting epoch 5.
    epoch_list(a, 5)
    assert epoch_list(a, 2) == epoch_list(b, 2)
    assert epoch_list(a, 0) != epoch_list(a, 1)
    assert epoch_list(ResumableSampler(50, seed=2), 0) != epoch_list(a, 0)
    assert sorted(epoch_list(a, 0)) == list(range(50))


def test_no_shuffle_is_sequential():
    s = ResumableSampler(10, seed=0, shuffle=False)
    assert epoch_list(s, 0) == epoch_list(s, 4) == list(range(10))


def test_ranks_are_disjoint_and_cover_the_truncated_epoch():
    n, world = 103, 4
    shards = [epoch_list(ResumableSampler(n, seed=0, rank=r, world_size=world), 1) for r in range(world)]
    assert all(len(s) == n // world == len(ResumableSampler(n, 0, rank=r, world_size=world))
               for r, s in enumerate(shards))
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == (n // world) * world


def test_padding_without_drop_last_covers_everything_with_equal_lengths():
    n, world = 10, 4
    samplers = [ResumableSampler(n, seed=0, rank=r, world_size=world, drop_last=False) for r in range(world)]
    shards = [epoch_list(s, 0) for s in samplers]
    assert {len(s) for s in shards} == {3} and all(len(s) == 3 for s in samplers)
    assert set(i for s in shards for i in s) == set(range(n))


def test_resume_skips_consumed_once_and_next_epoch_is_full():
    full = ResumableSampler(40, seed=3, rank=1, world_size=2)
    reference = {e: epoch_list(full, e) for e in (2, 3)}

    resumed = ResumableSampler(40, seed=3, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 2, "consumed": 7})
    assert len(resumed) == 20  # always the full epoch length
    assert list(resumed) == reference[2][7:]
    # Only the first iteration of the resumed epoch is shortened.
    assert list(resumed) == reference[2]
    resumed.set_epoch(3)
    assert list(resumed) == reference[3]


def test_resume_state_for_another_epoch_is_ignored():
    s = ResumableSampler(30, seed=0)
    reference = epoch_list(ResumableSampler(30, seed=0), 4)
    s.load_state_dict({"epoch": 3, "consumed": 10})
    assert epoch_list(s, 4) == reference
    assert epoch_list(s, 3) == epoch_list(ResumableSampler(30, seed=0), 3)


def test_state_for_and_dataloader_resume():
    dataset = list(range(64))
    batch_size = 4

    def loader(sampler):
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)

    s = ResumableSampler(len(dataset), seed=11)
    s.set_epoch(1)
    uninterrupted = [b.tolist() for b in loader(s)]

    state = ResumableSampler.state_for(epoch=1, consumed_batches=5, batch_size=batch_size)
    assert state == {"epoch": 1, "consumed": 20}
    fresh = ResumableSampler(len(dataset), seed=11)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # what Lightning does at the start of the resumed epoch
    assert [b.tolist() for b in loader(fresh)] == uninterrupted[5:]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        ResumableSampler(-1, seed=0)
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=0).load_state_dict({"epoch": 0, "consumed": -1})
