"""Faults: a killed engine actor, a lost node, a SIGKILLed driver, a dead bucket, too many failures, the URL policy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ddim_worker.job.driver import JobError
from tests.jobkit import picture, result_rows, results, run, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _manifest(tmp_path: Path, n: int, name: str = "m.parquet") -> str:
    rows = []
    for i in range(n):
        (tmp_path / f"f{i}.png").write_bytes(picture(200 + i))
        rows.append({"id": f"f{i}", "image_url": f"f{i}.png", "source_prompt": "a cat",
                     "edit_prompt": f"a dog {i}", "seed": i})
    return write_manifest(rows, str(tmp_path / name))


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _partial_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name]


# long enough to be interrupted mid-job, a PNG at a time (one engine batch of one row per actor task)
SLOW = dict(num_steps=16, start_step=2, batch_size=1, calls_per_task=1)


@pytest.mark.usefixtures("ray_session")
def test_killed_engine_actor_costs_a_retry_not_the_job(tiny_model_path, tmp_path):
    import ray
    from ray.util.state import list_actors

    manifest = _manifest(tmp_path, 6)
    run(manifest, str(tmp_path / "clean"), tiny_model_path, **SLOW)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(summary=run(manifest, str(tmp_path / "out"),
                                                                    tiny_model_path, **SLOW)))
    started = time.monotonic()
    thread.start()
    killed = None
    while thread.is_alive() and killed is None and time.monotonic() - started < 120:
        actors = [a for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                         filters=[("state", "=", "ALIVE")])
                  if "EditActor" in a.class_name]
        done = len(list((tmp_path / "out" / "images").rglob("*.png"))) if (tmp_path / "out" / "images").exists() \
            else 0
        if actors and 1 <= done < 6:
            os.kill(actors[0].pid, signal.SIGKILL)
            killed = (actors[0].pid, done)
        time.sleep(0.1)
    thread.join(timeout=300)
    elapsed = time.monotonic() - started
    assert killed is not None, "the job finished before an actor could be killed"
    table = results(str(tmp_path / "out"))
    assert sorted(table) == [f"f{i}" for i in range(6)] and all(r["status"] == "ok" for r in table.values())
    assert _pngs(tmp_path / "out" / "images") == _pngs(tmp_path / "clean" / "images")
    assert not _partial_files(tmp_path / "out")
    print(f"actor kill: pid {killed[0]} killed after {killed[1]} images; job finished in {elapsed:.1f}s")


@pytest.mark.usefixtures("ray_session")
def test_a_model_no_actor_can_load_ends_the_job_with_its_records(tiny_model_path, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_path, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights at all")
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    with pytest.raises(JobError, match="the engine could not start") as info:
        run(manifest, str(out), broken)
    assert "\n" not in str(info.value)
    job = json.loads((out / "job.json").read_text())
    assert job["state"] == "failed" and "the engine could not start" in job["error"] and job["missing"] == 3
    assert pq.read_table(out / "failed.parquet").num_rows == 3  # the rows to rerun, with the manifest's columns


@pytest.mark.usefixtures("ray_session")
def test_unreachable_output_bucket_fails_fast_with_one_message(s3_server, tiny_model_path, tmp_path):
    manifest = _manifest(tmp_path, 1)
    started = time.monotonic()
    with pytest.raises(JobError, match="cannot write to --output s3://no-such-bucket-ddim/out") as info:
        run(manifest, "s3://no-such-bucket-ddim/out", tiny_model_path, storage_options=s3_server.storage_options)
    assert time.monotonic() - started < 30
    assert "\n" not in str(info.value)


def test_cli_reports_setup_errors_in_one_line(tiny_model_path, tmp_path):
    manifest = _manifest(tmp_path, 1)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "edit.py"), manifest, "--output",
                           str(tmp_path / "out"), "--model", str(tmp_path / "missing-model")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddim-edit: error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.usefixtures("ray_session")
def test_max_failed_fraction_stops_early_and_saves_what_is_done(tiny_model_path, tmp_path):
    rows = [{"id": f"m{i}", "image_url": f"missing-{i}.png", "source_prompt": "a", "edit_prompt": "b"}
            for i in range(40)]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    summary = run(manifest, str(tmp_path / "out"), tiny_model_path, max_failed_fraction=0.5, batch_size=1)
    assert summary["stopped_early"] and "over --max-failed-fraction 0.5" in summary["stopped_early"]
    table = result_rows(str(tmp_path / "out"))
    assert len(table) == 40  # every row accounted for: failed, or not run
    assert {r["status"] for r in table} <= {"failed", "skipped"}
    assert all(r["error_code"] == "not_found" for r in table if r["status"] == "failed")
    assert (tmp_path / "out" / "failed.parquet").exists() and (tmp_path / "out" / "job.json").exists()


@pytest.mark.usefixtures("ray_session")
def test_url_policy_end_to_end_sends_nothing_to_loopback(http_server, tiny_model_path, tmp_path):
    (http_server.root / "secret.png").write_bytes(picture(1))
    port = http_server.port
    rows = [
        {"id": "direct", "image_url": http_server.url("secret.png")},
        {"id": "redirect", "image_url": http_server.url(f"redirect?to=http://127.0.0.1:{port}/secret.png")},
        {"id": "other-loopback", "image_url": f"http://127.1.2.3:{port}/secret.png"},
        {"id": "localhost", "image_url": f"http://localhost:{port}/secret.png"},
        {"id": "decimal", "image_url": f"http://2130706433:{port}/secret.png"},
        {"id": "metadata", "image_url": "http://169.254.169.254/latest/meta-data/"},
    ]
    rows = [{**r, "source_prompt": "a", "edit_prompt": "b"} for r in rows]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    http_server.reset()
    run(manifest, str(tmp_path / "out"), tiny_model_path)
    table = results(str(tmp_path / "out"))
    assert {k: (v["status"], v["error_code"]) for k, v in table.items()} == {
        r["id"]: ("failed", "unsafe_url") for r in rows}
    assert list(http_server.requests) == []  # not one request reached the server


@pytest.mark.usefixtures("ray_session")
def test_rows_recovered_from_pngs_keep_every_file_and_figure_of_their_run(tiny_model_path, tmp_path):
    """A run killed after its rows' PNGs and side files, before their results shards: the rerun records each row
    from its PNG with the uris of the files it left (input, reconstruction, mask, cached trajectory), the dtype its
    PNG names and the fidelity its files give; the packed dataset still has every row's mask."""
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    options = dict(mask="auto", save_inputs=True, measure_fidelity=True, report=False)
    run(manifest, str(out), tiny_model_path, **options)
    before = results(str(out))
    for shard in (out / "results").glob("*.parquet"):  # the killed run's results never reached the ledger
        shard.unlink()
    pngs = _pngs(out / "images")
    summary = run(manifest, str(out), tiny_model_path, **options)
    assert summary["recovered"] == 3 and summary["computed"] == 0
    assert _pngs(out / "images") == pngs  # recorded, not redone
    after = results(str(out))
    for rid, row in after.items():
        assert row["status"] == "ok" and row["output_uri"] == before[rid]["output_uri"]
        for column in ("input_uri", "reconstruction_uri", "mask_uri", "latent_uri", "dtype"):
            assert row[column] is not None and row[column] == before[rid][column], (rid, column)
        for column in ("psnr", "ssim"):  # measured again from the input and reconstruction PNGs
            assert row[column] == pytest.approx(before[rid][column], rel=1e-9), (rid, column)
        assert Path(row["latent_uri"]).is_file() and Path(row["mask_uri"]).is_file()
        assert row["latent_mse"] is None and row["unet_passes"] == 0  # only the engine knew these
    packed = pq.read_table(out / "dataset" / "data")
    assert packed.num_rows == 3 and all(m is not None and m["bytes"] for m in packed.column("edit_mask").to_pylist())


