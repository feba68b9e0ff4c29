"""The job at dataset scale: streamed manifests, results as shards, the user's columns kept, an edited dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddim_worker.core.images import read_png_text
from ddim_worker.job.source import READ_SLICE_ROWS, find_duplicates, id_hash, plan_source
from tests.jobkit import picture, png_path, result_rows, results, run, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _augmentation_manifest(tmp_path: Path, images: int, prompts: int, edits: int, shards: int = 1) -> list[str]:
    """images x prompts (image, source prompt) pairs, each with `edits` edit prompts, rows shuffled over files."""
    (tmp_path / "manifest").mkdir()
    for i in range(images):  # next to the manifest: relative paths resolve against its folder
        (tmp_path / "manifest" / f"img{i}.png").write_bytes(picture(500 + i))
    rows = [{"id": f"e{i}-{p}-{k}", "image_url": f"img{i}.png", "source_prompt": f"a scene {p}",
             "edit_prompt": f"a scene {p} edit {k}", "label": i * 100 + k, "score": k / 10.0,
             "status": "raw"}  # a column of theirs whose name we use: carried as manifest_status
            for i in range(images) for p in range(prompts) for k in range(edits)]
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[j] for j in order]
    per = -(-len(rows) // shards)
    return [write_manifest(rows[s * per:(s + 1) * per], str(tmp_path / "manifest" / f"part-{s}.parquet"))
            for s in range(shards)]


def test_edited_dataset_with_users_columns_loads_with_datasets(tiny_model_path, tmp_path):
    """192 rows over 8 images x 3 source prompts (8 edits each) with --embed-images, in shards of 64 rows."""
    datasets = pytest.importorskip("datasets")
    _augmentation_manifest(tmp_path, images=8, prompts=3, edits=8)
    out = tmp_path / "out"
    options = dict(num_steps=3, start_step=1, batch_size=16, embed_images=True, report=False,
                   results_shard_rows=64)
    summary = run(str(tmp_path / "manifest"), str(out), tiny_model_path, **options)
    table = results(str(out))
    assert len(table) == 192 and all(r["status"] == "ok" for r in table.values())
    assert summary["counts"]["ok"] == 192 and summary["total"] == 192
    # one inversion per (image, source prompt), give or take a few: rows of a pair are sorted together and the
    # engine actor keeps recent trajectories
    assert summary["inversions"] <= 2 * 24, summary["inversions"]
    some = table["e3-1-7"]
    # the manifest's own "score" meets ours (the scorer's): it is carried as manifest_score
    assert (some["label"], some["manifest_score"], some["manifest_status"], some["score"]) == (307, 0.7, "raw", None)
    loaded = datasets.load_dataset("parquet", data_files=str(out / "results" / "*.parquet"), split="train")
    assert loaded.num_rows == 192
    assert isinstance(loaded.features["edited_image"], datasets.Image)
    first = loaded[0]
    assert first["edited_image"].size == (64, 64) and first["label"] is not None
    png = png_path(out, first['id']).read_bytes()
    assert read_png_text(png)["ddim_edit:id"] == first["id"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    again = run(str(tmp_path / "manifest"), str(out), tiny_model_path, **options)
    assert again["computed"] == 0 and again["done_before"] == 192
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before  # no PNG rewritten
    assert len(results(str(out))) == 192


def test_results_shards_are_written_once_and_stopped_runs_stay_complete(tiny_model_path, tmp_path):
    """Every run leaves one row per manifest row: finished, stopped early, then resumed."""
    (tmp_path / "good.png").write_bytes(picture(1))
    rows = [{"id": f"g{i}", "image_url": "good.png", "source_prompt": "a", "edit_prompt": f"b {i}"}
            for i in range(6)]
    rows += [{"id": f"bad{i}", "image_url": "missing.png", "source_prompt": "a", "edit_prompt": "b"}
             for i in range(14)]
    rows.insert(3, {"id": "g0", "image_url": "good.png", "source_prompt": "a", "edit_prompt": "dup"})
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    summary = run(manifest, out, tiny_model_path, max_failed_fraction=0.3, results_shard_rows=2, batch_size=2)
    table = result_rows(out)
    assert len(table) == len(rows) == 21 and sorted(r["manifest_row"] for r in table) == list(range(21))
    assert summary["stopped_early"]
    assert {r["status"] for r in table} <= {"ok", "failed", "skipped"}
    assert [r["error_code"] for r in table if r["manifest_row"] == 3] == ["duplicate_id"]
    first_shards = {p.name for p in (Path(out) / "results").glob("ok-*.parquet")}
    resumed = run(manifest, out, tiny_model_path, results_shard_rows=2, batch_size=2)
    table = result_rows(out)
    assert len(table) == 21 and resumed["stopped_early"] is None
    by_status = {s: sum(r["status"] == s for r in table) for s in ("ok", "failed", "skipped")}
    assert by_status == {"ok": 6, "failed": 15, "skipped": 0}
    assert first_shards <= {p.name for p in (Path(out) / "results").glob("ok-*.parquet")}  # never rewritten
    failed = pq.read_table(Path(out) / "failed.parquet")
    assert failed.num_rows == 15 and failed.column_names == ["id", "image_url", "source_prompt", "edit_prompt"]


def test_duplicates_found_from_hashes():
    rows = np.arange(6, dtype=np.int64)
    hashes = np.array([id_hash(x) for x in ("a", "b", "a", "c", "b", "a")], np.uint64)
    hashes[3] = 0  # an invalid row has no id
    assert find_duplicates(rows, hashes) == {id_hash("a"): 0, id_hash("b"): 1}


def test_source_plan_reads_footers_only_and_honours_limit(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table({"image_url": [f"{i}.png" for i in range(1000)], "source_prompt": ["a"] * 1000,
                      "edit_prompt": ["b"] * 1000, "extra": list(range(1000))})
    pq.write_table(table, path, row_group_size=300)
    source = plan_source(str(path), {}, limit=700)
    assert [(g.group, g.first_row, g.rows) for g in source.groups] == [(0, 0, 300), (1, 300, 300), (2, 600, 100)]
    assert source.total_rows == 700 and source.carried == {"extra": "extra"}


def test_manifest_folder_skips_spark_leftovers_hidden_files_and_fifos(tmp_path):
    """A folder Spark wrote to: ``_SUCCESS``, ``.crc`` files, a ``_temporary/`` attempt and a hidden copy are not
    data (pyarrow's ``ignore_prefixes``), and a FIFO named like a part is skipped with a warning, never opened."""
    import logging
    import os
    import threading

    folder = tmp_path / "spark"
    (folder / "_temporary" / "0" / "_temporary").mkdir(parents=True)
    (folder / "year=2024").mkdir()
    rows = lambda n, tag: pa.table({"id": [f"{tag}{i}" for i in range(n)], "image_url": ["x.png"] * n,  # noqa: E731
                                    "source_prompt": ["a"] * n, "edit_prompt": ["b"] * n})
    pq.write_table(rows(3, "p"), folder / "part-00000.parquet")
    pq.write_table(rows(2, "q"), folder / "year=2024" / "part-00001.parquet")
    for leftover in ("_temporary/0/part-00000.parquet", "_temporary/0/_temporary/part-00000.parquet",
                     ".part-00000.parquet", "_part-00002.parquet"):
        pq.write_table(rows(3, "dup"), folder / leftover)
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-00000.parquet.crc").write_bytes(b"crc")
    os.mkfifo(folder / "part-00009.parquet")
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(source=plan_source(str(folder), {})), daemon=True)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ddim_worker.manifest").addHandler(handler)  # the suite runs with -p no:logging
    try:
        thread.start()
        thread.join(30)
    finally:
        logging.getLogger("ddim_worker.manifest").removeHandler(handler)
    try:
        assert not thread.is_alive(), "planning the manifest hung on the FIFO"
    finally:
        if thread.is_alive():  # release the reader stuck in open()
            os.close(os.open(folder / "part-00009.parquet", os.O_WRONLY | os.O_NONBLOCK))
    source = box["source"]
    assert [Path(f).relative_to(folder).as_posix() for f in source.files.files] == [
        "part-00000.parquet", "year=2024/part-00001.parquet"]
    assert source.total_rows == 5
    assert any("part-00009.parquet: not a regular file" in w for w in warnings), warnings


@pytest.mark.usefixtures("ray_session")
def test_a_two_cpu_node_does_not_stall(tiny_model_path, tmp_path):
    """Every stage can run at once on a 2-CPU Ray node (the reading task once starved fetching there): the session's
    Ray is such a node. One row group bigger than one read slice, so the reading task pauses on backpressure after
    the first slice while fetching, the engine actor and the writes must go on."""
    import ray

    assert ray.cluster_resources().get("CPU") == 2, "this test needs the session's Ray to be a 2-CPU node"
    (tmp_path / "a.png").write_bytes(picture(9))
    rows = READ_SLICE_ROWS + 2000
    table = pa.table({"id": [f"r{i}" for i in range(rows)],
                      "image_url": ["missing.png"] * (rows - 4) + ["a.png"] * 4,  # most fail fast, 4 are edited
                      "source_prompt": ["a"] * rows, "edit_prompt": [f"b {i}" for i in range(rows)]})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=rows)
    summary = run(str(tmp_path / "m.parquet"), str(tmp_path / "out"), tiny_model_path, num_steps=2, start_step=1,
                  batch_size=64, report=False, results_shard_rows=2048)
    assert summary["counts"]["ok"] == 4 and summary["counts"]["failed"] == rows - 4
