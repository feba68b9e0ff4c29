"""The results ledger: one row per id whatever wrote it twice, one run per output, rows that follow the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddim_worker.core.images import read_png_text
from ddim_worker.job import ledger, shards
from ddim_worker.job.driver import JobError
from ddim_worker.job.lease import EXPIRES_S, Lease, LeaseHeld, LeaseRecord, check_free
from ddim_worker.manifest import id_hash
from ddim_worker.outputs import OutputLayout
from ddim_worker.columns import RESULTS_SCHEMA
from tests.jobkit import engine_actors_started, picture, png_path, result_rows, results, run, write_manifest

REPO = Path(__file__).resolve().parents[1]


# -- the ledger without a job ----------------------------------------------------------------------------------------

def _rows(ids: list[str], status: str, generation: str, digest: str = "00000000000000aa") -> pa.Table:
    rows = [{"id": i, "status": status, "error_code": None if status == "ok" else "not_found",
             "manifest_row": k, "generation": generation, "input_digest": digest} for k, i in enumerate(ids)]
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


#: docs/results.md, "At any time": one row per id with DuckDB, whatever the state of the shards.
LATEST_SQL = r"""SELECT * EXCLUDE (filename) FROM read_parquet('OUT/results/*.parquet', union_by_name = true,
                                                  filename = true)