def test_a_recovered_row_takes_its_pngs_dtype_and_finds_its_files_without_ray(tmp_path):
    """The stages alone, on a row whose PNG a bfloat16 engine wrote while this run plans float32: the row records
    bfloat16, the mask and input beside it, and the trajectory cached under bfloat16 (found from the input PNG)."""
    import numpy as np

    from ddim_worker import latent_cache, storage
    from ddim_worker.core.images import encode_mask_png, encode_png
    from ddim_worker.outputs import OutputLayout
    from ddim_worker.columns import results_columns
    from ddim_worker.core.settings import EditSettings
    from ddim_worker.job.stages import StageContext, cache_key, png_text, prepare_batch, write_images

    ctx = StageContext(layout=OutputLayout(str(tmp_path / "out")), manifest=None, model="tiny",
                       model_fingerprint="fp0", dtype="float32", size=16)
    row = {"id": "r0", "image_url": "r0.png", "source_prompt": "a cat", "edit_prompt": "a dog",
           "input_digest": "digest-r0", **EditSettings().as_dict()}
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    layout = ctx.layout
    storage.write_bytes(layout.image("input", "r0"), encode_png(pixels))
    storage.write_bytes(layout.image("mask", "r0"), encode_mask_png(np.full((16, 16), 255, np.uint8)))
    latent = latent_cache.cache_uri(layout.latents, cache_key(ctx, pixels, row, "bfloat16"))
    storage.write_bytes(latent, b"a trajectory")
    storage.write_bytes(layout.edited("r0"), encode_png(pixels, png_text(row, ctx, "bfloat16")))
    batch = {name: np.array([value], dtype=object) for name, value in row.items()}
    batch.update(status=np.array([""], object), error_code=np.array([""], object), error=np.array([""], object))
    prepared = prepare_batch(batch, ctx)
    assert list(prepared["recovered"]) == [True]
    prepared["engine_dtype"] = np.array(["float32"], object)  # what the engine actor says of every row it passes on
    written = write_images(prepared, ctx)
    out = results_columns(written, 1, ctx.dtype)
    assert out["status"] == ["ok"] and out["dtype"] == ["bfloat16"]
    assert out["mask_uri"] == [layout.image("mask", "r0")] and out["input_uri"] == [layout.image("input", "r0")]
    assert out["latent_uri"] == [latent] and out["reconstruction_uri"] == [None]
    assert out["psnr"] == [None] and out["latent_mse"] == [None] and out["attention_control"] == [None]
