"""Run identity and publishing: a run number never comes back, a run that lacks rows says so, a partial run never
shrinks the dataset, and a packing that fails or is killed leaves the previous dataset whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ddim_worker.job.driver import JobError, main
from ddim_worker.job.pack import current_data_files
from ddim_worker.job.pack_command import pack_output
from ddim_worker.outputs import OutputLayout
from tests.jobkit import picture, png_path, result_rows, run, write_manifest

pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[1]
ROWS = 6


def _manifest(tmp_path: Path) -> str:
    rows = []
    for i in range(ROWS // 2):
        (tmp_path / f"p{i}.png").write_bytes(picture(400 + i, size=64))
        for k in range(2):
            rows.append({"id": f"p{i}-{k}", "image_url": f"p{i}.png", "source_prompt": "a picture",
                         "edit_prompt": f"a picture, edit {k}"})
    return write_manifest(rows, str(tmp_path / "m.parquet"))


def _load(folder: Path):
    import datasets

    return datasets.load_dataset(str(folder), split="train", download_mode="force_redownload")


def _card_path(folder: Path) -> str:
    header = (folder / "README.md").read_text().split("---\n", 2)[1]
    return header.split("path: ", 1)[1].splitlines()[0].strip()


def test_a_run_number_never_comes_back_and_a_leftover_stop_marker_stops_nothing(tiny_model_path, tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    assert run(manifest, str(out), tiny_model_path, pack=False, report=False)["run"] == 1
    # a run killed after it stopped early leaves its marker; --overwrite empties results/
    (out / ".stop-r000001-a01").write_bytes(b"stop")
    again = run(manifest, str(out), tiny_model_path, overwrite=True, pack=False, report=False)
    assert again["run"] == 2 and again["counts"]["ok"] == ROWS and again["missing"] == 0
    assert len(result_rows(str(out))) == ROWS and not (out / ".stop-r000001-a01").exists()
    # the counter gone too (a user emptied the output but for a marker): the marker's number is still passed
    (out / "run.json").unlink()
    (out / ".stop-r000005-a01").write_bytes(b"stop")
    third = run(manifest, str(out), tiny_model_path, overwrite=True, pack=False, report=False)
    assert third["run"] == 6 and third["counts"]["ok"] == ROWS
    assert json.loads((out / "run.json").read_text())["run"] == 6


def test_a_run_whose_table_lacks_rows_exits_non_zero(tiny_model_path, tmp_path, capsys):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    marker = out / ".stop-r000001-a01"

    def stop_after_first_shard() -> None:  # a stray marker mid-run: the tasks after it record nothing
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "results").glob("ok-*.parquet")):
            time.sleep(0.02)
        marker.write_bytes(b"stop")

    watcher = threading.Thread(target=stop_after_first_shard, daemon=True)
    watcher.start()
    code = main([manifest, "--output", str(out), "--model", str(tiny_model_path), "--size", "64", "--num-steps",
                 "12", "--start-step", "2", "--batch-size", "1", "--calls-per-task", "1", "--results-shard-rows",
                 "1", "--no-report", "--no-pack"])
    watcher.join()
    record = json.loads((out / "job.json").read_text())
    recorded = len(result_rows(str(out)))
    assert 0 < recorded < ROWS, "the marker came too late or too early to leave rows unrecorded"
    assert code == 4 and record["state"] == "incomplete" and record["missing"] == ROWS - recorded
    err = capsys.readouterr()
    assert f"{ROWS - recorded} MISSING" in err.out and f"{ROWS - recorded} of {ROWS} manifest rows" in err.err
    # the same command again finishes the rows
    assert main([manifest, "--output", str(out), "--model", str(tiny_model_path), "--size", "64", "--num-steps",
                 "12", "--start-step", "2", "--no-report", "--no-pack"]) == 0
    assert len(result_rows(str(out))) == ROWS


def test_partial_runs_and_failed_or_killed_packings_never_shrink_the_dataset(tiny_model_path, tmp_path, ray_address):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    first = run(manifest, str(out), tiny_model_path, report=False)
    assert first["dataset"]["rows"] == ROWS and _load(out / "dataset").num_rows == ROWS
    card = (out / "dataset" / "README.md").read_text()

    # a smoke test on the same output: the dataset keeps every row, and so does a later `ddim-edit pack`
    smoke = run(manifest, str(out), tiny_model_path, limit=2, report=False)
    assert smoke["dataset"] is None and "--limit 2" in smoke["dataset_not_packed"]
    assert _load(out / "dataset").num_rows == ROWS
    assert pack_output(str(out))["rows"] == ROWS and _load(out / "dataset").num_rows == ROWS

    # a packing that fails half way (a PNG it needs is gone): the previous dataset, whole
    lost = png_path(out, "p1-0")
    kept = lost.read_bytes()
    lost.unlink()
    with pytest.raises(JobError, match="cannot pack"):
        pack_output(str(out), max_shard_size="2KB")
    assert (out / "dataset" / "README.md").read_text() == card
    assert sorted(_load(out / "dataset")["id"]) == sorted(f"p{i}-{k}" for i in range(ROWS // 2) for k in range(2))
    lost.write_bytes(kept)

    # a packing killed after writing its files, before the switch: the previous dataset, whole
    # (it joins the session's Ray: the failpoint fires in its own process, the driver)
    env = {**os.environ, "DDIM_EDIT_FAILPOINTS": "pack_before_switch=1", "DDIM_EDIT_FAILPOINTS_DIR": str(tmp_path),
           "RAY_ADDRESS": ray_address}
    killed = subprocess.run([sys.executable, "-m", "ddim_worker.cli", "pack", str(out), "--max-shard-size", "2KB"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "dataset" / "README.md").read_text() == card and _load(out / "dataset").num_rows == ROWS
    assert len(list((out / "dataset" / "data").iterdir())) == 2  # the old packing and the unfinished one

    # the next packing publishes, and only then removes the old folder and the unfinished one
    again = pack_output(str(out), max_shard_size="2KB")
    assert again["files"] >= 2 and _load(out / "dataset").num_rows == ROWS
    files = current_data_files(OutputLayout(str(out)))
    assert len(files) == again["files"] and all(Path(f).exists() for f in files)
    assert sorted(p for p in (out / "dataset" / "data").rglob("*.parquet")) == sorted(Path(f) for f in files)
    assert _card_path(out / "dataset").startswith("data/") and _card_path(out / "dataset").endswith("/train-*")
