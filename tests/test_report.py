"""Report: markdown page and non-empty PNGs from tiny synthetic run directories."""

from __future__ import annotations

import json

from secateurs.cli import main
from secateurs.report import build_report, read_results, save_results


def _runs(tmp_path):
    dense, cut = tmp_path / "dense", tmp_path / "cut"
    dense.mkdir()
    cut.mkdir()
    save_results(dense, "parameters", 1_000_000)
    save_results(dense, "ppl", {"wikitext2": {"ppl": 12.5, "protocol": {"seq_len": 128}}})
    record = {
        "plan": {"num_layers": 6, "blocks": [3, 4], "attn": [], "mlp": [], "protected": [0, 5]},
        "parameters": {"before": 1_000_000, "after": 700_000},
        "scores": [
            {"criterion": "ppl", "unit": "block", "values": [9, 5, 4, 1, 2, 8]},
            {"criterion": "taylor", "unit": "block", "values": [0.9, 0.5, 0.4, 0.1, 0.2, 0.8]},
        ],
    }
    (cut / "secateurs.json").write_text(json.dumps(record))
    save_results(cut, "ppl", {"wikitext2": 17.25})
    save_results(cut, "zeroshot", {"scores": {"boolq": 0.61, "piqa": 0.7}, "mean": 0.655})
    return dense, cut


def _bench(tmp_path):
    def rows(scale):
        return [
            {
                "batch_size": b,
                "status": "ok",
                "latency_s": scale * b,
                "throughput_tok_s": 8 / scale,
                "peak_mb": 10.0,
                "speedup": 1 / scale,
            }
            for b in (1, 4)
        ]

    bench = {
        "protocol": {"device": "cpu", "new_tokens": 8, "prompt_len": 4, "repeats": 1},
        "models": [
            {
                "name": "dense",
                "kind": "dense",
                "parameters": 10**6,
                "macs_per_token": 10**6,
                "ideal_speedup": 1.0,
                "results": rows(1.0),
            },
            {
                "name": "cut",
                "kind": "depth",
                "parameters": 7 * 10**5,
                "macs_per_token": 7 * 10**5,
                "ideal_speedup": 1 / 0.7,
                "results": rows(0.75),
            },
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    return path


def test_results_json_merges_keys(tmp_path):
    save_results(tmp_path, "ppl", {"ptb": 3.0})
    save_results(tmp_path, "zeroshot", {"mean": 0.5})
    assert read_results(tmp_path) == {"ppl": {"ptb": 3.0}, "zeroshot": {"mean": 0.5}}


def test_report_has_tables_and_plots(tmp_path):
    dense, cut = _runs(tmp_path)
    page = build_report([dense, cut], [_bench(tmp_path)], tmp_path / "report")
    text = page.read_text()
    assert "| cut | depth | blocks [3, 4] | 0.70 | 17.25 | 0.6100 | 0.7000 | 0.6550 |" in text
    assert "| dense | dense | – | 1.00 | 12.50 |" in text
    assert "| cut | depth | 0.7 |" in text  # bench table
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert pngs == [
        "importance_cut_ppl_block.png",
        "importance_cut_taylor_block.png",
        "latency_vs_batch_bench.png",
        "ppl_vs_params.png",
        "throughput_vs_batch_bench.png",
    ]
    assert all((page.parent / p).stat().st_size > 1000 for p in pngs)
    assert all(f"]({p})" in text for p in pngs)


def test_report_command(tmp_path, capsys):
    dense, cut = _runs(tmp_path)
    assert main(["report", str(dense), str(cut), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "index.md").is_file() and "report:" in capsys.readouterr().out


def test_report_draws_the_dense_point_and_warns_far_above_it(tmp_path, caplog):
    dense, cut = _runs(tmp_path)
    save_results(cut, "ppl", {"wikitext2": {"ppl": 2_188_335.0}})
    save_results(
        cut, "dense", {"model": "base-1m", "parameters": 1_000_000, "ppl": {"wikitext2": 12.5}}
    )
    page = build_report([cut], [], tmp_path / "report")
    text = page.read_text()
    assert "| base-1m | dense | – | 1.00 | 12.50 |" in text  # the dense point, from results.json
    assert "> **Warning**: cut: wikitext2 PPL 2,188,335.00 is 175,067x" in text
    assert "its dense model base-1m" in caplog.text


def test_sensitivity_plot_spreads_the_units_near_the_threshold():
    from secateurs.report import _increase_over_lowest, _pyplot, _sensitivity_scale

    values = [1e5, 900.0, 61.0, 55.0, 56.5, 70.0]  # block 0 dwarfs the rest on a linear axis
    increase = _increase_over_lowest(values)
    assert increase[1:] == [845.0, 6.0, 0.01 * 15.0, 1.5, 15.0]  # lowest drawn at 1% of median
    fig, ax = _pyplot().subplots()
    _sensitivity_scale(ax, values)
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] < 55.0
    _sensitivity_scale(ax, [0.0, -1.0, 2.0])
    assert ax.get_yscale() == "symlog"


def test_unscored_protected_units_draw_no_bar_and_no_warning(tmp_path):
    """A criterion leaves protected blocks unscored (inf): the plot draws no bar for them,
    without matplotlib's 'invalid value' warning (the quickstart's report printed one)."""
    import warnings

    dense, cut = _runs(tmp_path)
    record = json.loads((cut / "secateurs.json").read_text())
    inf = float("inf")
    record["scores"] = [{"criterion": "ppl", "unit": "block", "values": [inf, 5, 4, 1, 2, inf]}]
    (cut / "secateurs.json").write_text(json.dumps(record))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        page = build_report([dense, cut], [], tmp_path / "report")
    assert (page.parent / "importance_cut_ppl_block.png").stat().st_size > 1000
