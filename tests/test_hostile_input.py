"""Hostile input, each answered with a clear error that names the cause: unusable profile targets, malformed
model configs, report folders that fail midway or are reused, caches of another model handed to the reference
model, a garbage KVVERIFY_CACHE in an unrelated pytest run, and the seed of an xdist run."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kvverify import ConfigError, ModelConfig
from kvverify.caches import ContiguousCache, PagedCache, SlidingWindowCache, StaticCache
from kvverify.cli import main
from kvverify.profiling import runner
from kvverify.profiling.folder import MANIFEST
from kvverify.profiling.report import write_report
from kvverify.profiling.results import CacheRow, Profile
from kvverify.reference.inputs import InputError
from kvverify.reference.model import ReferenceModel

pytestmark = pytest.mark.slow  # pytest sessions and verify runs on garbage input: 45 s of CPU

pytest_plugins = ["pytester"]

TARGETS = Path(__file__).parent / "targets"

# --- kvverify profile --target: refused before anything is measured ------------------------------------------------


@pytest.mark.parametrize(
    ("target", "cause"),
    [
        ("targets.unusable:raises", "raised RuntimeError: no GPU found"),
        ("targets.unusable:returns_none", "the factory returned None"),
        ("targets.broken_import:make", "could not be imported (ModuleNotFoundError"),
        ("targets.unusable:returns_no_update", "with no callable update"),
    ],
)
def test_profile_refuses_an_unusable_target_up_front(
    target: str, cause: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: Any, **kwargs: Any) -> Profile:
        raise AssertionError("measuring started with an unusable target")

    monkeypatch.setattr(runner, "run_profile", never)
    out = tmp_path / "report"
    code = main(["profile", "--quick", "--no-transformers", "--out", str(out), "--target", target])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"kvverify profile: target {target!r}" in err and cause in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing is written for a refused target"


# --- ModelConfig: every field checked, the error names the field, what came and what is expected -------------------


@pytest.mark.parametrize(
    ("changes", "field", "got", "expected"),
    [
        ({"dtype": torch.int8}, "dtype", "torch.int8", "a floating torch.dtype"),
        ({"dtype": torch.bool}, "dtype", "torch.bool", "a floating torch.dtype"),
        ({"dtype": float}, "dtype", "<class 'float'> (type)", "a floating torch.dtype"),
        ({"dtype": "float8"}, "dtype", "'float8' (str)", "a floating torch.dtype"),
        ({"sliding_window": True}, "sliding_window", "True (bool)", "None or an int >= 1"),
        ({"sliding_window": 4.0}, "sliding_window", "4.0 (float)", "None or an int >= 1"),
        ({"rope_theta": "big"}, "rope_theta", "'big' (str)", "a positive, finite number"),
        ({"rope_theta": float("nan")}, "rope_theta", "nan (float)", "a positive, finite number"),
        ({"rope_theta": float("inf")}, "rope_theta", "inf (float)", "a positive, finite number"),
        ({"rope_theta": True}, "rope_theta", "True (bool)", "a positive, finite number"),
        ({"norm_eps": "1e-5"}, "norm_eps", "'1e-5' (str)", "a positive, finite number"),
        ({"norm_eps": 0.0}, "norm_eps", "0.0 (float)", "a positive, finite number"),
        ({"vocab_size": "64"}, "vocab_size", "'64' (str)", "a positive int"),
        ({"d_model": True}, "d_model", "True (bool)", "a positive int"),
        ({"n_layers": -1}, "n_layers", "-1 (int)", "a positive int"),
        ({"n_heads": 0}, "n_heads", "0 (int)", "a positive int"),
        ({"max_seq_len": 128.0}, "max_seq_len", "128.0 (float)", "a positive int"),
        ({"max_batch_size": False}, "max_batch_size", "False (bool)", "a positive int"),
        ({"n_kv_heads": False}, "n_kv_heads", "False (bool)", "a positive int, or 0 to derive it"),
        ({"n_kv_heads": -2}, "n_kv_heads", "-2 (int)", "a positive int, or 0 to derive it"),
        ({"head_dim": 8.0}, "head_dim", "8.0 (float)", "a positive int, or 0 to derive it"),
        ({"d_ff": True}, "d_ff", "True (bool)", "a positive int, or 0 to derive it"),
        ({"norm": ["rms"]}, "norm", "['rms'] (list)", "one of ('rms', 'layer')"),
        ({"positional": None}, "positional", "None (NoneType)", "one of ('rope'"),
        ({"numerics": 1}, "numerics", "1 (int)", "one of ('strict', 'fast')"),
        ({"device": 0}, "device", "0 (int)", "a torch device name"),
        ({"device": "gpu"}, "device", "'gpu' (str)", "a torch device name"),
    ],
)
def test_a_malformed_config_field_is_a_config_error_naming_it(
    changes: dict[str, object], field: str, got: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        ModelConfig(**changes)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith(f"ModelConfig.{field} must be "), message
    assert expected in message and f"got {got}" in message, message


def test_well_formed_configs_still_build() -> None:
    config = ModelConfig(dtype="torch.float16", device=torch.device("cpu"), rope_theta=500_000, sliding_window=4)
    assert (config.dtype, config.device, config.rope_theta) == (torch.float16, "cpu", 500_000)
    assert ModelConfig(n_kv_heads=0, head_dim=0, d_ff=0).n_kv_heads == 4


# --- the report folder: written next to --out and moved into place -------------------------------------------------


def _profile(*presets: str, snapshot: bool = False) -> Profile:
    row = CacheRow(preset="tiny", cache="contiguous", layout=None, window=None, length=8, prefill_s=1e-3,
                   cached_step_s=2e-3, uncached_step_s=4e-3, held_bytes=1024, formula_bytes=1024,
                   predicted_bytes=None, memray_peak_bytes=-1, churn_bytes=-1, churn_count=0, flops_cached=10,
                   flops_uncached=20, uncached_peak_estimate_bytes=30)
    profile = Profile(environment={"threads": 1}, rows=[dataclasses.replace(row, preset=p) for p in presets])
    if snapshot:
        profile.cuda = {"snapshot": "cuda_snapshot.pickle"}
    return profile


def _siblings(out: Path) -> list[str]:
    """Temporary folders left next to ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_second_report_replaces_the_first_and_touches_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(_profile("tiny", "bench"), out)
    assert (out / "memory_bench.png").is_file() and (out / MANIFEST).is_file()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "memory_mine.png").write_bytes(b"mine")  # looks like a figure, but no report wrote it
    first_json = (out / "results.json").read_text(encoding="utf-8")
    write_report(_profile("tiny"), out)
    names = {p.name for p in out.iterdir()}
    assert not any(name.endswith("_bench.png") for name in names), "stale plots of the earlier run are removed"
    assert {"memory_tiny.png", "report.html", "report.md", "results.json"} <= names
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "memory_mine.png").read_bytes() == b"mine"
    assert (out / "results.json").read_text(encoding="utf-8") != first_json
    assert _siblings(out) == []


