"""The Ray job end to end on a real local Ray, a real S3 server (SeaweedFS) and a real HTTP server on loopback."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ddim_worker.core import fastpath

from ddim_worker import storage
from ddim_worker.core.engine import EditEngine, EditRow
from ddim_worker.core.images import decode_image, encode_png, read_png_text
from ddim_worker.outputs import OutputLayout
from ddim_worker.job.stages import StageContext, png_text
from tests.jobkit import FAST, picture, png_path, results, run, write_manifest

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.make_bucket("jobs")


def test_end_to_end_on_s3(s3_server, bucket, tiny_model_path):
    opts = s3_server.storage_options
    for i in range(3):
        storage.write_bytes(f"{bucket}/e2e/in/img{i}.png", picture(i), opts)
    rows = [{"id": f"row{i}", "image_url": f"in/img{i}.png", "source_prompt": "a picture",
             "edit_prompt": f"a red picture {i}"} for i in range(3)]
    manifest = write_manifest(rows, f"{bucket}/e2e/manifest.parquet", opts)
    summary = run(manifest, f"{bucket}/e2e/out", tiny_model_path, storage_options=opts)
    assert summary["counts"] == {"ok": 3, "filtered": 0, "failed": 0, "skipped": 0}

    listed = s3_server.client().list_objects_v2(Bucket="jobs", Prefix="e2e/out/")
    keys = {obj["Key"] for obj in listed.get("Contents", [])}
    assert {f"e2e/out/{OutputLayout.relative_image('edited', f'row{i}')}" for i in range(3)} <= keys
    assert any(k.startswith("e2e/out/results/ok-") and k.endswith(".parquet") for k in keys)
    assert "e2e/out/job.json" in keys
    latents = [k for k in keys if k.startswith("e2e/out/latents/") and k.endswith(".safetensors")]
    assert len(latents) == 3  # one trajectory per distinct image
    body = s3_server.client().get_object(Bucket="jobs", Key=f"e2e/out/{OutputLayout.relative_image('edited', 'row0')}")[
        "Body"].read()
    assert Image.open(io.BytesIO(body)).size == (64, 64)
    assert read_png_text(body)["ddim_edit:edit_prompt"] == "a red picture 0"
    table = results(f"{bucket}/e2e/out", opts)
    assert all(r["status"] == "ok" and r["output_uri"].startswith("s3://jobs/e2e/out/images/") for r in
               table.values())
    job = json.loads(s3_server.client().get_object(Bucket="jobs", Key="e2e/out/job.json")["Body"].read())
    assert job["counts"]["ok"] == 3 and job["model_fingerprint"] and job["versions"]["ray"]


def test_mixed_sources_in_one_manifest(s3_server, bucket, http_server, tiny_model_path, tmp_path):
    opts = s3_server.storage_options
    (http_server.root / "mixed.png").write_bytes(picture(10))
    storage.write_bytes(f"{bucket}/mixed/a.png", picture(11), opts)
    (tmp_path / "local.jpg").write_bytes(picture(12, fmt="JPEG"))
    rows = [
        {"id": "http", "image_url": http_server.url("mixed.png"), "source_prompt": "a cat", "edit_prompt": "a dog"},
        {"id": "s3", "image_url": f"{bucket}/mixed/a.png", "source_prompt": "a cat", "edit_prompt": "a dog"},
        {"id": "local", "image_url": "local.jpg", "source_prompt": "a cat", "edit_prompt": "a dog"},
    ]
    manifest = write_manifest(rows, str(tmp_path / "manifest.parquet"))
    summary = run(manifest, str(tmp_path / "out"), tiny_model_path, storage_options=opts,
                  allow_private_network=True, allow_prefix="s3://jobs/mixed/")
    table = results(str(tmp_path / "out"))
    assert {k: v["status"] for k, v in table.items()} == {"http": "ok", "s3": "ok", "local": "ok"}, table
    assert summary["counts"]["ok"] == 3
    assert http_server.count("/mixed.png") == 1


def _struct(data: bytes) -> dict:
    return {"bytes": data, "path": None}


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.mark.parametrize("style", ["laion", "instructpix2pix", "ultraedit"])
def test_real_dataset_shapes_run_with_column_mapping(style, tiny_model_path, tmp_path, http_server):
    if style == "laion":
        for i in range(2):
            (http_server.root / f"laion{i}.png").write_bytes(picture(20 + i))
        rows = [{"URL": http_server.url(f"laion{i}.png"), "TEXT": f"a photo {i}", "WIDTH": 80,
                 "target": f"a painting {i}"} for i in range(2)]
        schema, columns = None, "image_url=URL,source_prompt=TEXT,edit_prompt=target"
    elif style == "instructpix2pix":
        rows = [{"original_image": _struct(picture(30 + i)), "original_prompt": f"a photo {i}",
                 "edit_prompt": "make it winter", "edited_prompt": f"a photo {i} in winter",
                 "edited_image": _struct(picture(40 + i))} for i in range(2)]
        schema = pa.schema([("original_image", IMAGE_STRUCT), ("original_prompt", pa.string()),
                            ("edit_prompt", pa.string()), ("edited_prompt", pa.string()),
                            ("edited_image", IMAGE_STRUCT)])
        # `edit_prompt` there is an instruction; the description we need is `edited_prompt`.
        columns = "image=original_image,source_prompt=original_prompt,edit_prompt=edited_prompt"
    else:
        rows = [{"idx": 100 + i, "source_image": _struct(picture(50 + i)), "source_caption": f"a scene {i}",
                 "target_caption": f"a scene {i} at night", "edit_prompt": "make it night"} for i in range(2)]
        schema = pa.schema([("idx", pa.int64()), ("source_image", IMAGE_STRUCT), ("source_caption", pa.string()),
                            ("target_caption", pa.string()), ("edit_prompt", pa.string())])
        columns = "id=idx,image=source_image,source_prompt=source_caption,edit_prompt=target_caption"
    manifest = write_manifest(rows, str(tmp_path / f"{style}.parquet"), schema=schema)
    summary = run(manifest, str(tmp_path / "out"), tiny_model_path, columns=columns, allow_private_network=True)
    assert summary["counts"]["ok"] == 2, results(str(tmp_path / "out"))
    table = results(str(tmp_path / "out"))
    if style == "ultraedit":
        assert set(table) == {"100", "101"}
    edit_prompts = {r["edit_prompt"] for r in table.values()}
    assert not any(p.startswith("make it") for p in edit_prompts)  # the description, not the instruction


def test_unknown_or_missing_columns_are_one_clear_error(tiny_model_path, tmp_path):
    from ddim_worker.job.driver import JobError

    manifest = write_manifest([{"URL": "x.png", "TEXT": "a", "target": "b"}], str(tmp_path / "m.parquet"))
    with pytest.raises(JobError, match="its columns are: URL, TEXT, target"):
        run(manifest, str(tmp_path / "out"), tiny_model_path)
    with pytest.raises(JobError, match="'prompt' is not one of our columns"):
        run(manifest, str(tmp_path / "out"), tiny_model_path, columns="prompt=TEXT")
    with pytest.raises(JobError, match="maps 'image_url' to 'LINK', which the manifest lacks"):
        run(manifest, str(tmp_path / "out"), tiny_model_path, columns="image_url=LINK")


@pytest.fixture(scope="module")
def default_job(tiny_model_path, tmp_path_factory):
    """One job with the default options, read by the tests below: a row with the job's settings, a row with its own
    (per-row columns), and a row whose image is missing. Returns (output folder, manifest columns)."""
    folder = tmp_path_factory.mktemp("default-job")
    (folder / "a.png").write_bytes(picture(60))
    (folder / "ok.png").write_bytes(picture(3))
    rows = [
        {"id": "defaults", "image_url": "a.png", "source_prompt": "a cat", "edit_prompt": "a dog",
         "num_steps": None, "start_step": None, "guidance_scale": None, "seed": None},
        {"id": "custom", "image_url": "a.png", "source_prompt": "a cat", "edit_prompt": "a dog",
         "num_steps": 8, "start_step": 5, "guidance_scale": 1.0, "seed": 42},
        {"id": "good", "image_url": "ok.png", "source_prompt": "a", "edit_prompt": "b"},
        {"id": "missing", "image_url": "nope.png", "source_prompt": "a", "edit_prompt": "b"},
    ]
    manifest = write_manifest(rows, str(folder / "m.parquet"))
    run(manifest, str(folder / "out"), tiny_model_path)
    return folder / "out", pq.read_schema(manifest).names


def test_per_row_overrides_are_honoured(default_job):
    out, _ = default_job
    table = results(str(out))
    d, c = table["defaults"], table["custom"]
    assert (d["num_steps"], d["start_step"], d["guidance_scale"], d["seed"]) == (6, 2, 3.5, 0)
    assert (c["num_steps"], c["start_step"], c["guidance_scale"], c["seed"]) == (8, 5, 1.0, 42)
    assert d["unet_passes"] == 2 * (6 - 2) and c["unet_passes"] == 2 * (8 - 5)
    text = read_png_text(png_path(out, "custom").read_bytes())
    assert "num_steps=8 start_step=5 guidance_scale=1.0" in text["ddim_edit:settings"]


def test_results_and_failed_manifest_for_bad_rows(default_job):
    out, columns = default_job
    table = results(str(out))
    assert table["good"]["status"] == "ok"
    assert (table["missing"]["status"], table["missing"]["error_code"]) == ("failed", "not_found")
    assert {r["status"] for r in table.values()} == {"ok", "failed"} and len(table) == 4
    failed = pq.read_table(out / "failed.parquet")
    # the manifest's own columns, untouched (its per-row settings included), and nothing of the results
    assert columns == ["id", "image_url", "source_prompt", "edit_prompt", "num_steps", "start_step",
                       "guidance_scale", "seed"]
    assert failed.column_names == columns
    assert failed.column("id").to_pylist() == ["missing"]


def test_latent_cache_is_reused_by_a_later_job(tiny_model_path, tmp_path):
    for i in range(3):
        (tmp_path / f"c{i}.png").write_bytes(picture(70 + i))
    cache = str(tmp_path / "shared-cache")
    first = [{"id": f"c{i}", "image_url": f"c{i}.png", "source_prompt": "a house", "edit_prompt": "a red house"}
             for i in range(3)]
    run(write_manifest(first, str(tmp_path / "first.parquet")), str(tmp_path / "out1"), tiny_model_path,
        latent_cache=cache)
    second = [{**r, "edit_prompt": "a blue house in winter"} for r in first]
    summary = run(write_manifest(second, str(tmp_path / "second.parquet")), str(tmp_path / "out2"),
                  tiny_model_path, latent_cache=cache)
    table = results(str(tmp_path / "out2"))
    assert all(r["cache_hit"] for r in table.values()), table
    assert all(r["inversion_passes"] == 0 and r["unet_passes"] == 6 - 2 for r in table.values())
    assert summary["inversions"] == 0 and summary["cache_hits"] == 3
    # the cached trajectory is shared, not copied: nothing new under the second output's default cache
    assert not (tmp_path / "out2" / "latents").exists()


def test_resume_redoes_only_missing_rows(tiny_model_path, tmp_path):
    for i in range(5):
        (tmp_path / f"r{i}.png").write_bytes(picture(80 + i))
    rows = [{"id": f"r{i}", "image_url": f"r{i}.png", "source_prompt": "a tree", "edit_prompt": "a tree in snow"}
            for i in range(5)]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    run(manifest, out, tiny_model_path, limit=3, results_shard_rows=1)  # a run that got through 3 rows
    before = {f"r{i}": png_path(tmp_path / "out", f"r{i}").stat().st_mtime_ns for i in range(3)}
    # a run killed after r0's PNG but before its results shard: the PNG is there, its result row is not
    shard_of_r0 = [p for p in (tmp_path / "out" / "results").glob("ok-*.parquet")
                   if pq.read_table(p).column("id").to_pylist() == ["r0"]]
    shard_of_r0[0].unlink()
    summary = run(manifest, out, tiny_model_path)
    table = results(out)
    assert summary["computed"] == 2 and summary["recovered"] == 1 and summary["done_before"] == 2
    assert {k: v["status"] for k, v in table.items()} == {f"r{i}": "ok" for i in range(5)}
    for rid in ("r0", "r1", "r2"):  # not redone
        assert png_path(tmp_path / "out", rid).stat().st_mtime_ns == before[rid]
        assert table[rid]["output_uri"] == str(png_path(tmp_path / "out", rid))
    # the same command again: nothing to do, no PNG rewritten, still one row per id
    again = run(manifest, out, tiny_model_path)
    assert again["computed"] == 0 and again["done_before"] == 5 and len(results(out)) == 5
    # --overwrite redoes everything
    summary = run(manifest, out, tiny_model_path, overwrite=True)
    assert summary["computed"] == 5 and summary["counts"]["ok"] == 5
    assert len(results(out)) == 5


def test_job_output_equals_the_engine_in_process(tiny_model_path, tmp_path):
    rows = []
    for i in range(3):
        (tmp_path / f"q{i}.png").write_bytes(picture(90 + i))
        rows.append({"id": f"q{i}", "image_url": f"q{i}.png", "source_prompt": "a bird",
                     "edit_prompt": f"a blue bird {i}", "seed": i})
    run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path)
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64)
    # Bitwise equality needs the same reduction order: the job's CPU actor runs torch on 1 thread (--cpus-per-actor).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        edits = engine.edit([
            EditRow(decode_image((tmp_path / f"q{i}.png").read_bytes()), "a bird", f"a blue bird {i}",
                    num_steps=FAST["num_steps"], start_step=FAST["start_step"], seed=i) for i in range(3)])
    finally:
        torch.set_num_threads(threads)
    table = results(str(tmp_path / "out"))
    ctx = StageContext(layout=OutputLayout(""), manifest=None, model=str(tiny_model_path),
                       model_fingerprint=engine.fingerprint, dtype="float32", size=64)
    for i, out in enumerate(edits):
        row = {**table[f"q{i}"]}
        job_png = png_path(tmp_path / "out", f"q{i}").read_bytes()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(job_png))), out.image)
        assert job_png == encode_png(out.image, png_text(row, ctx))


def test_fast_path_flags_reach_the_engine_actors(tiny_model_path, tmp_path):
    """--attention math --channels-last: the job's PNG is the bytes of an in-process engine switched the same way
    (and not those of the default kernels, so the flags cannot have been dropped on the way to the actor)."""
    (tmp_path / "f.png").write_bytes(picture(31))
    row = {"id": "f", "image_url": "f.png", "source_prompt": "a bird", "edit_prompt": "a red bird", "seed": 3}
    run(write_manifest([row], str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path,
        attention="math", channels_last=True)
    job_image = np.asarray(Image.open(png_path(tmp_path / "out", "f")))
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=FAST.get("batch_size"))
    edit = EditRow(decode_image((tmp_path / "f.png").read_bytes()), "a bird", "a red bird",
                   num_steps=FAST["num_steps"], start_step=FAST["start_step"], seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's CPU actor
    try:
        default = engine.edit([edit])[0].image
        fastpath.apply_fast_path(engine.pipe, attention="math", channels_last=True, compile_unet=False)
        switched = engine.edit([edit])[0].image
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(job_image, switched)
    assert not np.array_equal(job_image, default)  # the default kernels give other bytes (26 of them, here)
    assert np.abs(switched.astype(int) - default.astype(int)).max() <= 2  # other kernels, same maths


def test_wrong_model_path_fails_fast(tmp_path):
    from ddim_worker.job.driver import JobError

    (tmp_path / "a.png").write_bytes(picture(1))
    manifest = write_manifest([{"image_url": "a.png", "source_prompt": "a", "edit_prompt": "b"}],
                              str(tmp_path / "m.parquet"))
    with pytest.raises(JobError, match="model folder .*does not exist"):
        run(manifest, str(tmp_path / "out"), tmp_path / "no-such-model")


def test_fidelity_columns_inputs_and_report(tiny_model_path, tmp_path):
    from html.parser import HTMLParser

    for i in range(2):
        (tmp_path / f"v{i}.png").write_bytes(picture(300 + i))
    rows = [{"id": f"v{i}", "image_url": f"v{i}.png", "source_prompt": "a cat", "edit_prompt": "a dog",
             "inversion": method} for i, method in enumerate(("ddim", "fixed-point:2"))]
    rows.append({"id": "broken", "image_url": "nope.png", "source_prompt": "a cat", "edit_prompt": "a dog",
                 "inversion": None})
    summary = run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path,
                  measure_fidelity=True)
    table = results(str(tmp_path / "out"))
    for rid in ("v0", "v1"):
        r = table[rid]
        assert r["psnr"] is not None and 0 < r["ssim"] <= 1 and r["latent_mse"] >= 0
        assert r["unet_passes"] == r["inversion_passes"] + r["sampling_passes"]
        for kind in ("input", "edited", "reconstruction"):
            assert png_path(tmp_path / "out", rid, kind).exists()
    assert table["v1"]["inversion_passes"] == 3 * (6 - 2)  # fixed-point:2 costs 1 + 2 evaluations per step
    assert table["v0"]["sampling_passes"] == 2 * (6 - 2)  # the edit and the reconstruction

    class Cards(HTMLParser):
        ids: list[str] = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "article" and "card" in (attrs.get("class") or ""):
                self.ids.append(attrs["data-id"])

    parser = Cards()
    parser.feed((tmp_path / "out" / "report.html").read_text())
    assert sorted(parser.ids) == ["broken", "v0", "v1"]
    assert summary["outputs"]["report"].endswith("report.html")
    assert (tmp_path / "out" / "contact-sheet.png").exists()


def test_gpu_batch_size_from_free_memory(ray_session):
    """Without --batch-size a GPU job sizes its batches from an engine GPU's free memory
    (``fastpath.batch_size_before_load``, tested in test_fastpath); where no GPU answers (this CPU-only Ray), it says
    so and keeps the default."""
    from ddim_worker.job import cluster
    from ddim_worker.job.config import JobConfig
    from ddim_worker.core.settings import DEFAULT_BATCH_SIZE

    config = JobConfig(manifest="unused", output="unused", gpus_per_actor=1.0)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    job_log = logging.getLogger("ddim_edit.job")
    job_log.addHandler(handler)
    try:
        device = cluster.probe_engine_device(config, 1.0, timeout_s=2)
        assert device is None
        assert cluster.batch_size_for(config, 1.0, device) == DEFAULT_BATCH_SIZE["cuda"]
    finally:
        job_log.removeHandler(handler)
    assert any("no engine worker said what device it has" in m for m in messages), messages
    # With a device that answers, the batch comes from its free memory (80 GB free, bf16, 512 px: capped at 32).
    answered = cluster.EngineDevice(free_bytes=80 * 2**30, dtype="bfloat16")
    assert cluster.batch_size_for(config, 1.0, answered) == 32
