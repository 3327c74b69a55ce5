"""FlashInfer's paged cache: the page table and the gather on the CPU; FlashInfer's own append on CUDA."""

from __future__ import annotations

import pytest
import torch

from kvverify.adapters import flashinfer as fi
from kvverify.protocol.config import ModelConfig
from kvverify.reference.model import ReferenceModel

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=40,
                     max_batch_size=2)


def test_page_table_in_flashinfers_csr_form() -> None:
    table = fi.PageTable(batch=2, max_pages=8, device=torch.device("cpu"))
    table.grow(17)  # two pages per row, one token in the last
    indptr, indices, last = table.csr()
    assert indptr.tolist() == [0, 2, 4] and indices.tolist() == [0, 1, 2, 3] and last.tolist() == [1, 1]
    rows, positions = table.append_coordinates(2)
    assert rows.tolist() == [0, 0, 1, 1] and positions.tolist() == [15, 16, 15, 16]
    with pytest.raises(ValueError, match="exhausted"):
        table.grow(100)


def test_cached_equals_uncached_through_pages_on_the_cpu() -> None:
    model = ReferenceModel(CONFIG, seed=0)
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    expected = model.generate(prompt, 20, use_cache=False, attention_mask=mask)  # crosses a page boundary
    actual = model.generate(prompt, 20, cache=fi.paged_kv_cache_torch(CONFIG), attention_mask=mask)
    assert torch.equal(expected.logits, actual.logits)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer's kernels need CUDA; this machine has none")
def test_flashinfers_append_matches_the_torch_one_on_cuda() -> None:
    pytest.importorskip("flashinfer", reason="flashinfer is not installed: pip install 'kvverify[flashinfer]'")
    config = CONFIG.replace(device="cuda", dtype=torch.float16)
    model = ReferenceModel(config, seed=0)
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    expected = model.generate(prompt, 20, cache=fi.paged_kv_cache_torch(config))
    actual = model.generate(prompt, 20, cache=fi.paged_kv_cache(config))
    assert torch.equal(expected.logits, actual.logits)
