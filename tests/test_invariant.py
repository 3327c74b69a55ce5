"""The batch-invariant mode: a row alone ≡ in a batch of other sizes ≡ packed beside other requests ≡ with masked
keys (exact zeros) before, between and after its keys, bit for bit, op by op and for whole transformers models;
and ``OrderAudit``, entered outside the mode, finds no order-dependent reduction in five model families."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvverify.invariant import batch_invariant, ordered
from kvverify.invariant.attention import attention
from kvverify.invariant.audit import OrderAudit
from kvverify.reference import fixed_order, numerics

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape, dtype and bits (a -0 against a +0, or two NaNs of different payloads, count as different)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: expected {tuple(expected.shape)} {expected.dtype}, got {tuple(actual.shape)} {actual.dtype}")
    same = torch.equal(actual.contiguous().view(BITS[actual.dtype]), expected.contiguous().view(BITS[expected.dtype]))
    if not same:
        gap = (actual.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (max |Δ| = {gap:.3g})")


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _spread(n: int, before: int, between: int, after: int, at: int) -> torch.Tensor:
    """Where n real terms go among n + before + between + after slots: ``before`` slots first, ``between``
    slots after the first ``at`` real terms, ``after`` slots last. Returns the n slot indices."""
    at = min(at, n)
    return torch.cat((torch.arange(at) + before, torch.arange(at, n) + before + between))


def _with_masked(terms: torch.Tensor, dim: int, slots: torch.Tensor, total: int, fill: torch.Tensor) -> torch.Tensor:
    """``terms`` placed at ``slots`` of a length-``total`` ``dim``, the other slots taken from ``fill``."""
    out = fill.clone()
    out.index_copy_(dim, slots, terms)
    return out


#: Masked slots (before, between, after) and after how many real terms the ``between`` ones go.
masked = st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4), st.integers(0, 40))


# --- matmuls: linear (mm / addmm), mm, bmm ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(rows=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 24), where=masked, seed=st.integers(0, 99),
       bias=st.booleans())
def test_linear_row_is_invariant(dtype: torch.dtype, rows: int, k: int, n: int, where: tuple[int, ...], seed: int,
                                 bias: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    weight, b = _randn(g, n, k, dtype=dtype), (_randn(g, n, dtype=dtype) if bias else None)
    batch = _randn(g, rows, k, dtype=dtype)
    row = batch[rows // 2 : rows // 2 + 1]  # (1, k)
    before, between, after, at = where
    total = k + before + between + after
    slots = _spread(k, before, between, after, at)
    masked_row = _with_masked(row, 1, slots, total, torch.zeros(1, total, dtype=dtype))  # masked features: 0
    masked_weight = _with_masked(weight, 1, slots, total, _randn(g, n, total, dtype=dtype))  # any weights there
    others = _randn(g, 3, total, dtype=dtype)
    with batch_invariant():
        alone = F.linear(row, weight, b)
        in_batch = F.linear(batch, weight, b)[rows // 2 : rows // 2 + 1]
        with_masked = F.linear(masked_row, masked_weight, b)
        packed = F.linear(torch.cat((others[:1], masked_row, others[1:])), masked_weight, b)[1:2]
        as_3d = F.linear(batch.expand(2, rows, k).transpose(0, 1), weight, b)[rows // 2, 1:]  # not contiguous: bmm
    assert_bitwise(in_batch, alone, "in a batch")
    assert_bitwise(with_masked, alone, f"with masked features {where}")
    assert_bitwise(packed, alone, "packed beside other requests")
    assert_bitwise(as_3d, alone, "a non-contiguous 3-d input")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(batch=st.integers(1, 4), queries=st.integers(1, 6), keys=st.integers(1, 30), d=st.integers(1, 16),
       where=masked, seed=st.integers(0, 99))
def test_bmm_of_probabilities_and_values_is_invariant(dtype: torch.dtype, batch: int, queries: int, keys: int,
                                                      d: int, where: tuple[int, ...], seed: int) -> None:
    """P (B, Tq, S) @ V (B, S, D): a query's row against its keys, whatever surrounds it, masked keys as zeros."""
    g = torch.Generator().manual_seed(seed)
    probs, values = _randn(g, batch, queries, keys, dtype=dtype).abs(), _randn(g, batch, keys, d, dtype=dtype)
    before, between, after, at = where
    total = keys + before + between + after
    slots = _spread(keys, before, between, after, at)
    row = probs[-1:, -1:]  # (1, 1, S)
    masked_probs = _with_masked(row, 2, slots, total, torch.zeros(1, 1, total, dtype=dtype))
    masked_values = _with_masked(values[-1:], 1, slots, total, _randn(g, 1, total, d, dtype=dtype))
    with batch_invariant():
        alone = torch.bmm(row, values[-1:])
        in_batch = torch.bmm(probs, values)[-1:, -1:]
        with_masked = torch.bmm(masked_probs, masked_values)
        via_matmul = torch.matmul(probs[:, None], values[:, None])[-1:, 0, -1:]  # 4-d matmul: bmm after a view
        via_mm = torch.mm(row[0], values[-1])[None]
        via_baddbmm = torch.baddbmm(torch.zeros(1, 1, d, dtype=dtype), row, values[-1:], beta=0)
    assert_bitwise(in_batch, alone, "in a batch")
    assert_bitwise(with_masked, alone, f"with masked keys {where}")
    assert_bitwise(via_matmul, alone, "through torch.matmul")
    assert_bitwise(via_mm, alone, "through mm")
    assert_bitwise(via_baddbmm, alone, "through baddbmm")


