"""The weight arena: every weight moved into one 2 MiB-aligned mapping advised onto huge pages,
in place (every holder sees the move), without growing RSS, file-backed weights left alone."""

from __future__ import annotations

import psutil
import pytest
import torch

from cpu_llm.models.weight_arena import HUGE_PAGE, huge_page_buffer, pack_weights, smaps_fields, thp_setting


class Tied(torch.nn.Module):
    """A linear layer, an embedding sharing its weight, a list holding it too, and a buffer that
    is a view of a bigger tensor (as tiled weights are)."""

    def __init__(self, rows: int = 64, cols: int = 32) -> None:
        super().__init__()
        self.head = torch.nn.Linear(cols, rows)
        self.embed = torch.nn.Embedding(rows, cols)
        self.embed.weight = self.head.weight
        self.weights = [self.head.weight]
        self.register_buffer("table", torch.randn(2, rows, cols)[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (N, cols)
        return self.head(x) + x @ self.table.T


def test_packing_moves_every_holder_into_one_aligned_mapping_and_keeps_the_results():
    torch.manual_seed(0)
    model = Tied()
    tokens = torch.tensor([3, 7, 63])
    before = model(tokens)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (model.head.weight, model.head.bias, model.table)}
    report = pack_weights(model)
    tensors = [model.head.weight, model.head.bias, model.table, model.table._base]
    mapping = smaps_fields(tensors[0].data_ptr())
    start, end = (int(a, 16) for a in mapping["range"].split("-"))
    assert all(start <= t.data_ptr() < end for t in tensors)
    assert model.embed.weight is model.head.weight and model.weights[0].data_ptr() == model.head.weight.data_ptr()
    assert torch.equal(model(tokens), before)
    assert report.packed_mib * 2**20 >= sum(storages.values())
    assert report.thp == thp_setting() and report.file_backed_mib == 0


def test_the_arena_starts_on_a_huge_page_and_is_advised_before_it_is_touched():
    buffer = huge_page_buffer(3 * HUGE_PAGE)
    assert buffer.data_ptr() % HUGE_PAGE == 0 and buffer.numel() == 3 * HUGE_PAGE
    fields = smaps_fields(buffer.data_ptr())
    if thp_setting() in ("always", "madvise"):  # eligible: the kernel backs it with 2 MiB pages where it has them
        assert fields.get("THPeligible") == "1"
    assert fields["Rss"] == "0 kB"  # nothing touched yet, so nothing was faulted in on 4 KiB pages


def test_packing_does_not_grow_rss():
    """The old memory is freed as each weight moves, views' bases included (a base left behind
    would hold its 64 MiB)."""
    model = torch.nn.Module()
    model.register_buffer("tiles", torch.ones(2, 32 << 20, dtype=torch.uint8)[0])  # a view of 64 MiB
    model.register_buffer("small", torch.ones(1000))
    rss = psutil.Process().memory_info().rss
    pack_weights(model)
    assert psutil.Process().memory_info().rss - rss < 16 << 20
    assert int(model.tiles.sum()) == 32 << 20 and model.tiles._base.data_ptr() % HUGE_PAGE == 0


def test_file_backed_weights_stay_where_they_are(tmp_path):
    path = tmp_path / "weights.bin"
    torch.arange(1024, dtype=torch.float32).numpy().tofile(path)
    model = torch.nn.Module()
    model.register_buffer("mapped", torch.from_file(str(path), shared=False, size=1024, dtype=torch.float32))
    model.register_buffer("own", torch.ones(8))
    mapped = model.mapped.data_ptr()
    report = pack_weights(model)
    assert model.mapped.data_ptr() == mapped and torch.equal(model.mapped, torch.arange(1024.0))
    assert report.file_backed_mib == pytest.approx(4096 / 2**20) and report.packed_mib > 0