QUALIFY row_number() OVER (
    PARTITION BY CASE WHEN id IS NULL OR error_code = 'duplicate_id' THEN '#' || manifest_row ELSE id END
    ORDER BY generation DESC, CASE status WHEN 'ok' THEN 4 WHEN 'filtered' THEN 3 WHEN 'failed' THEN 2 ELSE 1 END DESC,
        coalesce(try_cast(regexp_extract(filename, '-c(\d+)-[0-9a-f]+\.parquet$', 1) AS INTEGER), 0) DESC,
        filename DESC) = 1"""


def _plain(out: Path) -> list[dict]:
    """The folder as any Parquet reader sees it (no ledger code in between)."""
    return pq.read_table(out / "results").to_pylist()


def _latest_sql(out: Path) -> dict[str, tuple]:
    """The winners as the DuckDB query of docs/results.md resolves them: id -> (status, generation, digest)."""
    import duckdb

    query = LATEST_SQL.replace("OUT", str(out))
    return {r[0]: (r[1], r[2], r[3]) for r in
            duckdb.sql(f"SELECT id, status, generation, input_digest FROM ({query})").fetchall()}


def test_a_rewritten_shard_has_the_same_name_and_the_latest_generation_wins(tmp_path):
    layout = OutputLayout(str(tmp_path))
    first = shards.write_shard(layout, _rows(["a", "b", "c"], "failed", "r000001-a01"), "r000001-a01", None)
    again = shards.write_shard(layout, _rows(["c", "a", "b"], "failed", "r000001-a01"), "r000001-a01", None)
    assert first == again and len(list((tmp_path / "results").iterdir())) == 1  # a retried write: same object
    shards.write_shard(layout, _rows(["b"], "ok", "r000002-a01"), "r000002-a01", None)  # b redone, ok
    shards.write_shard(layout, _rows(["c"], "skipped", "r000002-a01"), "r000002-a01", None)
    shards.write_shard(layout, _rows(["c"], "failed", "r000002-a01"), "r000002-a01", None)  # a late task's result
    index = ledger.scan(layout, None)
    assert index.rows == 5 and index.superseded == 2
    table = {r["id"]: r for r in ledger.read_table(layout).to_pylist()}
    assert {k: (v["status"], v["generation"]) for k, v in table.items()} == {
        "a": ("failed", "r000001-a01"), "b": ("ok", "r000002-a01"), "c": ("failed", "r000002-a01")}
    assert len(_plain(tmp_path)) == 5  # before compaction a plain reader sees the repeats
    import duckdb  # the query docs/results.md gives for reading the ledger at any time

    query = LATEST_SQL.replace("OUT", str(tmp_path))
    latest = {r[0]: (r[1], r[2]) for r in duckdb.sql(f"SELECT id, status, generation FROM ({query})").fetchall()}
    assert latest == {k: (v["status"], v["generation"]) for k, v in table.items()}
    assert ledger.compact(layout, index, None) == 2
    plain = _plain(tmp_path)
    assert sorted(r["id"] for r in plain) == ["a", "b", "c"]  # after it, any reader sees one row per id
    assert [s.compaction for s in shards.list_shards(layout, None)].count(1) == 1  # the rewritten one: pass 1
    assert ledger.compact(layout, ledger.scan(layout, None), None) == 0
    done = ledger.scan(layout, None).done()
    assert list(done.hashes) == [id_hash("b")] and done.matches(id_hash("b"), "00000000000000aa")
    assert not done.matches(id_hash("b"), "00000000000000bb")  # same id, other inputs: not done


def _ledger_with_repeats(layout: OutputLayout) -> None:
    """Three generations over ten ids, with repeats in most shards: ids 0-5 failed, then 2-7 ok, then 4-9 failed."""
    ids = [f"id{i}" for i in range(10)]
    shards.write_shard(layout, _rows(ids[:3], "failed", "r000001-a01"), "r000001-a01", None)
    shards.write_shard(layout, _rows(ids[3:6], "failed", "r000001-a01"), "r000001-a01", None)
    shards.write_shard(layout, _rows(ids[2:8], "ok", "r000002-a01", "00000000000000bb"), "r000002-a01", None)
    shards.write_shard(layout, _rows(ids[4:10], "failed", "r000003-a01"), "r000003-a01", None)


def _winners(layout: OutputLayout) -> list[tuple]:
    table = ledger.read_table(layout).to_pylist()
    return sorted((r["id"], r["status"], r["generation"], r["input_digest"]) for r in table)


def test_a_compaction_killed_between_writing_and_deleting_keeps_the_winners_and_a_repeat_converges(tmp_path):
    layout = OutputLayout(str(tmp_path))
    _ledger_with_repeats(layout)
    before, names = _winners(layout), {s.name for s in shards.list_shards(layout, None)}
    assert len(before) == 10 and len(_plain(tmp_path)) == 18
    # the driver killed (SIGKILL) by the failpoint once every new shard is written and no old one deleted
    code = ("import sys; from ddim_worker.job import ledger; from ddim_worker.outputs import OutputLayout; "
            "layout = OutputLayout(sys.argv[1]); ledger.compact(layout, ledger.scan(layout, None), None)")
    env = {**__import__("os").environ, "DDIM_EDIT_FAILPOINTS": "compaction_written=1",
           "DDIM_EDIT_FAILPOINTS_DIR": str(tmp_path / "failpoints")}
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    listed = shards.list_shards(layout, None)
    assert names < {s.name for s in listed} and {s.compaction for s in listed} == {0, 1}  # old and new, side by side
    assert _winners(layout) == before  # the same table, through the ledger's reader
    assert sorted(_latest_sql(tmp_path).items()) == [(w[0], w[1:]) for w in before]  # and through DuckDB's query
    # repeating it converges: the old shards' rows all lose to their copies, so they go, and nothing is rewritten
    index = ledger.scan(layout, None)
    plan = ledger.plan_compaction(layout, index, None)
    assert plan.sequence == 2 and all(not item["keep"] for item in plan.items)
    assert ledger.compact(layout, index, None) == index.superseded
    assert _winners(layout) == before and sorted(r["id"] for r in _plain(tmp_path)) == [f"id{i}" for i in range(10)]
    untouched = {n for n in names if n.startswith("retry-r000003")}  # the latest shard lost no row
    assert {s.name for s in shards.list_shards(layout, None)} == ({s.name for s in listed} - names) | untouched
    assert ledger.compact(layout, ledger.scan(layout, None), None) == 0


def test_a_compaction_written_in_part_then_repeated_converges(tmp_path):
    """The phases run by hand: half of the new shards written (a kill mid-phase 1), then a whole compaction."""
    layout = OutputLayout(str(tmp_path))
    _ledger_with_repeats(layout)
    before = _winners(layout)
    plan = ledger.plan_compaction(layout, ledger.scan(layout, None), None)
    assert plan.sequence == 1 and len(plan.items) == 3
    first = next(item for item in plan.items if item["keep"])
    assert len(ledger.write_compacted(layout, ledger.Compaction(plan.sequence, [first], 0), None)) == 1
    assert _winners(layout) == before
    ledger.compact(layout, ledger.scan(layout, None), None)
    assert _winners(layout) == before and len(_plain(tmp_path)) == 10
    assert sorted(s.compaction for s in shards.list_shards(layout, None)) == [0, 1, 2]  # untouched, pass 1, pass 2


def test_a_compacted_shard_never_takes_an_existing_name(tmp_path):
    """Rewriting shard A without the row that lost leaves A's other rows: the same rows, kind and generation as
    shard B. Named as a write task names shards, A's rewrite would be B's object; it gets a name of its own."""
    layout = OutputLayout(str(tmp_path))
    for n in range(200):  # ids for which A's name sorts after B's, so A's copies of the shared rows win
        ids = [f"x{n}", f"y{n}", f"z{n}"]
        a, b = _rows(ids, "ok", "r000001-a01"), _rows(ids[:2], "ok", "r000001-a01", "00000000000000bb")
        a_name = shards.shard_name("ok", "r000001-a01", shards.table_keys(a))
        b_name = shards.shard_name("ok", "r000001-a01", shards.table_keys(b))
        if a_name > b_name:
            break
    shards.write_shard(layout, a, "r000001-a01", None)
    shards.write_shard(layout, b, "r000001-a01", None)
    shards.write_shard(layout, _rows(ids[2:], "failed", "r000002-a01"), "r000002-a01", None)
    before, names = _winners(layout), {s.name for s in shards.list_shards(layout, None)}
    assert shards.shard_name("ok", "r000001-a01", shards.table_keys(a.slice(0, 2))) == b_name  # the old collision
    assert [w[3] for w in before] == ["00000000000000aa", "00000000000000aa", "00000000000000aa"]
    plan = ledger.plan_compaction(layout, ledger.scan(layout, None), None)
    assert plan.sequence == 1
    written = ledger.write_compacted(layout, plan, None)
    assert written and not set(written) & names
    ledger.delete_compacted(plan, None)
    assert _winners(layout) == before and len(_plain(tmp_path)) == 3


def test_shard_names_carry_the_compaction_sequence():
    assert shards.parse_name("ok-r000003-a01-c0002-0123456789abcdef.parquet") == ("ok", "r000003-a01", 2)
    assert shards.parse_name("retry-r000003-a01-0123456789abcdef.parquet") == ("retry", "r000003-a01", 0)
    assert shards.parse_name("ok-20261126T081500-1a2b3c-a1-0123456789abcdef.parquet") == \
        ("ok", "20261126T081500-1a2b3c-a1", 0)
    assert shards.shard_name("ok", "r000003-a01", [1, 2], 12).startswith("ok-r000003-a01-c0012-")
    assert shards.next_compaction([shards.Shard("x", "ok", "r000001-a01", 7), shards.Shard("y", "ok", "r1")]) == 8


def test_generations_order_by_run_number_not_by_name():
    assert shards.generation_order("r000010-a01") > shards.generation_order("r000009-a03")
    assert shards.generation_order("r000002-a01") > shards.generation_order("20991231T235959-abcdef-a9")
    listed = [shards.Shard("x", "ok", "r000007-a02"), shards.Shard("y", "retry", "20261126T081500-1a2b3c-a1")]
    assert shards.next_run(listed) == 8


def test_rows_without_a_usable_id_are_one_result_each(tmp_path):
    layout = OutputLayout(str(tmp_path))
    table = pa.Table.from_pylist([
        {"id": None, "status": "failed", "error_code": "missing_image", "manifest_row": 0, "generation": "r000001-a01"},
        {"id": None, "status": "failed", "error_code": "missing_image", "manifest_row": 1, "generation": "r000001-a01"},
        {"id": "x", "status": "ok", "manifest_row": 2, "generation": "r000001-a01"},
        {"id": "x", "status": "failed", "error_code": "duplicate_id", "manifest_row": 3, "generation": "r000001-a01"},
    ], schema=RESULTS_SCHEMA)
    shards.write_shard(layout, table, "r000001-a01", None)
    assert len(ledger.read_table(layout)) == 4


# -- the lease ---------------------------------------------------------------------------------------------------

def test_a_lease_is_refused_while_its_run_lives_and_taken_when_it_is_gone(tmp_path):
    uri = str(tmp_path / "lease.json")
    lease = Lease.acquire(uri, None, "m.parquet")
    try:
        with pytest.raises(LeaseHeld, match="held by run .* --break-lease"):
            check_free(uri, None)
    finally:
        lease.release()
    assert not (tmp_path / "lease.json").exists()
    # A holder on another host whose clock is an hour behind: its record says "an hour ago", the store says now.
    skewed = LeaseRecord("skewed-run", "elsewhere", 1, time.time() - 3600, time.time() - 3600)
    (tmp_path / "lease.json").write_bytes(skewed.to_bytes())
    with pytest.raises(LeaseHeld, match="skewed-run"):
        check_free(uri, None)
    # ... and one whose clock is an hour ahead, not renewed since (by the store's clock) for longer than EXPIRES_S
    ahead = LeaseRecord("old-run", "elsewhere", 1, time.time() + 3600, time.time() + 3600)
    (tmp_path / "lease.json").write_bytes(ahead.to_bytes())
    old = time.time() - EXPIRES_S - 5
    os.utime(tmp_path / "lease.json", (old, old))
    assert check_free(uri, None).run_id == "old-run"  # expired: free to take
    taken = Lease.acquire(uri, None, "m.parquet")
    try:
        assert json.loads((tmp_path / "lease.json").read_text())["run_id"] == taken.record.run_id
    finally:
        taken.release()
    gone = LeaseRecord("gone-run", __import__("socket").gethostname(), 2**22 + 12345, time.time(), time.time())
    (tmp_path / "lease.json").write_bytes(gone.to_bytes())
    assert check_free(uri, None).stale_reason().startswith("its driver")  # its process is gone from this host


def _slow_job(manifest: str, out: Path, model: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "edit.py"), manifest, "--output", str(out), "--model", str(model),
            "--size", "64", "--num-steps", "24", "--start-step", "2", "--batch-size", "1", "--calls-per-task", "1",
            "--no-report"]


def test_a_second_run_on_a_held_output_exits_2_and_writes_nothing(tiny_model_path, tmp_path, ray_address):
    rows = []
    for i in range(6):
        (tmp_path / f"l{i}.png").write_bytes(picture(300 + i))
        rows.append({"id": f"l{i}", "image_url": f"l{i}.png", "source_prompt": "a", "edit_prompt": f"b {i}"})
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_address}  # the drivers join the session's Ray: no Ray start of their own
    first = subprocess.Popen(_slow_job(manifest, out, tiny_model_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not (out / "job.json").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    holder = json.loads((out / "lease.json").read_text())["run_id"]
    second = subprocess.run(_slow_job(manifest, out, tiny_model_path), capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert first.poll() is None, "the first run ended before the second could be refused"
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("ddim-edit: error:")]
    assert len(errors) == 1 and holder in errors[0] and "--break-lease" in errors[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert json.loads((out / "lease.json").read_text())["run_id"] == holder  # the lease is untouched
    assert json.loads((out / "job.json").read_text())["run_id"] == holder  # so is the running job's record
    assert not list(out.glob(".ddim-edit-probe-*"))
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    # the first run is over: its lease is gone, and the same job runs (in this process, on the session's Ray)
    assert not (out / "lease.json").exists()
    third = run(manifest, str(out), tiny_model_path, size=64, num_steps=24, start_step=2, batch_size=1,
                calls_per_task=1, report=False)
    plain = _plain(out)
    assert sorted(r["id"] for r in plain) == [f"l{i}" for i in range(6)]
    assert third["computed"] == 0 and third["counts"]["ok"] == 6


# -- runs against a changed output or manifest ----------------------------------------------------------------------

@pytest.mark.usefixtures("ray_session")
def test_a_png_made_with_other_settings_is_recomputed_not_recorded(tiny_model_path, tmp_path):
    for i in range(3):
        (tmp_path / f"s{i}.png").write_bytes(picture(320 + i))
    rows = [{"id": f"s{i}", "image_url": f"s{i}.png", "source_prompt": "a", "edit_prompt": "b"} for i in range(3)]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    run(manifest, str(out), tiny_model_path, num_steps=4, start_step=1, guidance_scale=3.5)
    for shard in (out / "results").glob("*.parquet"):  # a run killed after its PNGs, before its results
        shard.unlink()
    summary = run(manifest, str(out), tiny_model_path, num_steps=8, start_step=2, guidance_scale=5.0)
    assert summary["recovered"] == 0 and summary["computed"] == 3
    for rid, row in results(str(out)).items():
        assert (row["num_steps"], row["start_step"], row["guidance_scale"]) == (8, 2, 5.0)
        settings = read_png_text(png_path(out, rid).read_bytes())["ddim_edit:settings"].split()
        assert {"num_steps=8", "start_step=2", "guidance_scale=5.0"} <= set(settings)
    for shard in (out / "results").glob("*.parquet"):
        shard.unlink()
    same = run(manifest, str(out), tiny_model_path, num_steps=8, start_step=2, guidance_scale=5.0)
    assert same["recovered"] == 3 and same["computed"] == 0  # made with these very settings: recorded


@pytest.mark.usefixtures("ray_session")
def test_a_null_image_or_prompt_is_a_row_error_never_a_file_named_nan(tiny_model_path, tmp_path):
    for name in ("nan", "None", "ok.png"):
        (tmp_path / name).write_bytes(picture(330))
    schema = pa.schema([("id", pa.string()), ("image_url", pa.string()), ("source_prompt", pa.string()),
                        ("edit_prompt", pa.string()), ("guidance_scale", pa.float64())])
    rows = [{"id": "null-url", "image_url": None, "source_prompt": "a", "edit_prompt": "b"},
            {"id": "empty-url", "image_url": "", "source_prompt": "a", "edit_prompt": "b"},
            {"id": "null-prompt", "image_url": "ok.png", "source_prompt": None, "edit_prompt": "b"},
            {"id": "null-setting", "image_url": "ok.png", "source_prompt": "a", "edit_prompt": "b",
             "guidance_scale": None},
            {"id": None, "image_url": None, "source_prompt": "a", "edit_prompt": "b"}]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"), schema=schema)
    run(manifest, str(tmp_path / "out"), tiny_model_path, guidance_scale=2.0)
    table = result_rows(str(tmp_path / "out"))
    got = {r["manifest_row"]: (r["status"], r["error_code"]) for r in table}
    assert got == {0: ("failed", "missing_image"), 1: ("failed", "missing_image"), 2: ("failed", "bad_prompt"),
                   3: ("ok", None), 4: ("failed", "missing_image")}
    assert table[3]["guidance_scale"] == 2.0  # a null setting is the job's default
    assert "nan" not in {str(r["image_url"]).lower() for r in table}


@pytest.mark.usefixtures("ray_session")
def test_the_table_follows_the_manifest(tiny_model_path, tmp_path):
    rows = []
    for i in range(8):
        (tmp_path / f"t{i}.png").write_bytes(picture(340 + i))
        rows.append({"id": f"t{i}", "image_url": f"t{i}.png", "source_prompt": "a", "edit_prompt": "b"})
    rows += [{"id": f"gone{i}", "image_url": f"missing{i}.png", "source_prompt": "a", "edit_prompt": "b"}
             for i in range(4)]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    full = run(manifest, str(out), tiny_model_path, results_shard_rows=3)
    assert full["counts"] == {"ok": 8, "filtered": 0, "failed": 4, "skipped": 0}
    # a --limit run keeps every row of the first run, failed rows included (their retry shards were not retried); it
    # has nothing to do, so it starts no engine actor (no model loaded)
    actors = engine_actors_started()
    limited = run(manifest, str(out), tiny_model_path, limit=5, results_shard_rows=3)
    assert limited["counts"] == {"ok": 5, "filtered": 0, "failed": 0, "skipped": 0} and limited["computed"] == 0
    assert engine_actors_started() == actors
    plain = _plain(out)
    assert sorted(r["id"] for r in plain) == sorted(r["id"] for r in rows)
    # a row whose inputs changed under the same id is redone; rows no longer in the manifest are counted, kept,
    # and pruned on request
    changed = [{**r, "edit_prompt": "b, changed"} if r["id"] == "t1" else r for r in rows[:6]]
    smaller = write_manifest(changed, str(tmp_path / "m2.parquet"))
    summary = run(smaller, str(out), tiny_model_path)  # every id is done, one from other inputs: the engine runs
    assert summary["computed"] == 1 and summary["results_rows_outside_manifest"] == 6
    assert engine_actors_started() > actors
    assert read_png_text(png_path(out, "t1").read_bytes())["ddim_edit:edit_prompt"] == "b, changed"
    assert {r["id"]: r["edit_prompt"] for r in _plain(out)}["t1"] == "b, changed" and len(_plain(out)) == 12
    with pytest.raises(JobError, match="--prune-stale needs the whole manifest"):
        run(smaller, str(out), tiny_model_path, prune_stale=True, limit=2)
    pruned = run(smaller, str(out), tiny_model_path, prune_stale=True)
    assert pruned["results_rows_pruned"] == 6 and sorted(r["id"] for r in _plain(out)) == [f"t{i}" for i in range(6)]
    assert pruned["counts"] == {"ok": 6, "filtered": 0, "failed": 0, "skipped": 0}


# -- manifest errors before Ray ------------------------------------------------------------------------------------

def test_bad_manifest_files_end_in_one_line_before_ray_starts(tiny_model_path, tmp_path):
    cases = {}
    (tmp_path / "text.parquet").write_text("this is not a table\n" * 10)
    cases["text.parquet"] = "is not Parquet: it starts with b'this'"
    (tmp_path / "csv.parquet").write_text("id,image_url,source_prompt,edit_prompt\na,x.png,a,b\n")
    cases["csv.parquet"] = "a CSV or text file named .parquet"
    (tmp_path / "short.parquet").write_bytes(b"PAR1abc")
    cases["short.parquet"] = "7 bytes, too short"
    folder = tmp_path / "two"
    folder.mkdir()
    base = {"id": "a", "image_url": "x.png", "source_prompt": "a", "edit_prompt": "b"}
    write_manifest([{**base, "label": 1}], str(folder / "part-0.parquet"))
    write_manifest([{**base, "id": "b"}], str(folder / "part-1.parquet"))
    cases["two"] = "part-1.parquet lacks column 'label'"
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "jobs" / "edit.py"), str(tmp_path / name), "--output",
                                     str(tmp_path / f"out-{name}"), "--model", str(tiny_model_path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL)
             for name in cases}  # independent commands: run side by side
    for name, message in cases.items():
        proc = procs[name]
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2, (name, stderr[-2000:])
        errors = [line for line in stderr.splitlines() if line.startswith("ddim-edit: error:")]
        assert len(errors) == 1 and message in errors[0], (name, stderr[-2000:])
        assert "Traceback" not in stderr and "Ray" not in stderr, stderr[-2000:]
        record = json.loads((tmp_path / f"out-{name}" / "job.json").read_text())
        assert record["state"] == "failed" and message in record["error"]


def test_nulls_in_every_form_are_missing_and_never_text():
    import math

    import pandas as pd

    from ddim_worker.manifest import image_reference
    from ddim_worker.rows import RowError, is_missing, text_or_none

    for null in (None, float("nan"), np.float64("nan"), np.float32("nan"), pd.NA, pd.NaT):
        assert is_missing(null) and text_or_none(null) is None
        record = {"image_url": null, "image": None}
        with pytest.raises(RowError, match="names no image") as info:
            image_reference(record)
        assert info.value.code == "missing_image"
    assert not is_missing("nan") and text_or_none("nan") == "nan" and not is_missing(0.0) and math.isfinite(0.0)
    embedded = {"image_url": float("nan"), "image": {"bytes": b"\x89PNG", "path": None}}
    image_reference(embedded)
    assert embedded["image_url"] is None and embedded["image_bytes"] == b"\x89PNG"


def test_a_hash_shared_by_two_ids_is_caught_by_comparing_the_ids(tmp_path):
    """Two different ids whose 64-bit hashes met would be taken for one repeated id: the full ids are compared."""
    from ddim_worker.job.source import SourceContext, _rows_to_do, plan_source
    from ddim_worker.core.settings import DEFAULTS

    rows = [{"id": i, "image_url": "x.png", "source_prompt": "a", "edit_prompt": "b"} for i in ("first", "second")]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    source = plan_source(manifest, {})
    table = pq.read_table(manifest)
    for first_id, expected in (("second", "is also manifest row 0"), ("first", "have the same 64-bit hash")):
        # the driver's index says the hash of "second" was first seen at row 0, with id `first_id`
        ctx = SourceContext(source, DEFAULTS, 1000, duplicates={id_hash("second"): (0, first_id)})
        out = _rows_to_do(table, 0, ctx, None, None)
        row = {k: v[list(out["id"]).index("second")] for k, v in out.items()}
        assert row["error_code"] == "duplicate_id" and expected in row["error"], row["error"]
