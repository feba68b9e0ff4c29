"""The one row schema: a column declared once is in the results, the summary and the packed dataset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from ddim_worker import columns
from ddim_worker.columns import ENGINE, RESULTS, Column
from ddim_worker.core.settings import SETTING_NAMES, EditSettings
from tests.jobkit import picture, result_rows, run, write_manifest


def edited_brightness(row: object, out: object) -> float:
    """A dummy engine output: the mean value of the edited image (module level: Ray pickles it by reference)."""
    return float(np.asarray(out.image).mean())


#: The dummy output, in one declaration: computed from each edit, kept for ok rows, a column of the dataset.
DUMMY = Column("dummy_brightness", pa.float64(), ENGINE, dataset=True, ok_only=True, compute=edited_brightness)


def test_every_declaration_has_one_place():
    """Settings come from ``EditSettings``; results, summary and dataset columns are computed from the declarations."""
    schema = columns.current()
    assert [c.name for c in schema.columns].count("image_bytes") == 1  # one name, one meaning
    for name in SETTING_NAMES:
        spec = next(f for f in dataclasses.fields(EditSettings) if f.name == name)
        assert schema[name].dataset and schema.results_schema.field(name).type == columns._setting_type(spec)
    assert set(schema.summary_fields) >= {"manifest_row", "status", "unet_passes", "recovered", "results_bytes"}
    extended = schema.extended(DUMMY)
    assert extended.results_schema.names[-1] == "dummy_brightness" and "dummy_brightness" in extended.dataset_columns
    assert DUMMY in extended.engine_values
    with pytest.raises(ValueError, match="declared twice"):
        schema.extended(Column("status", pa.string(), RESULTS))
    with pytest.raises(ValueError, match="payload"):
        Column("pixels2", None, ENGINE)


def test_results_columns_follow_the_declarations():
    """Outputs are 0 or null where their stage did not run, ``ok_only`` ones null on failed rows, and results hooks
    compute from what came before them."""
    batch = {"status": np.array(["ok", "failed"], object), "error_code": np.array(["", "engine_error"], object),
             "error": np.array(["", "boom"], object), "inversion_passes": np.array([4, 0]),
             "sampling_passes": np.array([4, 0]), "dummy_brightness": np.array([12.5, np.nan]),
             "guidance_scale": np.array([3.5, 3.5]), "inversion_guidance": np.array([1.0, 1.0])}
    out = columns.results_columns(batch, 2, "float32", columns.current().extended(DUMMY), "r000001-a01")
    assert out["dummy_brightness"] == [12.5, None] and out["unet_passes"] == [8, 0]
    assert out["ideal_unet_samples"] == [4 + 8, 0] and out["source_passes"] == [0, 0]
    assert out["error_code"] == [None, "engine_error"] and out["latent_uri"] == [None, None]
    assert out["dtype"] == ["float32", "float32"] and out["generation"] == ["r000001-a01"] * 2


@pytest.mark.usefixtures("ray_session")
def test_a_column_declared_once_reaches_the_results_and_the_dataset(tiny_model_path, tmp_path, monkeypatch):
    """Extend the schema by one declaration (its hook computes it from each edit): a small job records it in every
    result row and packs it into the dataset, typed, beside the settings."""
    import datasets  # offline: tests.support.env sets HF_DATASETS_OFFLINE

    monkeypatch.setattr(columns, "ROW_SCHEMA", columns.ROW_SCHEMA.extended(DUMMY))
    (tmp_path / "a.png").write_bytes(picture(61))
    rows = [{"id": f"r{k}", "image_url": "a.png" if k < 2 else "missing.png", "source_prompt": "a cat",
             "edit_prompt": f"a dog {k}"} for k in range(3)]
    out = tmp_path / "out"
    run(write_manifest(rows, str(tmp_path / "m.parquet")), str(out), tiny_model_path)

    found = {r["id"]: r for r in result_rows(str(out))}
    assert [found[f"r{k}"]["status"] for k in range(3)] == ["ok", "ok", "failed"]
    assert all(0.0 <= found[f"r{k}"]["dummy_brightness"] <= 255.0 for k in range(2))
    assert found["r2"]["dummy_brightness"] is None  # ok_only: a failed row has none
    dataset = datasets.load_dataset(str(out / "dataset"), split="train")
    assert dataset.features["dummy_brightness"].dtype == "float64" and len(dataset) == 2
    packed = {r["id"]: r["dummy_brightness"] for r in dataset}
    assert packed == {k: found[k]["dummy_brightness"] for k in ("r0", "r1")}


def test_engine_rows_take_every_setting_with_its_default():
    """``EditRow`` declares the settings again for the engine (its own fields): every one, with the same default."""
    from ddim_worker.core.engine import EditRow
    from ddim_worker.core.settings import DEFAULTS

    fields = {f.name: f.default for f in dataclasses.fields(EditRow)}
    assert {name: fields.get(name) for name in SETTING_NAMES} == DEFAULTS.as_dict()


def test_an_all_null_column_read_back_as_nan_floats_is_null_again():
    """Ray Data reads a block's all-null text or integer column as NaN floats; the stages make it null again, so the
    block still concatenates with blocks that hold text there (float columns keep their NaN)."""
    import numpy as np

    from ddim_worker.columns import current

    batch = {"negative_prompt": np.full(3, np.nan, np.float32), "num_steps": np.full(3, np.nan),
             "psnr": np.full(3, np.nan), "source_prompt": np.array(["a", None, "b"], dtype=object)}
    out = current().restore_nulls(batch)
    assert out["negative_prompt"].dtype == object and list(out["negative_prompt"]) == [None] * 3
    assert list(out["num_steps"]) == [None] * 3
    assert out["psnr"].dtype.kind == "f" and out["source_prompt"] is batch["source_prompt"]