def test_chunking_changes_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks that bound memory (accumulators, summed rows, queries) only decide what is computed at once."""
    from kvverify.invariant import attention as attention_module

    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 17, 29, generator=g), torch.randn(3, 29, 13, generator=g)
    q, k = torch.randn(2, 4, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)

    def run() -> list[torch.Tensor]:
        with batch_invariant():
            return [a @ b, a.sum(-1), F.softmax(a, -1),
                    F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)]

    whole = run()
    monkeypatch.setattr(ordered, "CHUNK", 5)
    monkeypatch.setattr(ordered, "SUM_CHUNK", 3)
    monkeypatch.setattr(ordered, "SUM_MIN_OUTPUTS", 2)
    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 7)
    for name, chunked, expected in zip(["matmul", "sum", "softmax", "sdpa"], run(), whole, strict=True):
        assert_bitwise(chunked, expected, f"{name} in small chunks")


def test_a_halving_tree_fails_the_masked_keys_check() -> None:
    """The check bites: the strict oracle's halving tree pairs terms by position, so a zero between them moves
    the pairs; left to right it changes nothing."""
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(1, 7, generator=g)
    between = torch.cat((terms[:, :3], torch.zeros(1, 1), terms[:, 3:]), 1)
    ordered_sums = [ordered.ordered_sum(t, -1) for t in (terms, between)]
    tree_sums = [numerics.tree_sum(t, -1) for t in (terms, between)]
    assert_bitwise(ordered_sums[1], ordered_sums[0], "left to right")
    with pytest.raises(AssertionError, match="not bitwise equal"):
        assert_bitwise(tree_sums[1], tree_sums[0], "a halving tree")


# --- softmax, sums, norms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(rows=st.integers(1, 9), keys=st.integers(1, 40), where=masked, seed=st.integers(0, 99),
       mask_value=st.sampled_from(["-inf", "finfo.min"]))
def test_softmax_sum_and_mean_rows_are_invariant(dtype: torch.dtype, rows: int, keys: int, where: tuple[int, ...],
                                                 seed: int, mask_value: str) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = _randn(g, rows, keys, dtype=dtype) * 3
    row = batch[:1]
    before, between, after, at = where
    total = keys + before + between + after
    slots = _spread(keys, before, between, after, at)
    low = float("-inf") if mask_value == "-inf" else torch.finfo(dtype).min
    masked_scores = _with_masked(row, 1, slots, total, torch.full((1, total), low, dtype=dtype))
    masked_terms = _with_masked(row, 1, slots, total, torch.zeros(1, total, dtype=dtype))
    with batch_invariant():
        probs = F.softmax(row, -1)
        for name, out in [("softmax in a batch", F.softmax(batch, -1)[:1]),
                          ("softmax with masked keys", F.softmax(masked_scores, -1)[:, slots])]:
            assert_bitwise(out, probs, name)
        if dtype != torch.float64:  # half types accumulate in float32 either way
            assert_bitwise(F.softmax(row, -1, dtype=torch.float32).to(dtype), probs, "softmax to float32")
        assert not F.softmax(masked_scores, -1)[:, [i for i in range(total) if i not in slots]].any()
        assert_bitwise(F.log_softmax(batch, -1)[:1], F.log_softmax(row, -1), "log_softmax in a batch")
        total_ = row.sum(-1)
        assert_bitwise(batch.sum(-1)[:1], total_, "sum in a batch")
        assert_bitwise(masked_terms.sum(-1), total_, f"sum with zeros {where}")
        assert_bitwise(batch.T.sum(0, keepdim=True)[:, :1], total_[None], "sum over dim 0 of a transposed view")
        assert_bitwise(batch.mean(-1)[:1], row.mean(-1), "mean in a batch")
        assert_bitwise(batch.logsumexp(-1)[:1], row.logsumexp(-1), "logsumexp in a batch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(rows=st.integers(1, 9), d=st.integers(1, 48), seed=st.integers(0, 99))
def test_norm_rows_are_invariant(dtype: torch.dtype, rows: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, weight, bias = _randn(g, rows, d, dtype=dtype), _randn(g, d, dtype=dtype), _randn(g, d, dtype=dtype)
    row = batch[-1:]

    def llama_rms(x: torch.Tensor) -> torch.Tensor:  # as transformers' LlamaRMSNorm: pow, mean, rsqrt
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    norms: dict[str, Callable[[torch.Tensor], Any]] = {
        "layer_norm": lambda x: F.layer_norm(x, (d,), weight, bias, 1e-5),
        "rms_norm": lambda x: F.rms_norm(x, (d,), weight, 1e-6),
        "llama rms": llama_rms,
        "fused rms (aten)": lambda x: torch.ops.aten._fused_rms_norm(x, [d], weight, 1e-6)[0],
        "native layer norm stats": lambda x: torch.cat(torch.ops.aten.native_layer_norm(x, [d], None, None, 1e-5)[1:],
                                                       -1),
    }
    with batch_invariant():
        for name, norm in norms.items():
            assert_bitwise(norm(batch)[-1:], norm(row), f"{name} in a batch of {rows}")


# --- attention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(batch=st.integers(1, 3), queries=st.integers(1, 5), keys=st.integers(1, 20), where=masked,
       seed=st.integers(0, 99), gqa=st.booleans(), float_mask=st.booleans())
def test_sdpa_query_is_invariant(dtype: torch.dtype, batch: int, queries: int, keys: int, where: tuple[int, ...],
                                 seed: int, gqa: bool, float_mask: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, d = 4, (2 if gqa else 4), 8
    q = _randn(g, batch, heads, queries, d, dtype=dtype)
    k, v = _randn(g, batch, kv_heads, keys, d, dtype=dtype), _randn(g, batch, kv_heads, keys, d, dtype=dtype)
    row_q, row_k, row_v = q[-1:, :, -1:], k[-1:], v[-1:]
    before, between, after, at = where
    total = keys + before + between + after
    slots = _spread(keys, before, between, after, at)
    junk = _randn(g, 1, kv_heads, total, d, dtype=dtype)
    masked_k, masked_v = _with_masked(row_k, 2, slots, total, junk), _with_masked(row_v, 2, slots, total, -junk)
    visible = torch.zeros(1, 1, 1, total, dtype=torch.bool)
    visible[..., slots] = True
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf")) if float_mask else visible

    def sdpa(*args: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return F.scaled_dot_product_attention(*args, enable_gqa=gqa, **kwargs)

    with batch_invariant():
        alone = sdpa(row_q, row_k, row_v)
        assert_bitwise(sdpa(q, k, v)[-1:, :, -1:], alone, "in a batch")
        assert_bitwise(sdpa(masked_q := row_q, masked_k, masked_v, attn_mask=mask), alone, f"masked keys {where}")
        causal = sdpa(q, k, v, is_causal=True)[-1:, :, -1:]  # the last query sees keys 0..queries-1
        seen = min(queries, keys)
        assert_bitwise(causal, sdpa(masked_q, row_k[:, :, :seen], row_v[:, :, :seen]), "causal, the last query")


def test_the_cpu_flash_kernel_is_replaced_too() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    with batch_invariant():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(8))
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        expected_lse = scores.logsumexp(-1)
    assert_bitwise(out, expected, "the CPU flash kernel's output")
    assert_bitwise(lse, expected_lse, "its log-sum-exp")


# --- transformers models ----------------------------------------------------------------------------------


def _model(family: str, attn: str) -> Any:
    tf = pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[test]'")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=3),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, sliding_window=3),  # eager only in transformers
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=None, eos_token_id=None),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[family](), attn_implementation=attn).eval()


AUDITED = [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("qwen2", "sdpa"), ("mistral", "eager"),
           ("mistral", "sdpa"), ("gemma2", "eager"), ("gemma", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")]


@pytest.mark.parametrize(("family", "attn"), AUDITED, ids=["-".join(case) for case in AUDITED])
def test_audit_finds_no_order_dependent_reduction_in_transformers_models(family: str, attn: str) -> None:
    model = _model(family, attn)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding: masked keys before the row's own
    with torch.no_grad(), OrderAudit() as audit, batch_invariant() as mode:
        model(tokens, attention_mask=mask)
    assert audit.calls > 300 and mode.replaced > 0, f"the audit saw {audit.calls} calls, the mode replaced " \
        f"{mode.replaced}: is either mode active?"
    assert not audit.violations, audit.report()


def test_the_audit_sees_the_replaced_ops_only_from_outside() -> None:
    """Entered inside the audit, the mode's elementwise ops are what the audit sees; entered outside it, the
    audit sees (and flags) the matmul the mode then replaces, so the order of the two cannot hide anything. (The
    mode's pure-PyTorch matmul, whose ops the audit can see; the native one is checked by its bits in
    tests/test_fixed_order.py.)"""
    x = torch.randn(4, 16)
    with fixed_order.use("python"), OrderAudit() as inside, batch_invariant():
        x @ x.T
    with batch_invariant(), OrderAudit() as outside:
        x @ x.T
    assert not inside.violations and inside.calls > 16, inside.report()
    assert [v.op for v in outside.violations] == ["aten.mm.default"], outside.report()


def test_inference_mode_composites_are_decomposed_into_the_mode() -> None:
    """Under inference_mode, composite ops (softmax.int, matmul, layer_norm, rms_norm, einsum) reach the mode
    whole; it decomposes them into its kernels, with the bits no_grad gives, and the audit still finds nothing."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 5, 8, generator=g), torch.randn(8, generator=g)
    ops: dict[str, Callable[[], torch.Tensor]] = {
        "softmax": lambda: F.softmax(x, -1), "log_softmax": lambda: F.log_softmax(x, -1),
        "matmul": lambda: x @ x.transpose(1, 2), "layer_norm": lambda: F.layer_norm(x, (8,)),
        "rms_norm": lambda: F.rms_norm(x, (8,), w), "einsum": lambda: torch.einsum("bij,bkj->bik", x, x),
        "linear": lambda: F.linear(x, x[0]),
        "aten sdpa": lambda: torch.ops.aten.scaled_dot_product_attention(x[None], x[None], x[None], is_causal=True),
    }
    with torch.no_grad(), batch_invariant():
        expected = {name: op() for name, op in ops.items()}
    model, tokens = _model("llama", "sdpa"), torch.randint(0, 96, (2, 6), generator=g)
    with torch.inference_mode(), OrderAudit() as audit, batch_invariant():
        for name, op in ops.items():
            assert_bitwise(op(), expected[name], f"{name} under inference_mode")
        model(tokens)
    assert not audit.violations, audit.report()


