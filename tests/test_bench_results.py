"""The committed benchmark results, the README's tables made from them, and the bench harness
(peer rows, collect mode, plots) that `rlkern bench` runs."""

import glob
import json
import os

import torch

from rlkern.benches import bench_logprobs, common, plot, readme, suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = sorted(glob.glob(os.path.join(ROOT, "benches", "results", "*", "*.json")))


def test_readme_tables_are_the_committed_results():
    """Every results file is shown in the README, and every README table is its JSON rendered
    (`python -m rlkern.benches.readme` rewrites them; edit a number in either and this fails)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    names = readme.blocks(text)
    assert sorted(names) == sorted(os.path.relpath(p, readme.RESULTS)[:-5] for p in RESULTS)
    assert readme.generate(text) == text, "README tables differ from benches/results: python -m rlkern.benches.readme"
    assert readme.main(["--check"]) == 0


def test_markdown_results_are_their_json():
    for path in RESULTS:
        with open(path) as f:
            results = json.load(f)
        with open(path[:-5] + ".md") as f:
            assert f.read() == common.render(results), path
        assert results["device"] and results["command"].startswith("python -m rlkern.benches.bench_")


def test_readme_check_fails_on_a_changed_number(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    first = common.rows_of(readme.load(readme.blocks(text)[0]))[0]
    changed = text.replace(f"| {first.median_ms:.3f} |", f"| {first.median_ms + 1:.3f} |", 1)
    assert changed != text
    (tmp_path / "README.md").write_text(changed)
    assert readme.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1


def test_plot_of_committed_results(tmp_path):
    by_family = {}
    for path in RESULTS:
        name = os.path.basename(path)[:-5]
        family = next(f for f in sorted(suite.FAMILIES, key=len, reverse=True) if name.startswith(f))
        by_family.setdefault(family, []).append((name, common.rows_of(json.load(open(path)))))
    assert set(by_family) == set(suite.FAMILIES)
    for family, results in by_family.items():
        assert plot.speedups(family, results), family  # every family has a peer that ran
        path = plot.plot_family(family, results, str(tmp_path / f"{family}.png"), "test")
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_missing_or_broken_peer_gets_a_row_with_the_reason(monkeypatch):
    real_peer = common.peer

    def peer(module):
        if module == "trl.trainer.utils":
            return real_peer("trl.trainer.no_such_module_for_this_test")
        return real_peer(module)

    monkeypatch.setattr(common, "peer", peer)
    monkeypatch.setattr(common, "BROKEN_PEERS", {})
    rows = bench_logprobs.run(torch.device("cpu"), 33, 1001, torch.float32, rounds=1)
    trl = [r for r in rows if r.impl == "trl"]
    assert len(trl) == 3  # one per bench of the table
    assert all(r.median_ms is None and "no_such_module_for_this_test" in r.extra["not run"] for r in trl)
    assert "trl.trainer.no_such_module_for_this_test" in common.BROKEN_PEERS  # trl is installed: broken, not absent
    liger = [r for r in rows if r.impl == "liger"]
    assert [r.bench for r in liger] == ["logprobs fwd"] and liger[0].extra["not run"] == common.NEEDS_CUDA
    table = common.markdown_table(rows)
    assert "| trl | N=33 V=1001 float32 | not run: ModuleNotFoundError" in table
    assert common.peer("no_such_peer_package")[1] == "not installed (no_such_peer_package)"
    assert "no_such_peer_package" not in common.BROKEN_PEERS


def test_collect_mode_records_the_cases_without_timing():
    with common.collect() as cases:
        rows = bench_logprobs.run(torch.device("cpu"), 17, 301, torch.float32, rounds=3)
    impls = {(label, impl) for label, impl, _ in cases}
    assert ("logprobs fwd N=17 V=301 float32", "rlkern") in impls and len(impls) == len(cases) >= 6
    for _, _, fn in cases:
        fn()
    assert all(r.median_ms in (None, 1.0) for r in rows)
