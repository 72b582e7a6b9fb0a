"""Tests of the shared file writers."""

import csv

from jaxmm import files


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    names = ["=HYPERLINK(\"http://x\")_1.png", "+1-2.png", "-cmd.png", "@SUM(A1).png",
             "\tTab.png", "plain - name.png", "a=b.png"]
    path = files.write_csv(str(tmp_path / "p.csv"),
                           [{"file": n, "confidence": -0.5, "k": 3} for n in names],
                           ["file", "confidence", "k"])
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    got = [r["file"] for r in rows]
    assert got[:5] == ["'" + n for n in names[:5]]
    assert got[5:] == names[5:]  # only the first character matters
    assert {r["confidence"] for r in rows} == {"-0.5"}  # numbers stay numbers
    assert files.csv_cell(7) == 7 and files.csv_cell("ok") == "ok"
