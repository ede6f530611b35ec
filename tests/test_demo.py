"""The README's main command, on a tiny world: every stage runs and the round is scored."""

import re

from engine.demo import main


def test_demo_runs_end_to_end_and_scores_the_round(tmp_path, ray_cluster, capsys):
    assert main(["--out", str(tmp_path / "demo"), "--world-images", "4"]) == 0
    out = capsys.readouterr().out
    for stage in ("ingest", "annotate", "merge", "filter", "export", "report"):
        assert f"[{stage}]" in out
    table = out.split("quality against the world's truth")[1]
    header = table.splitlines()[1].split()
    assert header == ["raw", "merged", "filtered"]
    box_ap50 = re.search(r"box AP50\s+([\d.]+)\s+([\d.]+)\s+([\d.-]+)", table)
    assert float(box_ap50.group(1)) > 0.2 and float(box_ap50.group(2)) > 0.2
    page = (tmp_path / "demo/store/reports/r000/index.html").read_text()
    assert "Quality against ground truth (4 images)" in page
