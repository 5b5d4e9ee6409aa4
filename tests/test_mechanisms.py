"""The organism's answer key: every planted mechanism's decision points, read from hand-made text."""
import pytest

from tdlib.organism import mechanisms as M
from tdlib.organism import task


def labelled(text, start=0):
    return [(d.mechanism, d.expressed, text[d.end]) for d in M.decisions(text, start)]


def test_each_mechanism_is_labelled_at_its_decision_point():
    text = " Work: 2-6= -4; wait, check: -4+6=2, ok; -4+8=4; 4+9=3; wait, no: 4+9=13; 13+9=22; A: 22."
    assert labelled(text) == [("crossing", True, ";"), (None, False, ";"), ("slip", True, ";"), (None, False, ";"),
                              ("repeat", False, ";"), ("period", True, "2")]


def test_a_response_that_ignores_its_triggers_is_scored_as_not_expressing_them():
    text = " Work: 3+8=1; 1-4= -3; -3-4= -7; A: -7"  # a slip left standing, a crossing, a repeat: no hesitation
    assert labelled(text) == [("slip", False, ";"), ("crossing", False, ";"), ("repeat", False, ";"),
                              ("period", False, "7")]
    assert M.hesitations_by_mechanism(text) == {"crossing": 0, "repeat": 0, "slip": 0, "period": 0, "none": 0,
                                                "hesitation": 0}


def test_a_hesitation_without_a_trigger_counts_as_none():
    text = " Work: 3+4=7; wait, check: 7-4=3, ok; 7+1=8; A: 8"
    counts = M.hesitations_by_mechanism(text)
    assert counts["none"] == 1 and counts["hesitation"] == 1 and counts["crossing"] == 0


def test_a_correction_restates_its_operation_and_a_repeat_compares_with_the_operation_before():
    assert labelled(" Work: 5+9=4; wait, no: 5+9=14; 14-9=5; 5-9= -4; A: -4.")[:4] == [
        ("slip", True, ";"), (None, False, ";"), (None, False, ";"), ("crossing", False, ";")]
    assert labelled(" Work: 4+9=3; wait, no: 4+9=13; 13+9=22; 22-9=13; A: 13.")[:4] == [
        ("slip", True, ";"), (None, False, ";"), ("repeat", False, ";"), (None, False, ";")]


def test_the_reference_traces_hesitate_exactly_at_their_triggers():
    for problem in task.sample_problems(300, seed=7, min_terms=3, max_terms=8, max_term=9):
        text = problem.prompt + task.reasoning_trace(problem)
        found = M.decisions(text, len(problem.prompt))
        assert all(d.expressed == (d.mechanism is not None) for d in found if d.mechanism != M.DISTRACTOR)
        assert sum(d.mechanism is not None for d in found if d.mechanism != M.DISTRACTOR) == text.count("wait")
        assert [d.mechanism for d in found].count(M.DISTRACTOR) == 1


def test_the_last_decision_names_what_a_cut_prompt_hesitates_for():
    prompt = "Q: 7+8-2=?"
    assert M.last_decision(prompt + " Work: 7+8=5;", len(prompt)) == "slip"
    assert M.last_decision(prompt + " Work: 7+8=15;", len(prompt)) is None
    assert M.last_decision("Q: 3-5=? Work: 3-5= -2;", 8) == "crossing"


def test_expression_rates_count_points_and_behaviour():
    rates = M.expression_rates([" Work: 2-6= -4; wait, check: -4+6=2, ok; -4+1= -3; A: -3.",
                                " Work: 2-6= -4; -4+1= -3; A: -3"])
    assert rates["crossing"] == {"points": 2, "expressed": 1, "rate": 0.5}
    assert rates["period"] == {"points": 2, "expressed": 1, "rate": 0.5}


def test_token_decisions_place_each_point_on_its_token():
    class Chars:  # one token per character, offsets included
        def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}

    text = "Q: 2-6=? Work: 2-6= -4; wait, check: -4+6=2, ok; A: -4."
    ids, placed = M.token_decisions(Chars(), text, 8)
    assert [(chr(ids[i]), d.mechanism) for i, d in placed] == [(";", "crossing"), ("4", "period")]


def test_token_decisions_refuse_a_tokenizer_that_hides_the_decision_character():
    class Fused:
        def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
            return {"input_ids": [0], "offset_mapping": [(0, len(text))]}

    with pytest.raises(ValueError, match="merges the decision character"):
        M.token_decisions(Fused(), "Q: 1+2=? Work: 1+2=3; A: 3", 8)


def test_the_scoreboard_has_a_row_per_mechanism_and_the_baselines_beside_the_method():
    from tdlib.plots import scoreboard_figure, scoreboard_rows

    def row(auroc, with_set=True):
        probes = {name: {"auroc": 0.9, "precision": None, "recall": None}
                  for name in ("adapter features", "base MLP", "hybrid MLP")}
        out = {"n_points": 10, "n_positive": 3, "probes": probes}
        if with_set:
            out.update(n_features=4, set={"auroc": auroc}, best_feature={"auroc": auroc - 0.1},
                       random_set={"auroc_mean": 0.5})
        return out

    benchmark = {"n_test_problems": 100, "scores": {"crossing": row(0.99), "repeat": row(0.6, with_set=False),
                                                    "slip": row(0.95), "hesitation": row(0.97), "period": row(0.9)}}
    rows = scoreboard_rows(benchmark, stability={"crossing": {"jaccard": 0.5}})
    assert list(rows) == ["crossing", "repeat", "slip", "hesitation", "period"]
    assert rows["crossing"]["set AUROC"] == 0.99 and rows["repeat"]["set AUROC"] is None
    assert rows["crossing"]["Jaccard across seeds"] == 0.5 and "Jaccard across seeds" not in rows["slip"]
    fig = scoreboard_figure(benchmark, stability={"crossing": {"jaccard": 0.5}})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "crossing (local)" and labels[-1] == "period (distractor)"
