"""A catalogue of deliberately buggy KV caches: each a small variant of a correct built-in cache with one
planted bug, reproducing a bug that shipped in a public project (see ``docs/KV_BUGS.md``).

A verifier is worth the bugs it catches: ``kvverify mutants`` runs the property suite against every entry of
:data:`MUTANTS` and reports which were killed.
"""

from __future__ import annotations

from kvverify.mutants.catalogue import MUTANTS, NEEDS, SECTIONS, Mutant

__all__ = ["MUTANTS", "NEEDS", "SECTIONS", "Mutant"]
