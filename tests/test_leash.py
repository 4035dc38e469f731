"""Invisible-Leash evaluation math against brute force and hand-computed values."""

import csv
import io
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fused_rlvr.leash import (
    answer_entropy,
    avg_at_n,
    default_ks,
    leash_metrics,
    leash_report,
    pass_at_k,
    pass_at_k_curve,
    peso,
    plot_pass_at_k,
    rows_to_csv,
    rows_to_markdown,
    summary_rows,
    write_report,
)


def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


@given(st.integers(1, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_property_brute_force(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_vectorised_and_exact_for_large_n():
    c = np.array([0, 1, 5, 100, 1023, 1024])
    got = pass_at_k(1024, c, 16)
    want = [1 - math.comb(1024 - ci, 16) / math.comb(1024, 16) for ci in c]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got.shape == (6,)
    # per-problem n
    got = pass_at_k([4, 8, 8], [1, 1, 8], 2)
    np.testing.assert_allclose(got, [0.5, 0.25, 1.0], rtol=1e-12)
    # pass@1 is c / n, pass@n is 1[c > 0]
    np.testing.assert_allclose(pass_at_k(10, np.arange(11), 1), np.arange(11) / 10)
    np.testing.assert_array_equal(pass_at_k(10, np.arange(11), 10), (np.arange(11) > 0).astype(float))
    assert isinstance(pass_at_k(5, 2, 2), float)


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((4, 2, 5), ValueError, "k must be <= n"),
        ((4, 5, 2), ValueError, "c must be <= n"),
        ((4, -1, 2), ValueError, "c must be >= 0"),
        ((-4, 0, 2), ValueError, "n must be >= 0"),
        ((4, 2, 0), ValueError, "k must be an int >= 1"),
        ((4, 2, 1.5), TypeError, "k must be an int"),
        ((4, 2.5, 1), ValueError, "c must hold whole numbers"),
        ((4, [True], 1), TypeError, "c must hold integers"),
    ],
)
def test_pass_at_k_errors_name_the_argument(args, exc, words):
    with pytest.raises(exc, match=words):
        pass_at_k(*args)


def test_curve_and_avg_at_n():
    counts = [0, 1, 4]
    curve = pass_at_k_curve(counts, 4, ks=[1, 2, 4])
    assert curve[1] == pytest.approx((0 + 0.25 + 1.0) / 3)
    assert curve[2] == pytest.approx((0 + 0.5 + 1.0) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    assert list(pass_at_k_curve(counts, 4)) == [1, 2, 4]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert default_ks(1) == [1]
    assert avg_at_n(counts, 4) == pytest.approx(5 / 12)
    assert avg_at_n(counts, 4) == pytest.approx(curve[1])


def test_answer_entropy_hand_computed():
    assert answer_entropy(["4", "4", "4"]) == 0.0
    assert answer_entropy(["4", "5"]) == pytest.approx(math.log(2))
    # p = (2/4, 1/4, 1/4)
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert answer_entropy(["a", "b", "a", "c"]) == pytest.approx(want)
    # None handling: one bucket, dropped, or each its own answer
    ans = ["a", None, "a", None]
    assert answer_entropy(ans) == pytest.approx(math.log(2))
    assert answer_entropy(ans, none="drop") == 0.0
    assert answer_entropy(ans, none="distinct") == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    )
    assert answer_entropy([None, None]) == 0.0
    assert answer_entropy([None, None], none="distinct") == pytest.approx(math.log(2))
    assert answer_entropy([]) == 0.0
    assert answer_entropy([None], none="drop") == 0.0


@given(st.lists(st.sampled_from(["a", "b", "c", "d", None]), max_size=30), st.randoms())
def test_answer_entropy_bounds_and_permutation(answers, rnd):
    h = answer_entropy(answers)
    distinct = len(set(answers))
    assert -1e-12 <= h <= math.log(max(distinct, 1)) + 1e-12
    shuffled = list(answers)
    rnd.shuffle(shuffled)
    assert answer_entropy(shuffled) == pytest.approx(h, abs=1e-12)


def test_answer_entropy_errors():
    with pytest.raises(ValueError, match="none must be one of"):
        answer_entropy(["a"], none="skip")
    with pytest.raises(TypeError, match=r"answers\[1\] must be a str or None"):
        answer_entropy(["a", 3])
    with pytest.raises(TypeError, match="not a single string"):
        answer_entropy("abc")


# hand-built case: 8 problems
BASE = [1, 1, 1, 0, 0, 1, 0, 0]
TRAINED = [1, 1, 0, 1, 0, 1, 1, 1]
# labels:  P  P  S  E  O  P  E  E  -> P=3, E=3, S=1, O=1


def test_peso_counts_and_labels():
    split = peso(np.array(BASE, dtype=bool), TRAINED)
    assert (split.P, split.E, split.S, split.O) == (3, 3, 1, 1)
    assert split.labels == ["P", "P", "S", "E", "O", "P", "E", "E"]
    with pytest.raises(ValueError, match="same length"):
        peso([True], [True, False])
    with pytest.raises(TypeError, match="base_solved must be booleans"):
        peso([2, 0], [1, 0])


def test_leash_metrics_hand_computed():
    m = leash_metrics(peso(BASE, TRAINED))
    srr, ndr = 3 / 4, 3 / 6
    assert m["SRR"] == pytest.approx(srr)
    assert m["NDR"] == pytest.approx(ndr)
    assert m["SDS"] == pytest.approx(2 * srr * ndr / (srr + ndr))  # 0.6
    assert m["SDS"] == pytest.approx(0.6)
    assert m["NSCR"] == pytest.approx((3 - 1) / (3 + 3 + 1))
    assert leash_metrics({"P": 3, "E": 3, "S": 1, "O": 9}) == m


def test_leash_metrics_zero_denominators_are_nan():
    m = leash_metrics({"P": 0, "E": 0, "S": 0, "O": 5})  # nothing solved by anyone
    assert all(math.isnan(v) for v in m.values())
    m = leash_metrics({"P": 0, "E": 2, "S": 0, "O": 1})  # base solved nothing: SRR undefined
    assert math.isnan(m["SRR"]) and m["NDR"] == 1.0 and math.isnan(m["SDS"]) and m["NSCR"] == 1.0
    m = leash_metrics({"P": 0, "E": 2, "S": 3, "O": 0})  # SRR = NDR... = 0 and 1
    assert m["SRR"] == 0.0 and m["NDR"] == 1.0 and m["SDS"] == 0.0 and m["NSCR"] == pytest.approx(-1 / 5)
    with pytest.raises(KeyError, match="counts must hold P, E and S"):
        leash_metrics({"P": 1, "E": 1})
    with pytest.raises(ValueError, match=r"counts\['S'\] must be an int >= 0"):
        leash_metrics({"P": 1, "E": 1, "S": -1})


def _report():
    ids = ["p0", "p1", "p|2"]
    return leash_report(
        ids,
        [0, 2, 4],
        [1, 4, 0],
        n_base=4,
        ks=[1, 2],
        base_answers=[["1", "2", None, None], ["3", "3", "4", "4"], ["5"] * 4],
        trained_answers=[["1"] * 4, ["3"] * 4, [None] * 4],
    )


def test_leash_report_rows_and_summary():
    rows, summary, curves = _report()
    assert rows[0] == {
        "problem": "p0",
        "base_correct": 0,
        "base_n": 4,
        "trained_correct": 1,
        "trained_n": 4,
        "base_pass@1": 0.0,
        "base_pass@2": 0.0,
        "trained_pass@1": 0.25,
        "trained_pass@2": 0.5,
        # answers 1, 2, None, None: p = (1/4, 1/4, 2/4) with the None bucket
        "base_answer_entropy": pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))),
        "trained_answer_entropy": 0.0,
        "peso": "E",
    }
    assert [r["peso"] for r in rows] == ["E", "P", "S"]
    assert rows[1]["base_pass@2"] == pytest.approx(1 - 1 / 6)
    assert summary["P"] == 1 and summary["E"] == 1 and summary["S"] == 1 and summary["O"] == 0
    assert summary["SRR"] == 0.5 and summary["NDR"] == 0.5 and summary["SDS"] == 0.5
    assert summary["NSCR"] == 0.0
    assert summary["base_avg@n"] == pytest.approx(0.5)
    assert summary["trained_avg@n"] == pytest.approx(5 / 12)
    assert curves["base"][2] == pytest.approx((0 + 5 / 6 + 1) / 3)
    assert summary["base_pass@2"] == curves["base"][2]
    assert summary["trained_answer_entropy_mean"] == 0.0