def test_a_folder_from_before_the_manifest_loses_only_report_files(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    for name in ("speedup_bench.png", "cuda_snapshot.pickle", "report.md", "data.csv"):
        (out / name).write_text("old", encoding="utf-8")
    write_report(_profile("tiny"), out)
    names = {p.name for p in out.iterdir()}
    assert "speedup_bench.png" not in names and "cuda_snapshot.pickle" not in names
    assert (out / "data.csv").read_text(encoding="utf-8") == "old"
    assert (out / "report.md").read_text(encoding="utf-8") != "old"


def test_the_snapshot_the_profile_names_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "cuda_snapshot.pickle").write_bytes(b"snapshot")  # written by run_profile(out_dir=out)
    write_report(_profile("tiny", snapshot=True), out)
    assert (out / "cuda_snapshot.pickle").read_bytes() == b"snapshot"
    assert "cuda_snapshot.pickle" in json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]


@pytest.mark.parametrize("where", ["measuring", "rendering"])
def test_a_profile_that_fails_midway_leaves_the_folder_as_it_was(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    write_report(_profile("tiny", "bench"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def measure(plan: Any, specs: Any, progress: Any, out_dir: Path | None = None) -> Profile:
        assert out_dir is not None and out_dir != out, "measured into a temporary folder"
        (out_dir / "cuda_snapshot.pickle").write_bytes(b"half")
        if where == "measuring":
            raise RuntimeError("cache exploded at length 512")
        return _profile("tiny")

    def render(*args: Any) -> str:
        raise RuntimeError("template broke")

    monkeypatch.setattr(runner, "run_profile", measure)
    if where == "rendering":
        monkeypatch.setattr("kvverify.profiling.report.html_page", render)
    code = main(["profile", "--quick", "--no-transformers", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    cause = "cache exploded at length 512" if where == "measuring" else "template broke"
    assert f"the profile failed midway (RuntimeError: {cause}" in err and f"{out} was left as it was" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == []


def test_a_profile_into_a_new_folder_moves_it_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deep" / "report"
    monkeypatch.setattr(runner, "run_profile", lambda *args, **kwargs: _profile("tiny"))
    assert main(["profile", "--quick", "--no-transformers", "--out", str(out)]) == 0
    assert {"report.html", "report.md", "results.json", "memory_tiny.png"} <= {p.name for p in out.iterdir()}
    assert f"wrote 8 files to {out}" in capsys.readouterr().out
    assert _siblings(out) == []


def test_an_out_that_is_a_file_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    out.write_text("not a folder", encoding="utf-8")
    assert main(["profile", "--quick", "--no-transformers", "--out", str(out)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "not a folder"


# --- the reference model given a cache it cannot use --------------------------------------------------------------

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(TINY)


def _filled(config: ModelConfig, tokens: int = 4) -> ContiguousCache:
    cache = ContiguousCache()
    ReferenceModel(config)(torch.randint(0, 100, (1, tokens)), cache=cache)
    return cache


PROMPT = torch.arange(6).view(1, 6)


def test_generate_refuses_a_cache_holding_more_tokens_than_the_prompt(model: ReferenceModel) -> None:
    cache = model.generate(PROMPT, 3).cache  # holds 8 tokens
    assert cache is not None
    with pytest.raises(InputError, match="the cache holds 8 tokens but the prompt has 6"):
        model.generate(PROMPT, 2, cache=cache)


@pytest.mark.parametrize("start", [0, 3, 7])
def test_forward_refuses_a_start_the_cache_does_not_hold(model: ReferenceModel, start: int) -> None:
    cache = _filled(TINY, tokens=6)
    with pytest.raises(InputError, match=rf"the cache holds 6 tokens but forward\(\) was asked .* start={start}"):
        model(PROMPT[:, :2], cache=cache, start=start)


@pytest.mark.parametrize(
    ("other", "by_generate", "by_forward"),
    [
        (TINY.replace(n_layers=3), r"holds 4 tokens in layer 2, but the model has n_layers=2",
         r"the cache holds 3 layers but the model has n_layers=2"),
        (TINY.replace(n_layers=1), r"holds 4 tokens in layer 0 but 0 in layer 1; the model \(n_layers=2\)",
         r"the cache holds 1 layer but the model has n_layers=2"),
        (TINY.replace(n_kv_heads=1), r"keys of shape \(1, 1, 4, 8\), but the model expects \(batch, n_kv_heads=2",
         None),
        (TINY.replace(head_dim=16), r"keys of shape \(1, 2, 4, 16\), but the model expects .* head_dim=8\)", None),
        (TINY.replace(dtype=torch.float64), r"keys of dtype torch.float64, but the model computes in torch.float32",
         None),
    ],
)
def test_a_cache_filled_by_another_model_is_refused(
    model: ReferenceModel, other: ModelConfig, by_generate: str, by_forward: str | None
) -> None:
    cache = _filled(other)
    with pytest.raises(InputError, match=by_generate):
        model.generate(PROMPT, 2, cache=cache)
    with pytest.raises(InputError, match=by_forward or by_generate):
        model(PROMPT[:, 4:], cache=cache, start=4)
    assert cache.get_seq_length() == 4, "nothing was written"


@pytest.mark.parametrize(
    ("factory", "other", "message"),
    [
        (StaticCache.from_config, TINY.replace(n_layers=1), r"the cache holds 1 layer but the model has n_layers=2"),
        (StaticCache.from_config, TINY.replace(n_kv_heads=1), r"keys of shape \(8, 1, 128, 8\)"),
        (PagedCache.from_config, TINY.replace(dtype=torch.float16), r"keys of dtype torch.float16"),
        (StaticCache.from_config, TINY.replace(device="meta"), r"keys on meta, but the model is on cpu"),
    ],
)
def test_an_empty_cache_built_for_another_config_is_refused(
    model: ReferenceModel, factory: Any, other: ModelConfig, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        model.generate(PROMPT, 2, cache=factory(other))
    with pytest.raises(InputError, match=message):
        model(PROMPT, cache=factory(other))


class _Opaque:
    """A cache kvverify cannot look into, built for another model: caught on what update() returns."""

    def __init__(self, config: ModelConfig) -> None:
        self.inner, self.config = ContiguousCache(), config

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: Any = None) -> Any:
        shape = (k.shape[0], self.config.n_kv_heads, k.shape[2], self.config.head_dim)
        return self.inner.update(k.new_zeros(shape, dtype=self.config.dtype), v.new_zeros(shape), layer_idx, kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (TINY.replace(n_kv_heads=3, n_heads=3, d_model=24),
         r"update\(\) returned for layer 0 keys of shape \(1, 3, 6, 8\)"),
        (TINY.replace(head_dim=16), r"update\(\) returned for layer 0 keys of shape \(1, 2, 6, 16\)"),
        (TINY.replace(dtype=torch.float64), r"update\(\) returned for layer 0 keys of dtype torch.float64"),
    ],
)
def test_an_opaque_cache_of_another_model_is_caught_on_what_update_returns(
    model: ReferenceModel, other: ModelConfig, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        model(PROMPT, cache=_Opaque(other))  # type: ignore[arg-type]


def test_matching_caches_still_work(model: ReferenceModel) -> None:
    for factory in (ContiguousCache.from_config, StaticCache.from_config, PagedCache.from_config):
        first = model.generate(PROMPT[:, :4], 2, cache=factory(TINY))
        again = model.generate(first.sequences, 2, cache=first.cache)
        assert again.tokens.shape == (1, 2)
    windowed = ReferenceModel(TINY.replace(sliding_window=3))
    cache = SlidingWindowCache.from_config(windowed.config)
    windowed.generate(PROMPT, 4, cache=cache)


# --- the pytest plugin: a garbage KVVERIFY_CACHE, and the seed of an xdist run -------------------------------------


@pytest.fixture
def here(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(TARGETS, pytester.path / "targets")
    pytester.makepyfile(test_unrelated="def test_one():\n    assert 1 + 1 == 2\n")
    return pytester


@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        ("garbage", "or MODULE:FACTORY"),
        ("targets.unusable:raises", "raised RuntimeError: no GPU found"),
        ("no_such_module_xyz:make", "could not be imported"),
    ],
)
def test_a_garbage_kvverify_cache_errors_the_kv_items_and_runs_the_rest(
    here: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, spec: str, cause: str
) -> None:
    monkeypatch.setenv("KVVERIFY_CACHE", spec)
    here.makepyfile(test_fixture="def test_uses_the_target(kv_target):\n    pass\n")
    result = here.runpytest_subprocess("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("errors", outcomes.get("error")) >= 2, result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ERROR at setup of test_uses_the_target*"])
    result.stdout.fnmatch_lines([f"*ERROR at setup of kvverify[[]{spec}]::cached_equals_uncached*"])
    text = result.stdout.str()
    assert cause in text and f"(the target comes from KVVERIFY_CACHE={spec})" in text
    assert "INTERNALERROR" not in text and "Traceback" not in text


def test_a_garbage_kv_cache_option_is_still_a_usage_error(here: pytest.Pytester) -> None:
    result = here.runpytest_subprocess("-p", "no:cacheprovider", "--kv-cache=garbage")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "or MODULE:FACTORY" in result.stderr.str()


def test_every_xdist_worker_runs_the_seed_of_the_header(here: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    here.makepyfile(test_seeds="""
        import os, time, pytest

        @pytest.mark.parametrize("i", range(8))
        def test_seed(request, i):
            seed = request.config.pluginmanager.get_plugin("kvverify-target").seed
            worker = os.environ.get("PYTEST_XDIST_WORKER", "none")
            with open(f"seed-{worker}-{i}.txt", "w") as f:
                f.write(str(seed))
            time.sleep(0.3)
    """)
    result = here.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--kv-cache=targets.plain_cache:make_cache",
                                       "-k", "test_seed", "--kv-max-examples=1")
    assert result.ret == 0, result.stdout.str()
    header = re.search(r"kvverify: target targets.plain_cache:make_cache, profile ci, seed (\d+)", result.stdout.str())
    assert header is not None, result.stdout.str()
    seeds = {p.name.split("-")[1]: p.read_text() for p in here.path.glob("seed-*.txt")}
    assert set(seeds) == {"gw0", "gw1"}, "both workers ran"
    assert set(seeds.values()) == {header.group(1)}