def _block_causal(lengths: list[int]) -> torch.Tensor:
    """An additive (1, 1, T, T) mask for requests packed in one row: causal within each, masked across."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_logits_of_a_sequence_are_the_same_alone_padded_and_batched(attn: str) -> None:
    from transformers import DynamicCache

    from kvverify.adapters.hf.generation import cache_keyword

    model = _model("llama", attn)
    g = torch.Generator().manual_seed(2)
    seq, others = torch.randint(0, 96, (1, 9), generator=g), torch.randint(0, 96, (3, 9), generator=g)
    pad = torch.zeros(1, 4, dtype=torch.long)
    left = torch.cat((pad, seq), 1)
    left_mask = torch.cat((torch.zeros(1, 4), torch.ones(1, 9)), 1).long()
    with torch.no_grad(), batch_invariant():
        alone = model(seq).logits  # (1, 9, vocab)
        batched = model(torch.cat((others[:2], seq, others[2:]))).logits[2:3]
        left_padded = model(torch.cat((left, torch.cat((pad, others[:1]), 1))),
                            attention_mask=torch.cat((left_mask, torch.ones(1, 13).long())),
                            position_ids=(torch.arange(13) - 4).clamp(min=0).expand(2, 13)).logits[:1, 4:]
        right_padded = model(torch.cat((seq, pad), 1), attention_mask=torch.cat((torch.ones(1, 9), torch.zeros(1, 4)),
                                                                                1).long()).logits[:, :9]
        packed = model(torch.cat((others[:1, :5], seq), 1), attention_mask=_block_causal([5, 9]),
                       position_ids=torch.cat((torch.arange(5), torch.arange(9)))[None]).logits[:, 5:]
        cache = DynamicCache(config=model.config)
        model(seq[:, :-1], use_cache=True, **{cache_keyword(model): cache})
        decoded = model(seq[:, -1:], use_cache=True, **{cache_keyword(model): cache}).logits
    assert_bitwise(batched, alone, "inside a batch of other sequences")
    assert_bitwise(left_padded, alone, "left-padded beside another sequence (masked keys before)")
    assert_bitwise(right_padded, alone, "right-padded (masked keys after)")
    assert_bitwise(packed, alone, "packed in one row after another request (its keys masked, before)")
    assert_bitwise(decoded, alone[:, -1:], "the last token decoded through a cache")


# --- devices, layouts and errors --------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_on_a_device(device: str) -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 5, 7, generator=g).to(device).transpose(0, 2)  # (7, 5, 6), not contiguous
    b = torch.randn(7, 3, 6, generator=g).to(device).transpose(1, 2)  # (7, 6, 3), not contiguous
    out = ordered.matmul(a, b)
    assert out.device.type == device and out.shape == (7, 5, 3)
    assert_bitwise(out, ordered.matmul(a.contiguous(), b.contiguous()), "non-contiguous operands")
    assert_bitwise(out[2:3, 1:2], ordered.matmul(a[2:3, 1:2], b[2:3]), "one row of a strided view")
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    q = torch.randn(1, 4, 3, 8, generator=g).to(device).transpose(1, 2).contiguous().transpose(1, 2)
    with batch_invariant():
        got = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert got.device.type == device
        assert_bitwise(got, F.scaled_dot_product_attention(q.contiguous(), q.contiguous(), q.contiguous(),
                                                           is_causal=True), "a transposed query")


@pytest.mark.cuda
@CUDA
def test_cuda_rows_are_invariant_and_matmul_matches_the_cpu_bits() -> None:
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(33, 257, generator=g), torch.randn(65, 257, generator=g)
    q, k = torch.randn(3, 4, 9, 16, generator=g), torch.randn(3, 2, 20, 16, generator=g)
    with batch_invariant():
        cpu = F.linear(x, w)
        xc, wc, qc, kc = x.cuda(), w.cuda(), q.cuda(), k.cuda()
        assert_bitwise(F.linear(xc, wc)[5:6], F.linear(xc[5:6], wc), "a row of a CUDA batch")
        assert_bitwise(F.linear(xc, wc).cpu(), cpu, "CUDA against CPU (correctly rounded mul and add)")
        batch = F.scaled_dot_product_attention(qc, kc, kc, enable_gqa=True)
        alone = F.scaled_dot_product_attention(qc[1:2, :, 4:5], kc[1:2], kc[1:2], enable_gqa=True)
        assert_bitwise(batch[1:2, :, 4:5], alone, "a CUDA query in a batch")


def test_transcendental_ops_give_an_element_the_same_bits_anywhere() -> None:
    x = torch.randn(4099, generator=torch.Generator().manual_seed(6)) * 3
    with batch_invariant():
        for name, fn in [("silu", F.silu), ("gelu", F.gelu), ("gelu tanh", lambda t: F.gelu(t, approximate="tanh")),
                         ("sigmoid", torch.sigmoid), ("softplus", F.softplus),
                         ("exp in place", lambda t: t.clone().exp_())]:
            full = fn(x)
            for offset in (0, 1, 7, 63, 64, 65):
                assert_bitwise(fn(x[offset : offset + 5]), full[offset : offset + 5], f"{name} at offset {offset}")


def test_bad_input_gets_a_clear_error() -> None:
    q = torch.randn(1, 4, 2, 8)
    with batch_invariant():
        with pytest.raises(ValueError, match=r"dropout_p must be 0, got 0\.5"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        with pytest.raises(ValueError, match="query has 4 heads and key/value 3"):
            F.scaled_dot_product_attention(q, q[:, :3], q[:, :3], enable_gqa=True)
        with pytest.raises(ValueError, match=r"matmul expects a \(B, M, K\) and b \(B, K, N\); got \(1, 2, 3\)"):
            torch.randn(2, 3) @ torch.randn(4, 5)
        with pytest.raises(NotImplementedError, match="does not replace fused attention kernels"):
            torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, False)
    with pytest.raises(ValueError, match="attn_mask and is_causal cannot both be set"):
        attention(q, q, q, torch.ones(2, 2, dtype=torch.bool), is_causal=True)
