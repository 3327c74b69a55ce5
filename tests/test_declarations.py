"""What a cache declares is honoured: for each CacheDeclaration field, a small cache that breaks outside a range
passes when it declares the range and fails when it does not (``devices``: an undeclared device is refused).
Also: every field is checked (a wrong value is a usage error naming the field, exit 2 from the command line),
``kvverify.Unsupported`` skips an example and is reported, bugs past 50 tokens and at a 64-token page boundary
die on every seed of the ci profile, and Hypothesis writes nothing into the working directory."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

import kvverify
from kvverify.checks import make_target
from kvverify.checks.case import Case
from kvverify.checks.loading import TargetError
from kvverify.checks.properties import PROPERTIES
from kvverify.checks.property import numerics_cases
from kvverify.cli import main
from kvverify.protocol.cache import CacheDeclaration, declaration_of
from kvverify.protocol.declaration import RULES, DeclarationError
from kvverify.runs import run_suite
from kvverify.runs import settings as settings_module
from kvverify.runs.runner import run_property

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from targets import declared  # noqa: E402

pytestmark = pytest.mark.slow  # each declaration field run both ways through the suite, two ci seeds: 90 s of CPU

FEW = dict(profile="dev", seed=1, max_examples=12)


def _verdict(factory: object, prop: str = "cached_equals_uncached", **options: object) -> kvverify.SuiteResult:
    run = {**FEW, **options}
    return run_suite(factory, target=getattr(factory, "__qualname__", "cache"), properties=[prop],  # type: ignore[arg-type]
                     **run)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", sorted(declared.PAIRS))
def test_a_cache_that_breaks_outside_its_range_passes_when_declared_and_fails_when_not(field: str) -> None:
    undeclared, with_declaration = declared.PAIRS[field]
    prop = "crop" if field == "crop_argument" else "cached_equals_uncached"
    good = _verdict(with_declaration, prop).results[0]
    assert good.verdict == "passed", f"{field}: declared, the cache should pass; got {good.verdict}: {good.detail}"
    bad = _verdict(undeclared, prop).results[0]
    assert bad.verdict == "failed", f"{field}: undeclared, the suite should leave the range and fail the cache"


def test_a_lossy_cache_reports_the_largest_difference_it_saw() -> None:
    result = _verdict(declared.PAIRS["lossy_atol"][1]).results[0]
    assert result.largest_difference is not None and 0 < result.largest_difference <= 1.0, result


def test_a_factory_taking_batch_size_gets_the_case_batch() -> None:
    seen: list[tuple[int, int]] = []

    def make(config: kvverify.ModelConfig, batch_size: int) -> declared.Concat:
        seen.append((config.max_batch_size, batch_size))
        return declared.Concat(config)

    make.kvverify_declaration = CacheDeclaration(batch_sizes=(3,))  # type: ignore[attr-defined]
    assert _verdict(make).ok
    assert seen and all(b == 3 and m == 3 for m, b in seen), seen


def _near_pages(factory: object, block: int = 24) -> float:
    """The share of 200 drawn cases whose prompt or final length lies within one token of a multiple of ``block``."""
    strategy = numerics_cases(make_target(factory))  # type: ignore[arg-type]
    near: list[bool] = []

    @hypothesis_seed(1)
    @settings(max_examples=200, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def draw(case: Case) -> None:
        near.append(any(n >= block - 1 and (n + 1) % block <= 2 for n in (case.prompt_len, case.total_len)))

    draw()
    return sum(near) / len(near)


def test_block_size_weights_lengths_to_its_multiples() -> None:
    """Declared block_size=24: lengths at multiples of 24 (either side) are drawn far more often."""
    declared_share, undeclared_share = _near_pages(declared.pages_24_declared), _near_pages(declared.pages_24)
    assert declared_share >= 0.25 and declared_share >= 2 * undeclared_share, (declared_share, undeclared_share)


def test_an_undeclared_device_is_refused_and_a_declared_one_runs() -> None:
    def make(config: kvverify.ModelConfig) -> declared.Concat:
        return declared.Concat(config)

    make.kvverify_declaration = CacheDeclaration(devices=("cuda",))  # type: ignore[attr-defined]
    with pytest.raises(TargetError, match=r"declares it runs on cuda.*asked to run on cpu"):
        make_target(make)
    make.kvverify_declaration = CacheDeclaration(devices=("cpu",))  # type: ignore[attr-defined]
    assert make_target(make).device == torch.device("cpu")


def test_every_field_has_a_rule() -> None:
    missing = [f.name for f in dataclasses.fields(CacheDeclaration) if f.name not in RULES]
    assert not missing, f"CacheDeclaration fields without a rule in kvverify.protocol.declaration.RULES: {missing}"


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("lossy_atol", -1, "finite number >= 0"),
    ("lossy_atol", "0.1", "finite number >= 0"),
    ("sliding_window", 0, "int >= 1"),
    ("max_batch_size", 0, "int >= 1"),
    ("max_seq_len", 1, "int >= 2"),
    ("crop_argument", "sideways", "'keep' or 'remove'"),
    ("devices", ("gpu",), "device names"),
    ("head_dims", (64, 0), "ints >= 1"),
    ("head_dims", (), "ints >= 1"),
    ("dtypes", (torch.int8,), "torch dtypes"),
    ("batch_sizes", (1.5,), "ints >= 1"),
    ("block_size", True, "int >= 1"),
    ("positional", "alibi", "'rope'"),
])
def test_a_wrong_value_names_the_field_what_came_and_what_is_expected(field: str, value: object,
                                                                      expected: str) -> None:
    with pytest.raises(DeclarationError, match=rf"CacheDeclaration\.{field} .*{expected}"):
        CacheDeclaration(**{field: value})  # type: ignore[arg-type]


def test_fields_are_normalised() -> None:
    d = CacheDeclaration(head_dims=64, dtypes=("bfloat16", torch.float16), devices="cuda")  # type: ignore[arg-type]
    assert (d.head_dims, d.dtypes, d.devices) == ((64,), (torch.bfloat16, torch.float16), ("cuda",))
    with pytest.raises(DeclarationError, match="larger than max_batch_size=2"):
        CacheDeclaration(batch_sizes=(4,), max_batch_size=2)


def test_a_declaration_that_is_not_a_cache_declaration_is_refused() -> None:
    def make(config: kvverify.ModelConfig) -> declared.Concat:
        return declared.Concat(config)

    make.kvverify_declaration = {"lossy_atol": 0.1}  # type: ignore[attr-defined]
    with pytest.raises(DeclarationError, match=r"is \{'lossy_atol': 0.1\} \(a dict\); expected a kvverify"):
        declaration_of(make)
    with pytest.raises(TargetError, match="CacheDeclaration"):
        make_target(make)


def test_a_wrong_declaration_exits_2_naming_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "wrongly_declared.py").write_text(
        "import kvverify\n"
        "def make(config):\n    return kvverify.ContiguousCache()\n"
        "make.kvverify_declaration = {'max_batch_size': 0}\n"
        "def atol(config):\n    return kvverify.ContiguousCache()\n"
        "atol.kvverify_declaration = kvverify.CacheDeclaration()\n"
        "object.__setattr__(atol.kvverify_declaration, 'lossy_atol', -1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "wrongly_declared:make", "--max-examples", "1"]) == 2
    assert "expected a kvverify.CacheDeclaration" in capsys.readouterr().err
    assert main(["verify", "wrongly_declared:atol", "--max-examples", "1"]) == 2
    assert "CacheDeclaration.lossy_atol is -1 (a int); expected None or a finite number" in capsys.readouterr().err


def test_unsupported_examples_are_skipped_and_reported() -> None:
    some = _verdict(declared.refuses_head_dims).results[0]
    assert some.verdict == "passed" and some.unsupported > 0, some
    assert "head_dim" in some.unsupported_why
    every = _verdict(declared.refuses_everything).results[0]
    assert every.verdict == "skipped", every
    assert "raised kvverify.Unsupported for every one drawn" in every.detail


def test_a_declared_batch_the_property_cannot_use_is_a_stated_skip() -> None:
    def make(config: kvverify.ModelConfig) -> declared.Concat:
        return declared.Concat(config)

    make.kvverify_declaration = CacheDeclaration(batch_sizes=(1,))  # type: ignore[attr-defined]
    result = _verdict(make, "batch_independence").results[0]
    assert result.verdict == "skipped" and "no example fits what the cache declares" in result.detail, result


@pytest.mark.parametrize("factory", [declared.past_fifty, declared.page_of_64], ids=["token 50", "page of 64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bugs_past_64_tokens_die_on_every_seed_of_the_ci_profile(
        factory: object, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # the ci profile's examples in its order; only the shrinking and locating after the kill are left out
    monkeypatch.setattr(settings_module, "UNSHRUNK", settings_module.UNSHRUNK | {"cached_equals_uncached"})
    target = make_target(factory, "planted")  # type: ignore[arg-type]
    result = run_property(PROPERTIES["cached_equals_uncached"], target, profile="ci", seed=seed, locate=False)
    assert result.verdict == "failed", f"seed {seed}: the planted bug survived the ci profile"


def test_verify_prints_the_declaration_and_writes_no_hypothesis_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVVERIFY_HYPOTHESIS_DIR", str(tmp_path / "store"))
    monkeypatch.delenv("HYPOTHESIS_STORAGE_DIRECTORY", raising=False)
    monkeypatch.syspath_prepend(str(TESTS))
    argv = ["verify", "targets.declared:pages_24_declared", "--profile", "dev", "--max-examples", "2",
            "--property", "cached_equals_uncached", "--seed", "0"]
    main(argv)
    out = capsys.readouterr().out
    assert "CacheDeclaration(block_size=24), shapes default" in out
    assert not (tmp_path / ".hypothesis").exists(), "Hypothesis wrote into the working directory"


def test_measure_tolerance_measures_a_lossy_target(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from kvverify.commands.measure_tolerance import main as measure

    monkeypatch.syspath_prepend(str(TESTS))
    assert measure(["--target", "targets.declared:lossy", "--cases", "5"]) == 0
    out = capsys.readouterr().out
    assert "largest difference" in out and "declared lossy_atol 1.0" in out, out


def test_measure_tolerance_is_a_subcommand(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    assert main(["measure-tolerance", "--target", "targets.declared:lossy", "--cases", "3"]) == 0
    assert "declared lossy_atol 1.0" in capsys.readouterr().out
    assert main(["measure-tolerance", "--target", "no_such_module:factory", "--cases", "3"]) == 2
    assert "kvverify measure-tolerance: target 'no_such_module:factory'" in capsys.readouterr().err


def test_measure_tolerance_draws_only_the_dtypes_asked_for_with_percentiles(capsys: pytest.CaptureFixture[str]) -> None:
    from kvverify.commands.measure_tolerance import main as measure

    assert measure(["--dtype", "bfloat16", "--cases", "12", "--backend", "math"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "bfloat16: max abs difference" in lines[0], lines
    assert "over 12 cases (99% at or under" in lines[0] and "99.9%" in lines[0], lines
