"""The edited dataset, packed: 600 rows with the user's columns, sized shards, a card, storage that scales."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ddim_worker.job.driver import JobError
from ddim_worker.job.sizes import parse_size
from ddim_worker.job.pack_command import pack_output
from tests.jobkit import picture, run, write_manifest

needs_ray = pytest.mark.usefixtures("ray_session")

IMAGES, EDITS = 150, 4


def _manifest(tmp_path: Path) -> str:
    rows = []
    for i in range(IMAGES):
        data = picture(700 + i, size=64)
        for k in range(EDITS):
            rows.append({"id": f"d{i:03d}-{k}", "image": {"bytes": data, "path": None}, "source_prompt": "a picture",
                         "edit_prompt": f"a picture, edit {k}", "label": i % 7, "score": i / 10 + k})
    schema = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("source_prompt", pa.string()), ("edit_prompt", pa.string()), ("label", pa.int64()),
                        ("score", pa.float64())])
    return write_manifest(rows, str(tmp_path / "m.parquet"), schema=schema)


def _load(folder: Path):
    import datasets  # offline: tests.support.env sets HF_DATASETS_OFFLINE before anything imports datasets

    return datasets.load_dataset(str(folder), split="train")


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


FAST = dict(num_steps=3, start_step=1, batch_size=8, calls_per_task=4, results_shard_rows=64)


@needs_ray
def test_six_hundred_rows_pack_into_a_dataset_with_its_card(tiny_model_path, tmp_path):
    manifest = _manifest(tmp_path)
    out = tmp_path / "out"
    total = IMAGES * EDITS

    # A first run of half the manifest (a partial run: it packs nothing), then a rerun that would change the
    # results' schema: refused, nothing written.
    first = run(manifest, str(out), tiny_model_path, limit=total // 2, **FAST)
    assert first["dataset"] is None and "--limit" in first["dataset_not_packed"]
    assert not (out / "dataset").exists()
    shards_before = sorted(p.name for p in (out / "results").glob("*.parquet"))
    with pytest.raises(JobError, match=r"--embed-images differs .* --overwrite"):
        run(manifest, str(out), tiny_model_path, embed_images=True, **FAST)
    assert sorted(p.name for p in (out / "results").glob("*.parquet")) == shards_before

    summary = run(manifest, str(out), tiny_model_path, **FAST)
    assert summary["counts"] == {"ok": total, "filtered": 0, "failed": 0, "skipped": 0}

    # The dataset: 600 rows, PIL images, the user's columns with their types, the card's counts right.
    ds = _load(out / "dataset")
    assert ds.num_rows == total and len(set(ds["id"])) == total
    assert ds.features["edited_image"].__class__.__name__ == "Image"
    # the manifest's own "score" meets ours (the scorer's, null without one): the manifest's is renamed, kept whole
    assert ds.features["label"].dtype == "int64" and ds.features["manifest_score"].dtype == "float64"
    row = ds[0]
    assert row["edited_image"].size == (64, 64) and row["edited_image"].mode == "RGB"
    assert isinstance(row["label"], int) and isinstance(row["manifest_score"], float) and row["score"] is None
    assert {"source_prompt", "edit_prompt", "num_steps", "start_step", "guidance_scale", "seed"} <= set(ds.features)
    header, body = _card(out / "dataset")
    assert header["dataset_info"]["splits"][0]["num_examples"] == total
    version = json.loads((out / "dataset" / ".pack.json").read_text())["version"]
    assert header["configs"][0]["data_files"][0]["path"] == f"data/{version}/train-*"
    assert [p.name for p in (out / "dataset" / "data").iterdir()] == [version]  # one packing's folder
    assert f"**Rows**: {total}" in body and "embedded in the manifest" in body and "ddim-edit run" in body
    assert summary["dataset"]["rows"] == total and summary["outputs"]["dataset"] == str(out / "dataset")

    # Storage that scales: images in prefix folders, inputs only for the report's sample, bytes in job.json.
    images = list((out / "images").iterdir())
    assert images and all(p.is_dir() for p in images)
    assert len(list((out / "images").rglob("*.png"))) == total
    inputs = len(list((out / "inputs").rglob("*.png"))) if (out / "inputs").exists() else 0
    results = pq.read_table(out / "results").to_pylist()
    assert inputs == sum(bool(r["input_uri"]) for r in results) and 0 < inputs < total // 3
    written = summary["bytes_written"]
    assert written["images"] > 0 and written["results"] > 0 and written["dataset"] > written["images"] // 2
    assert written["per_row"]["images"] == round(written["images"] / summary["computed"])

    # Packed again with small files: about total bytes / 200 KB files, none over twice that, 600 rows still.
    again = pack_output(str(out), max_shard_size="200KB")
    files = sorted((out / "dataset" / "data").rglob("*.parquet"))
    sizes = [f.stat().st_size for f in files]
    limit = parse_size("200KB")
    assert len(files) == again["files"] and len(files) >= 2
    assert abs(len(files) - sum(sizes) / limit) <= max(2.0, 0.1 * len(files)) and max(sizes) <= 2 * limit
    assert all(f.name.endswith(f"-of-{len(files):05d}.parquet") for f in files)
    assert _load(out / "dataset").num_rows == total
    assert pack_output(str(out), max_shard_size="200KB")["unchanged"]  # nothing changed: not packed again
    print(f"pack: {total} rows, {sum(sizes):,} bytes in {len(files)} files at 200KB; default packing "
          f"{summary['dataset']['files']} file(s), {summary['dataset']['bytes']:,} bytes; inputs kept {inputs}")


@needs_ray
def test_no_latent_cache_and_no_saved_images(tiny_model_path, tmp_path):
    rows = []
    for i in range(4):
        (tmp_path / f"n{i}.png").write_bytes(picture(900 + i))
        rows.append({"id": f"n{i}", "image_url": f"n{i}.png", "source_prompt": "a", "edit_prompt": "b"})
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    summary = run(manifest, str(out), tiny_model_path, latent_cache="off", save_images=False, report=False)
    assert summary["counts"]["ok"] == 4 and summary["bytes_written"]["latents"] == 0
    assert not list(out.rglob("*.safetensors")) and not (out / "images").exists()
    ds = _load(out / "dataset")  # the edited images travel in the results, and the dataset has them
    assert ds.num_rows == 4 and ds[0]["edited_image"].size == (64, 64)
    again = run(manifest, str(out), tiny_model_path, latent_cache="off", save_images=False, report=False)
    assert again["computed"] == 0 and again["done_before"] == 4  # the ledger, not the cache, says what is done
    record = json.loads((out / "job.json").read_text())
    assert record["config"]["latent_cache"] == "off" and record["dataset"]["unchanged"]


def test_card_escapes_column_names_settings_and_the_command(tmp_path):
    """Column names, settings and the command are the user's text: none of them may break the card's Markdown (a
    table cell split by ``|``, a code span closed by a backtick, the command's fence closed by its own ```), and
    ``datasets`` still reads the YAML header."""
    from collections import Counter

    from markdown_it import MarkdownIt

    from ddim_worker.job.pack import dataset_card
    from ddim_worker.job.shards import EDITED_IMAGE

    odd = ["a|b", "x`y", "``z", "two\nlines"]
    schema = pa.schema([EDITED_IMAGE, ("id", pa.string()), *((name, pa.int64()) for name in odd)])
    command = "python jobs/edit.py m.parquet --edit-prompt '```a `b` c\n```\nnot code?' --output out"
    card = {"command": command, "manifest": "s3://b/m|n`.parquet", "model": "org/model",
            "settings": {"num_steps": 50, "edit_prompt": "a | b `c`"}}
    folder = tmp_path / "dataset"
    (folder / "data" / "v1").mkdir(parents=True)
    picture_png = picture(5, size=16)
    table = pa.table({"edited_image": [{"bytes": picture_png, "path": "r.png"}], "id": ["r"],
                      **{name: [i] for i, name in enumerate(odd)}}, schema=schema)
    pq.write_table(table, folder / "data" / "v1" / "train-00000-of-00001.parquet")
    text = dataset_card(schema, 1, 1, 100, Counter({"embedded in the manifest": 1}), card, "v1")
    (folder / "README.md").write_text(text)
    header, body = _card(folder)
    assert [f["name"] for f in header["dataset_info"]["features"]] == ["edited_image", "id", *odd]

    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    fences = [t for t in tokens if t.type == "fence"]
    assert fences[0].info == "sh" and fences[0].content == command + "\n"  # the whole command, in one block
    inline = [c.content for t in tokens if t.type == "inline" for c in t.children or [] if c.type == "code_inline"]
    assert {"a|b", "x`y", "``z", "two lines", "s3://b/m|n`.parquet"} <= set(inline)
    cells_per_row, cells = [], 0
    for t in tokens:
        cells += t.type in ("th_open", "td_open")
        if t.type == "tr_close":
            cells_per_row, cells = [*cells_per_row, cells], 0
    assert cells_per_row == [2, 2, 2]  # the settings table: header, num_steps, edit_prompt; no cell split by `|`
    assert "a | b `c`" in inline

    ds = _load(folder)
    assert ds.column_names == ["edited_image", "id", *odd] and ds[0]["a|b"] == 0 and ds[0]["two\nlines"] == 3
