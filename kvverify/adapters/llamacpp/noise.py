"""How far llama.cpp's logits move when nothing is wrong: the noise floor the checks' tolerance is built on.

``python -m kvverify.adapters.llamacpp.noise --sequences 40 --seed 0`` draws token sequences and prints, for each
source of difference, the largest max-abs logit difference over every position:

- ``fresh, again``: the same context, memory cleared, the same tokens evaluated again;
- ``fresh, new context``: a second context on the same file;
- ``n_batch B``: a context that decodes B tokens per ``llama_decode`` call, against one call for the whole sequence;
- ``incremental``: one context, ``eval`` in random chunks, against one ``eval``;
- ``reference float64`` / ``reference float32``: a fresh evaluation against the reference model's uncached
  logits (float64 computation of the same float32 weights / the float32 model): the export's check.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from kvverify.adapters.llamacpp import session
from kvverify.adapters.llamacpp.model import ExportedModel, export
from kvverify.adapters.llamacpp.oracle import FreshEval, largest_difference
from kvverify.reference.model import ReferenceModel

BATCHES = (1, 3, 16, 64)


def reference_logits(model: ReferenceModel, tokens: Sequence[int]) -> np.ndarray:
    """The reference model's uncached logits: (T, vocab) float64."""
    with torch.no_grad():
        out = model(torch.tensor([list(tokens)], dtype=torch.long))  # (1, T, vocab)
    result: np.ndarray = out[0].to(torch.float64).numpy()
    return result


def draw_sequences(count: int, seed: int, *, vocab: int, max_len: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def measure(exported: ExportedModel, sequences: list[list[int]], seed: int) -> dict[str, float]:
    """The largest difference of each source (see the module's docstring) over ``sequences``."""
    spec, rng = exported.spec, random.Random(seed)
    fresh, again, other = FreshEval(spec), FreshEval(spec), FreshEval(spec)
    batched = {b: FreshEval(replace(spec, n_batch=b)) for b in BATCHES}
    ref64, ref32 = exported.reference64(), exported.reference
    incremental = session.open_context(spec)
    worst: dict[str, float] = {}

    def note(name: str, value: float) -> None:
        worst[name] = max(worst.get(name, 0.0), value)

    for tokens in sequences:
        want = fresh.logits(tokens)
        first = again.logits(tokens)
        again.forget()  # the same context, cleared and evaluated again
        note("fresh, again", largest_difference(again.logits(tokens), first))
        note("fresh, new context", largest_difference(other.logits(tokens), want))
        for b, ctx in batched.items():
            note(f"n_batch {b}", largest_difference(ctx.logits(tokens), want))
        session.clear(incremental)
        start = 0
        while start < len(tokens):
            stop = min(len(tokens), start + rng.randint(1, 16))
            session.evaluate(incremental, tokens[start:stop])
            start = stop
        note("incremental", largest_difference(session.logits(incremental, 0, len(tokens)), want))
        note("reference float64", largest_difference(want, reference_logits(ref64, tokens)))
        note("reference float32", largest_difference(want, reference_logits(ref32, tokens)))
    incremental.close()
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        exported = export(directory)
        c = exported.reference.config
        sequences = draw_sequences(args.sequences, args.seed, vocab=c.vocab_size, max_len=args.max_len)
        worst = measure(exported, sequences, args.seed)
    print(f"llama-cpp-python {session.version()}, {len(sequences)} sequences of 1-{args.max_len} tokens, "
          f"seed {args.seed}; largest max-abs logit difference:")
    for name, value in worst.items():
        print(f"  {name:<22} {value:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
