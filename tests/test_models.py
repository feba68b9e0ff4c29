"""Models: refusing schedulers the engine would run wrong, Hub checks before Ray, fingerprints, the copy lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_worker import model_source
from ddim_worker.core.denoiser import GuidedUNet
from ddim_worker.core.engine import EditEngine, EditRow
from ddim_worker.model_source import check_model, model_fingerprint
from ddim_worker.core.models import UnsupportedModelError, check_scheduler_config
from tests.jobkit import FAST, picture, results, run, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _with_scheduler(tiny_model_path: Path, target: Path, **changes) -> Path:
    shutil.copytree(tiny_model_path, target)
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return target


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddim_worker.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.parametrize("setting,value", [("prediction_type", "v_prediction"), ("prediction_type", "sample"),
                                           ("rescale_betas_zero_snr", True), ("thresholding", True)])
def test_scheduler_settings_the_engine_cannot_run_are_refused(setting, value):
    with pytest.raises(UnsupportedModelError, match=setting):
        check_scheduler_config({setting: value})
    check_scheduler_config({"prediction_type": "epsilon", "clip_sample": False})  # SD 1.x: fine


def test_v_prediction_refused_before_any_unet_call(tiny_model_path, tmp_path):
    vpred = _with_scheduler(tiny_model_path, tmp_path / "vpred", prediction_type="v_prediction")
    with pytest.raises(UnsupportedModelError, match="prediction_type='v_prediction'"):
        check_model(str(vpred))
    # An already-loaded pipeline whose scheduler says v_prediction: the engine refuses it before any UNet call.
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64)
    calls = GuidedUNet(engine.pipe.unet)
    engine.pipe.scheduler.register_to_config(prediction_type="v_prediction")
    with pytest.raises(UnsupportedModelError, match="prediction_type"):
        EditEngine(engine.pipe, size=64)
    assert calls.calls == 0
    image = tmp_path / "a.png"
    image.write_bytes(picture(1))
    edit = _cli("edit", str(image), "--source-prompt", "a", "--edit-prompt", "b", "--model", str(vpred), "--size",
                "64", "--num-steps", "4", "--start-step", "1", "--out", str(tmp_path / "o.png"))
    assert edit.returncode == 2 and "prediction_type" in edit.stderr, edit.stderr
    assert not (tmp_path / "o.png").exists()
    manifest = write_manifest([{"image_url": "a.png", "source_prompt": "a", "edit_prompt": "b"}],
                              str(tmp_path / "m.parquet"))
    job = _cli("run", manifest, "--output", str(tmp_path / "out"), "--model", str(vpred), "--size", "64")
    assert job.returncode == 2 and "prediction_type" in job.stderr, job.stderr
    assert not (tmp_path / "out" / "images").exists()  # refused before Ray started: nothing ran


def test_hub_model_checked_before_ray(tmp_path):
    (tmp_path / "a.png").write_bytes(picture(1))
    manifest = write_manifest([{"image_url": "a.png", "source_prompt": "a", "edit_prompt": "b"}],
                              str(tmp_path / "m.parquet"))
    job = _cli("run", manifest, "--output", str(tmp_path / "out"), "--model", "nobody-here/no-such-model",
               "--revision", "v2")
    assert job.returncode == 2, job.stderr
    assert "cannot resolve model 'nobody-here/no-such-model' at revision 'v2'" in job.stderr
    assert "Started a local Ray instance" not in job.stderr and not (tmp_path / "out" / "images").exists()


def test_hub_fingerprint_follows_the_resolved_revision(tiny_model_path):
    one = model_fingerprint("org/model", hub_commit="a" * 40)
    assert one == model_fingerprint("org/model", hub_commit="a" * 40)
    assert one != model_fingerprint("org/model", hub_commit="b" * 40)  # a new revision: new cache keys
    assert model_fingerprint(str(tiny_model_path)) != one


def test_model_copy_from_s3_is_locked_per_node(tiny_model_path, s3_server, tmp_path, monkeypatch):
    """Two engine actors on one node copying the same s3:// model: one copies, the other waits and reuses it."""
    import fsspec

    bucket = s3_server.make_bucket("models-lock")
    uri = f"{bucket}/tiny"
    fs, root = fsspec.core.url_to_fs(uri, **s3_server.storage_options)
    fs.put(str(tiny_model_path) + "/", root, recursive=True)
    monkeypatch.setattr(model_source, "MODEL_CACHE_DIR", tmp_path / "cache")
    barrier, found, errors = threading.Barrier(3), [], []

    def load() -> None:
        barrier.wait()
        try:
            found.append(model_source.local_model_path(uri, s3_server.storage_options))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(set(found)) == 1 and len(found) == 3
    assert (Path(found[0]) / "model_index.json").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".partial-" in p.name]


def test_denoiser_counters_stay_bounded(tiny_model_path):
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=2)
    rows = [EditRow(np.full((64, 64, 3), 40 * i, np.uint8), "a", "b", num_steps=5, start_step=1) for i in range(3)]
    for _ in range(2):
        engine.edit(rows)
    unet = engine.guided_unet
    assert unet.calls == 2 * 2 * 2 * 4  # 2 edits x 2 padded chunks x (invert + sample) x (n - s)
    assert dict(unet.call_sizes) == {4: unet.calls} and unet.samples == 4 * unet.calls
    assert not hasattr(unet, "batch_sizes")


def test_mixed_null_text_iterations_in_one_batch(tiny_model_path):
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=2)  # batch-invariant bytes
    image = np.asarray(torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)).mul(255).to(torch.uint8))
    rows = [EditRow(image, "a cat", "a dog", num_steps=4, start_step=1, inversion=f"null-text:{k}") for k in (1, 3)]
    one, three = engine.edit(rows)
    assert three.inversion_passes > one.inversion_passes
    alone = engine.edit([rows[1]])[0]
    assert alone.inversion_passes == three.inversion_passes
    np.testing.assert_array_equal(alone.image, three.image)  # as if it had been edited alone


def test_mixed_null_text_iterations_in_the_job(tiny_model_path, tmp_path):
    (tmp_path / "a.png").write_bytes(picture(5))
    rows = [{"id": f"n{k}", "image_url": "a.png", "source_prompt": "a cat", "edit_prompt": "a dog",
             "inversion": f"null-text:{k}"} for k in (1, 3)]
    run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path)
    table = results(str(tmp_path / "out"))
    assert table["n3"]["inversion_passes"] > table["n1"]["inversion_passes"] > 0
    assert table["n1"]["latent_uri"] != table["n3"]["latent_uri"]
    assert Path(table["n1"]["latent_uri"]).exists() and Path(table["n3"]["latent_uri"]).exists()
    assert FAST["num_steps"] == table["n1"]["num_steps"]
