"""Exact fingerprints: equal bits give equal values on any layout; any change, swap or permutation shows."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainguard.monitor._fingerprint import Fingerprinter  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture
def tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randn(512, 300, generator=generator),
        torch.randn(300, generator=generator),
        torch.randn(7, generator=generator).to(torch.bfloat16),
        torch.randn(33, 3, generator=generator).double(),
    ]


def test_copies_have_the_same_fingerprint(tensors: list[torch.Tensor]) -> None:
    a = Fingerprinter(7).of(tensors)
    b = Fingerprinter(7).of([t.clone() for t in tensors])
    assert torch.equal(a, b)


def test_another_run_seed_gives_other_values(tensors: list[torch.Tensor]) -> None:
    assert not torch.equal(Fingerprinter(7).of(tensors), Fingerprinter(8).of(tensors))


def test_one_flipped_bit_changes_only_its_tensor(tensors: list[torch.Tensor]) -> None:
    fingerprinter = Fingerprinter(7)
    before = fingerprinter.of(tensors)
    changed = [t.clone() for t in tensors]
    changed[1].view(torch.int32)[123] ^= 1
    after = fingerprinter.of(changed)
    assert (after != before).tolist() == [False, True, False, False]


@pytest.mark.parametrize("rows", [(0, 1), (5, 400 % 512), (10, 511)])
def test_swapped_rows_show(tensors: list[torch.Tensor], rows: tuple[int, int]) -> None:
    fingerprinter = Fingerprinter(7)
    swapped = tensors[0].clone()
    swapped[list(rows)] = swapped[list(reversed(rows))]
    assert fingerprinter.one(swapped) != fingerprinter.one(tensors[0])


def test_swapped_neighbours_within_a_word_show(tensors: list[torch.Tensor]) -> None:
    fingerprinter = Fingerprinter(7)
    swapped = tensors[1].clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprinter.one(swapped) != fingerprinter.one(tensors[1])


def test_sign_flip_of_every_element_shows(tensors: list[torch.Tensor]) -> None:
    fingerprinter = Fingerprinter(7)
    assert fingerprinter.one(-tensors[0]) != fingerprinter.one(tensors[0])


def test_zeros_of_different_lengths_differ() -> None:
    fingerprinter = Fingerprinter(7)
    assert fingerprinter.one(torch.zeros(8)) != fingerprinter.one(torch.zeros(16))


def test_views_strides_and_odd_sizes_are_read_by_value() -> None:
    fingerprinter = Fingerprinter(7)
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    assert fingerprinter.one(base.t()) == fingerprinter.one(base.t().contiguous())
    assert fingerprinter.one(base[1:, 1:]) == fingerprinter.one(base[1:, 1:].clone())
    assert fingerprinter.one(torch.tensor([True, False, True])) == fingerprinter.one(
        torch.tensor([True, False, True])
    )
    assert fingerprinter.one(torch.tensor(3.0)) == fingerprinter.one(torch.tensor([3.0]).squeeze())


def test_empty_list_gives_an_empty_vector() -> None:
    assert Fingerprinter(7).of([]).numel() == 0


def test_tensors_fingerprinted_together_give_what_each_gives_alone() -> None:
    # Small tensors are fingerprinted in one batch: word for word the same values as one by one,
    # across dtypes, ragged byte lengths, empty and non-contiguous tensors, and the row boundary.
    generator = torch.Generator().manual_seed(3)
    fingerprinter = Fingerprinter(11)
    width = fingerprinter.width
    tensors = [
        torch.randn(32, generator=generator),
        torch.randn(7, generator=generator).to(torch.bfloat16),
        torch.zeros(0),
        torch.randn(2 * width, generator=generator),  # exactly one row of 64-bit words
        torch.randn(2 * width + 2, generator=generator),  # one word more
        torch.randn(16, 6, generator=generator).t(),
        torch.randint(0, 100, (5,), generator=generator),
        torch.rand(9, generator=generator) > 0.5,
        torch.randn(300, 40, generator=generator),
        torch.randn(3, generator=generator).double(),
    ]
    together = fingerprinter.of(tensors)
    assert together.tolist() == [int(fingerprinter.one(tensor)) for tensor in tensors]
    # The same layout again (now cached), with one element of one small tensor changed.
    changed = [tensor.clone() for tensor in tensors]
    changed[0][5] += 1.0
    again = fingerprinter.of(changed)
    assert again.tolist() == [int(fingerprinter.one(tensor)) for tensor in changed]
    assert [a != b for a, b in zip(together.tolist(), again.tolist(), strict=True)] == [True] + [False] * 9