def test_csv_and_markdown_content():
    rows, summary, _ = _report()
    text = rows_to_csv(rows)
    lines = text.splitlines()
    assert lines[0] == (
        "problem,base_correct,base_n,trained_correct,trained_n,base_pass@1,base_pass@2,"
        "trained_pass@1,trained_pass@2,base_answer_entropy,trained_answer_entropy,peso"
    )
    assert lines[2] == "p1,2,4,4,4,0.5,0.833333,1,1,0.693147,0,P"
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert parsed[2]["problem"] == "p|2" and parsed[2]["peso"] == "S"
    assert len(lines) == 4 and text.endswith("\n")

    md = rows_to_markdown(rows).splitlines()
    assert md[0].startswith("| problem | base_correct |") and md[0].endswith("| peso |")
    assert md[1] == "|" + "|".join([" --- "] * 12) + "|"
    assert md[3] == "| p1 | 2 | 4 | 4 | 4 | 0.5 | 0.833333 | 1 | 1 | 0.693147 | 0 | P |"
    assert md[4].startswith("| p\\|2 |")

    srows = summary_rows({"P": 3, "SRR": 0.75, "NDR": float("nan")})
    assert rows_to_csv(srows) == "metric,value\nP,3\nSRR,0.75\nNDR,nan\n"
    assert rows_to_markdown(srows) == (
        "| metric | value |\n| --- | --- |\n| P | 3 |\n| SRR | 0.75 |\n| NDR | nan |\n"
    )
    with pytest.raises(ValueError, match="rows must not be empty"):
        rows_to_csv([])
    with pytest.raises(ValueError, match=r"rows\[1\] has columns"):
        rows_to_csv([{"a": 1}, {"b": 2}])


def test_write_report_files(tmp_path):
    report = _report()
    paths = write_report(report, str(tmp_path), plot=False)
    assert sorted(paths) == ["per_problem.csv", "per_problem.md", "summary.csv", "summary.md"]
    assert (tmp_path / "per_problem.csv").read_text() == rows_to_csv(report.rows)
    summary_csv = (tmp_path / "summary.csv").read_text()
    assert "SRR,0.5\n" in summary_csv and summary_csv.startswith("metric,value\nproblems,3\nP,1\n")
    assert (tmp_path / "summary.md").read_text() == rows_to_markdown(summary_rows(report.summary))


def test_plot_pass_at_k_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_pass_at_k(
        {"base": {1: 0.2, 2: 0.3, 4: 0.4}, "trained": {1: 0.3, 2: 0.35, 4: 0.38}},
        str(tmp_path / "curve.png"),
        title="t",
    )
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    paths = write_report(_report(), str(tmp_path / "r"))
    assert open(paths["pass_at_k.png"], "rb").read()[:4] == b"\x89PNG"
