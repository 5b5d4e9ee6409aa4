"""The write-up builder: every number in the built markdown traces back to a results value (or the paper's
reported values), missing results render as "not run yet", and the real template builds."""
import json
from pathlib import Path

import pytest

from tdlib.paper import (NOT_RUN, Sources, build, format_specs, numeric_values, prose_numbers, render,
                         untraced_numbers)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "paper" / "template.md"
PAPER_VALUES = ROOT / "paper" / "paper_values.json"

FAKE = {
    "00_pair": {"config": "organism", "n_params": 1020160, "n_problems": 500,
                    "base": {"accuracy": 0.561, "mean_response_tokens": 4.43, "wait_rate": 0.0},
                    "target": {"accuracy": 0.964, "mean_response_tokens": 55.65, "wait_rate": 0.49},
                    "hybrid": {"accuracy": 0.012, "mean_response_tokens": 35.47, "wait_rate": 0.0}},
    "01_train": {"config": "organism", "analysis_model": "adapter_l1_0.001", "models": {
        "adapter_l1_0.01": {"kind": "adapter", "l1_weight": 0.01, "l0": 3.217, "kl": 0.0912, "nmse_layers": 0.0421,
                            "dead_fraction_train": 0.31},
        "adapter_l1_0.001": {"kind": "adapter", "l1_weight": 0.001, "l0": 17.84, "kl": 0.0217, "nmse_layers": 0.0113,
                             "dead_fraction_train": 0.07},
        "mlp_finetune": {"kind": "mlp_finetune", "l1_weight": 0.0, "l0": 0.0, "kl": 0.0049, "nmse_layers": 0.0021,
                         "dead_fraction_train": 0.0}}},
    "02_faithfulness": {"config": "organism", "subset_model": "adapter_l1_0.001", "all_layers_kl": 0.0231,
                        "interval": "95% percentile bootstrap over sequences",
                        "subset_kl": {"first 2": 0.0102, "last 2": 0.0087, "layer 3": 0.0031},
                        "models": {"adapter_l1_0.001": {"l0": 17.84, "kl": 0.0231, "kl_ci": [0.0201, 0.0262],
                                                        "top1_error": 0.0412, "top1_error_ci": [0.035, 0.047]}}},
}


@pytest.fixture
def built(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for stem, values in FAKE.items():
        (results / f"{stem}.json").write_text(json.dumps(values))
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "00_pair.png").write_bytes(b"png")
    out = build(results, tmp_path / "paper" / "README.md", TEMPLATE, PAPER_VALUES, figures, comparisons={})
    return out.read_text()


def traceable_values():
    values = [v for tree in FAKE.values() for v in numeric_values(tree)]
    return values + numeric_values(json.loads(PAPER_VALUES.read_text()))


def test_every_number_in_the_write_up_comes_from_a_results_file(built):
    numbers = prose_numbers(built)
    assert len(numbers) > 30  # the check has something to check
    assert untraced_numbers(built, traceable_values(), format_specs(TEMPLATE.read_text())) == []
    for expected in ("96.4%", "17.84", "0.0217", "0.0087", "1,020,160", "10.3", "5,623", "2.45%"):
        assert expected in numbers, expected


def test_the_check_catches_a_number_typed_by_hand(built):
    tampered = built.replace("17.84", "17.85", 1)
    assert untraced_numbers(tampered, traceable_values(), format_specs(TEMPLATE.read_text())) == ["17.85"]
    by_hand = built + "\nThe adapters recover 73% of the gain.\n"
    assert untraced_numbers(by_hand, traceable_values(), format_specs(TEMPLATE.read_text())) == ["73%"]


def test_missing_results_render_as_not_run_yet(built):
    section = built.split("(experiment three)")[1].split("## ")[0]
    assert NOT_RUN in section and "figure 03_benchmarks not made yet" in section
    assert "| `adapter_l1_0.001` | `adapter` | 0.001 | 17.84 | 0.0217 | 0.0113 | 7.0% |" in built
    assert "| `first 2` | 0.0102 |" in built
    assert "![The organism: base, target and hybrid](../figures/00_pair.png)" in built
    assert "{{" not in built and "}}" not in built
    attribution = built.split("(experiment five)")[1].split("## ")[0]
    assert "5,623" in attribution and NOT_RUN in attribution


