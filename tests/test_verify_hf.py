"""``kvverify verify-hf``: the table, the exit codes, and a planted cache bug that it must catch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install 'kvverify[transformers]'")

from kvverify.adapters.hf import caches, verify
from kvverify.cli import main
from kvverify.invariant import batch_invariant
from kvverify.reference.model import Generation


def test_subset_passes_and_says_why_pairs_do_not_apply(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify-hf", "--models", "llama,mistral", "--caches", "dynamic,sliding,offloaded"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {tuple(line.split()[:2]): line for line in out.splitlines() if line.startswith(("llama", "mistral"))}
    for pair in [("llama", "dynamic"), ("mistral", "dynamic"), ("mistral", "sliding")]:
        assert pair in lines and lines[pair].rstrip().endswith("pass"), f"{pair} did not pass:\n{out}"
        assert "identical" in lines[pair]
    assert "n/a: no sliding-window layers" in lines[("llama", "sliding")]
    if not torch.cuda.is_available():
        assert "n/a: offloading needs CUDA" in lines[("mistral", "offloaded")]
    assert "3 pairs compared, 0 failed" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--models", "llama,falcon"], "unknown model falcon; valid models: llama, mistral, qwen2, gpt2, gemma2"),
        (["--caches", "dynamic,paged"], "unknown cache paged; valid caches: dynamic, static, sliding"),
        (["--models", ","], "unknown model ','"),
    ],
)
def test_unknown_names_are_usage_errors(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-hf", *argv]) == 2
    assert expected in capsys.readouterr().err


def _dropping_cache(config: Any, length: int) -> Any:
    """A DynamicCache that, once past the prompt, returns token 2 in place of token 3 (same length)."""
    from transformers import DynamicCache

    class DroppingCache(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if keys.shape[-2] <= verify.PROMPT_LEN:
                return keys, values
            drop = [0, 1, 2, 2, *range(4, keys.shape[-2])]  # token 3 is gone
            return keys[:, :, drop], values[:, :, drop]

    return DroppingCache()


DROPPING = caches.TransformersCache("dynamic", "a DynamicCache that drops token 3", _dropping_cache)


def test_a_cache_that_drops_a_token_fails_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(caches.CACHES, "dynamic", DROPPING)
    code = main(["verify-hf", "--models", "llama", "--caches", "dynamic,static"])
    out = capsys.readouterr().out
    assert code == 1, out
    broken = next(line for line in out.splitlines() if line.startswith("llama") and " dynamic " in line)
    assert broken.rstrip().endswith("FAIL"), out
    error = float(broken.split()[2])
    assert error > 100 * verify.EXACT_ATOL, f"a dropped token should be far outside the tolerance: {broken}"
    assert "1 failed" in out


def _run(rows: list[list[float]]) -> Generation:
    """A one-row run whose step i has the logits ``rows[i]`` and chooses their argmax."""
    logits = torch.tensor(rows).unsqueeze(0)  # (1, N, vocab)
    tokens = logits.argmax(-1)  # (1, N)
    return Generation(tokens, logits, tokens, torch.ones_like(tokens), None)


def test_compare_calls_a_swap_at_a_near_tie_a_near_tie() -> None:
    ref = _run([[0.0, 1.0, 1.00004], [3.0, 0.0, 0.0]])  # step 0: top two 4e-5 apart
    cached = _run([[0.0, 1.00002, 1.00001], [3.0, 0.0, 0.0]])
    result = verify.compare(ref, cached, atol=1e-4)
    assert result.passed and result.agreement.near_ties == ((0, 0),) and result.tokens == "near tie at step 0"


def test_compare_fails_a_swap_between_distinct_logits() -> None:
    ref = _run([[0.0, 1.0, 2.0]])
    cached = _run([[0.0, 2.0, 1.0]])
    result = verify.compare(ref, cached, atol=1e-4)
    assert not result.passed and result.tokens == "differ: row 0 step 0" and result.max_error == 1.0


def test_compare_fails_an_error_beyond_tolerance_with_identical_tokens() -> None:
    ref = _run([[0.0, 1.0, 5.0]])
    result = verify.compare(ref, _run([[0.0, 1.0, 5.0 + 1e-3]]), atol=1e-4)
    assert not result.passed and result.tokens == "identical"


def test_bitwise_mode_makes_transformers_caches_exact(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify-hf", "--bitwise", "--models", "gemma2", "--caches", "dynamic,hybrid"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("gemma2")]
    assert [row[1:5] for row in rows] == [["dynamic", "0", "0", "identical"], ["hybrid", "0", "0", "identical"]], out


def test_bitwise_mode_catches_a_dropped_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(caches.CACHES, "dynamic", DROPPING)
    rows = verify.verify_model("llama", ["dynamic"], bitwise=True)
    assert rows[0].verdict == "FAIL"


def test_batch_invariant_kernels_are_removed_afterwards() -> None:
    a, b = torch.randn(33, 257, generator=torch.Generator().manual_seed(0)), torch.randn(257, 65)
    before = a @ b
    ordered = torch.zeros(33, 65)
    for k in range(257):  # left to right, one rounded product and one add per term
        ordered = ordered + a[:, k, None] * b[k]
    with batch_invariant():
        inside = a @ b
    assert torch.equal(inside, ordered), "the fixed-order kernel is not in use"
    assert not torch.equal(inside, before), "this product does not tell the two kernels apart"
    assert torch.equal(a @ b, before), "the standard kernel was not restored"


def test_a_pair_whose_cache_raises_is_a_failure_of_that_pair_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    real = verify.teacher_forced

    calls = []

    def broken_for_static(model: Any, prompt: Any, mask: Any, tokens: Any, cache: Any) -> Any:
        calls.append(cache)
        if len(calls) == 2:  # the second pair's cache: static
            raise ValueError("True is not in list")
        return real(model, prompt, mask, tokens, cache)

    monkeypatch.setattr(verify, "teacher_forced", broken_for_static)
    rows = {row.cache: row for row in verify.verify_model("llama", ["dynamic", "static"])}
    assert rows["dynamic"].verdict == "pass"
    assert rows["static"].verdict == "FAIL" and "raised ValueError: True is not in list" in rows["static"].reason
