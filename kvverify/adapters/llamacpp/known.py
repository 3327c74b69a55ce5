"""llama-cpp-python's known failures (see :mod:`kvverify.adapters.known_failures`), each with its fixed example.

- ``llamacpp-generate-stale-logits-after-rollback``: since 0.3.32 (#2306, "preserve recurrent/hybrid model state
  when the full prompt is already cached"), ``Llama.generate(prompt)`` skips evaluation when the context holds
  exactly ``prompt`` and ``_requires_eval`` is false, and samples its first token from the context's last logits.
  Only ``reset``, ``load_state`` and ``generate``'s own rollbacks set ``_requires_eval``; a caller that rolls the
  context back by lowering ``n_tokens`` (with or without ``llama_memory_seq_rm``: the pattern ``generate`` uses
  itself, and the multimodal chat handlers assign ``n_tokens`` too) leaves it false, so the first token comes from
  the logits of the position held *before* the rollback. ``[Eval(3, 4), Crop(keep=-1), Generate(the 1 token held)]``
  is the shrunk case. 0.3.31 matched the prefix on ``tokens[:-1]`` and always evaluated the last prompt token again.
  No upstream issue found (one search of an issue index for a generate rollback with stale logits).
"""

from __future__ import annotations

import tempfile

from kvverify.adapters.known_failures import KnownFailure
from kvverify.adapters.llamacpp import session
from kvverify.adapters.llamacpp.model import export


def generate_after_rollback() -> str | None:
    """Evaluate [3, 4, 5, 6], roll back to 2 tokens, ``generate([3, 4])``: its first greedy token must be a fresh
    context's."""
    with tempfile.TemporaryDirectory(prefix="kvverify-llamacpp-") as directory:
        spec = export(directory).spec
        rolled, fresh = session.open_context(spec), session.open_context(spec)
        try:
            session.evaluate(rolled, [3, 4, 5, 6])
            session.crop(rolled, 2)  # llama_memory_seq_rm(mem, -1, 2, -1); n_tokens = 2
            got, want = session.generate(rolled, [3, 4], 1), session.generate(fresh, [3, 4], 1)
        finally:
            rolled.close()
            fresh.close()
    if got == want:
        return None
    return (f"after eval([3, 4, 5, 6]) and a rollback to 2 tokens, generate([3, 4]) chose {got[0]}; a fresh context "
            f"chose {want[0]} (the stale logits of position 3, not 1)")


KNOWN: tuple[KnownFailure, ...] = (
    KnownFailure(
        name="llamacpp-generate-stale-logits-after-rollback",
        library="llama-cpp-python",
        versions=("0.3.32", None),
        cache="llamacpp",
        checks=("generate_prefix_reuse", "ram_cache_prefix_reuse"),
        pattern=r"(?s)Llama\.generate chose .*token 0 after the .*greedy choice.*minimal case: program=\[.*Crop\(",
        summary="generate(prompt) on a context rolled back to exactly prompt samples from the pre-rollback logits",
        reproduce=generate_after_rollback,
        related="https://github.com/abetlen/llama-cpp-python/pull/2306",
    ),
)