def test_template_language():
    sources = Sources({"a": {"m": {"x.1": {"v": 0.25, "k": "adapter"}, "y": {"v": 2, "k": "base"}}, "pick": "x.1"}},
                      Path("/nonexistent"), "figs")
    assert render("{{a/m/x.1/v:.1%}} {{a/m/[a/pick]/v}} {{a/m/y/v}} {{a/m/z/v}} {{b/c}}", sources).splitlines()[-1] \
        == f"25.0% 0.25 2 {NOT_RUN} {NOT_RUN}"
    rows = render("{{#rows a/m k=base}}- {{.name}}: {{./v:.1f}}{{/rows}}", sources).splitlines()[-1]
    assert rows == "- `y`: 2.0"
    assert render("{{#rows a/none}}| {{.name}} | {{./v}} |{{/rows}}", sources).splitlines()[-1] == f"| {NOT_RUN} |  |"
    with pytest.raises(ValueError, match="rows"):
        render("{{./v}}", sources)


def test_make_paper_target_exists():
    makefile = (ROOT / "Makefile").read_text()
    assert "\npaper:" in makefile and "paper/build.py" in makefile


def test_a_comparison_configuration_fills_its_own_column_and_section(tmp_path):
    results, comparison, figures = tmp_path / "results", tmp_path / "results" / "smollm2", tmp_path / "figures"
    comparison.mkdir(parents=True)
    (figures / "smollm2").mkdir(parents=True)
    for stem, values in FAKE.items():
        (results / f"{stem}.json").write_text(json.dumps(values))
    real = {**FAKE["01_train"], "config": "smollm2", "analysis_model": "adapter_l1_0.01"}
    (comparison / "01_train.json").write_text(json.dumps(real))
    (figures / "smollm2" / "02_subset_kl.png").write_bytes(b"png")
    out = build(results, tmp_path / "paper" / "README.md", TEMPLATE, PAPER_VALUES, figures,
                comparisons={"smollm2": comparison}).read_text()
    column = out.split("## The evidence in three columns")[1].split("## ")[0]
    assert "| 17.84 | 3.22 |" in column.split("analysis adapter: L0")[1].split("\n")[0]
    section = out.split("## A real pretrained model: SmolLM2-135M")[1].split("## ")[0]
    assert "| `adapter_l1_0.01` | 0.01 | 3.22 | 0.0912 |" in section and NOT_RUN in section  # 02-06 not run
    assert "](../figures/smollm2/02_subset_kl.png)" in section
    values = traceable_values() + numeric_values(real)
    assert untraced_numbers(out, values, format_specs(TEMPLATE.read_text())) == []
    without = build(results, tmp_path / "paper" / "plain.md", TEMPLATE, PAPER_VALUES, figures, comparisons={})
    assert "| 17.84 | *not run yet* |" in without.read_text()
    with pytest.raises(ValueError, match="shadow"):
        build(results, tmp_path / "x.md", TEMPLATE, PAPER_VALUES, figures, comparisons={"01_train": comparison})


def test_the_committed_results_build_with_every_number_traced(tmp_path):
    results = ROOT / "results"
    out = build(results, tmp_path / "README.md", TEMPLATE, PAPER_VALUES, ROOT / "figures")
    values = [v for path in [*results.glob("*.json"), *results.glob("smollm2/*.json"),
                             *results.glob("paper_l0/results/*.json"), *results.glob("smollm2/paper_l0/results/*.json")]
              for v in numeric_values(json.loads(path.read_text()))]
    values += numeric_values(json.loads(PAPER_VALUES.read_text()))
    assert untraced_numbers(out.read_text(), values, format_specs(TEMPLATE.read_text())) == []
