"""One home for every setting: the validator, the command line, configuration files, and the job's record."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddim_worker.job.args import build_parser, parse_args, resolve
from ddim_worker.job.config import DEFAULT_MODEL, JobConfig, all_fields
from ddim_worker.manifest import OUR_COLUMNS, row_settings
from ddim_worker.columns import RESULTS_SCHEMA
from ddim_worker.rows import RowError
from ddim_worker.core.settings import DEFAULTS, SETTING_NAMES, EditSettings, SettingError, from_values

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_textbooks_and_validated():
    assert (DEFAULTS.num_steps, DEFAULTS.start_step, DEFAULTS.guidance_scale, DEFAULTS.inversion_guidance) == \
        (50, 10, 3.5, 3.5)
    assert EditSettings(num_steps="20", start_step=3.0, inversion=" ddim ").as_dict()["num_steps"] == 20
    for bad, match in [({"num_steps": 1001}, r"num_steps must be in \[1, 1000\]"),
                       ({"start_step": 50}, r"start_step must be in \[0, num_steps=50\)"),
                       ({"guidance_scale": True}, "guidance_scale must be a number"),
                       ({"eta": float("inf")}, "eta must be finite"),
                       ({"seed": -1}, "seed must be in"),
                       ({"inversion": "sdedit"}, "inversion is not valid")]:
        with pytest.raises(SettingError, match=match):
            EditSettings(**bad)


def test_one_vocabulary_flags_columns_config_results():
    """Every edit setting is a manifest column, a result column and a flag of the same name (dashes)."""
    options = build_parser()._option_string_actions
    for name in SETTING_NAMES:
        assert name in OUR_COLUMNS and name in RESULTS_SCHEMA.names
        assert "--" + name.replace("_", "-") in options
    # the old short flags stay for one release, on the same destination, and --help says so
    assert options["--steps"].dest == "num_steps" and options["--guidance"].dest == "guidance_scale"
    assert "old name --steps: kept until 0.3" in " ".join(build_parser().format_help().split())


def test_manifest_and_engine_share_the_validator():
    """The manifest's per-row overrides go through the same rule as the engine (one validator, one range)."""
    record = {"source_prompt": "a", "edit_prompt": "b", "num_steps": 1001}
    with pytest.raises(RowError, match=r"num_steps must be in \[1, 1000\]") as err:
        row_settings(record, DEFAULTS)
    assert err.value.code == "bad_setting"
    settings = row_settings({"source_prompt": "a", "edit_prompt": "b", "eta": 0.5, "num_steps": None}, DEFAULTS)
    assert settings["eta"] == 0.5 and settings["num_steps"] == DEFAULTS.num_steps  # null means the default
    assert from_values({"start_step": float("nan")}).start_step == DEFAULTS.start_step


def test_each_default_is_written_once():
    """grep: the literal defaults of the edit settings appear once in the package and the scripts."""
    sources = [p for p in (REPO / "ddim_worker").rglob("*.py")] + list((REPO / "jobs").glob("*.py"))
    text = {p: p.read_text() for p in sources}
    for pattern in (r"option\(50,", r"option\(10,", r"option\(3\.5,", r"stable-diffusion-v1-5/stable-diffusion-v1-5\""):
        hits = [p.name for p, t in text.items() for _ in re.finditer(pattern, t)]
        assert len(hits) in (1, 2) and len(set(hits)) == 1, (pattern, hits)
    for pattern in (r"num_steps\s*[:=]\s*(int\s*=\s*)?50\b", r"guidance(_scale)?\s*[:=]\s*(float\s*=\s*)?3\.5\b",
                    r"start_step\s*[:=]\s*(int\s*=\s*)?10\b", r"runwayml"):
        hits = [str(p.relative_to(REPO)) for p, t in text.items() if re.search(pattern, t)]
        assert hits == [], (pattern, hits)


def test_run_help_names_the_default_model_and_groups():
    out = subprocess.run([sys.executable, "-m", "ddim_worker.cli", "run", "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert DEFAULT_MODEL in "".join(out.split())
    for group in ("model:", "edit settings", "storage:", "limits", "performance:", "examples:"):
        assert group in out
    version = subprocess.run([sys.executable, "-m", "ddim_worker.cli", "--version"], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout
    assert version.startswith("ddim-edit ")


def test_config_file_then_flags(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("manifest: m.parquet\noutput: out\nmodel: models/x\nsize: 64\nnum_steps: 6\n"
                      "start-step: 2\nstorage_options: {anon: true}\n")
    job = parse_args(["--config", str(config), "--num-steps", "5"])
    assert (job.edit.num_steps, job.edit.start_step, job.engine.size) == (5, 2, 64)  # the flag wins
    assert job.storage_options == {"anon": True}
    with pytest.raises(SystemExit) as done:
        parse_args(["--config", str(config), "--print-config", "--guidance", "7"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["num_steps"] == 6 and printed["guidance_scale"] == 7.0 and printed["model"] == "models/x"
    assert set(printed) == set(all_fields())
    # The printed form is a config file again, and gives the same configuration.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert resolve(["--config", str(again)])[0] == resolve(["--config", str(config), "--guidance", "7"])[0]


@pytest.mark.parametrize("text,match", [
    ("manifest: m\noutput: o\nnum_step: 5\n", "num_step is not an option"),
    ("manifest: m\noutput: o\nnum_steps: five\n", "num_steps must be an integer"),
    ("- a list\n", "must hold a mapping"),
])
def test_bad_config_files_are_clear_errors(tmp_path, capsys, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SystemExit) as done:
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    assert done.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_job_config_flat_round_trip():
    config = JobConfig.from_flat({"manifest": "m", "output": "o", "num_steps": 8, "start_step": 1, "eta": 0.3,
                                  "batch_size": 2, "compile_unet": True})
    assert JobConfig.from_flat(config.flat()) == config
    assert config.gpus_per_actor is None  # one default: decided from the cluster's resources by the driver
    assert dataclasses.asdict(config.edit)["eta"] == 0.3
    with pytest.raises(SettingError, match="batch_size must be in"):
        JobConfig.from_flat({"batch_size": 0})
    assert json.loads(json.dumps(config.flat()))  # job.json can hold it


def test_run_from_config_file_flag_wins_and_rerun_from_job_json(tiny_model_path, tmp_path, ray_session):
    """The acceptance example: a config file with num_steps 6 and start_step 2, and --num-steps 5 on the command
    line, runs with 5 and 2; results, PNG metadata and job.json say so, and job.json reruns the same job."""
    from ddim_worker.core.images import read_png_text
    from ddim_worker.job.driver import main
    from tests.jobkit import picture, png_path, results, write_manifest

    for i in range(2):
        (tmp_path / f"c{i}.png").write_bytes(picture(40 + i))
    rows = [{"id": "c0", "image_url": "c0.png", "source_prompt": "a", "edit_prompt": "b", "eta": None},
            {"id": "c1", "image_url": "c1.png", "source_prompt": "a", "edit_prompt": "c", "eta": 0.25}]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"manifest": manifest, "output": str(out),
                                                       "model": str(tiny_model_path), "size": 64, "num_steps": 6,
                                                       "start_step": 2, "batch_size": 2}))
    assert main(["--config", str(tmp_path / "job.yaml"), "--num-steps", "5"]) == 0
    table = results(str(out))
    for rid, eta in (("c0", 0.0), ("c1", 0.25)):
        r = table[rid]
        assert (r["num_steps"], r["start_step"], r["eta"], r["status"]) == (5, 2, eta, "ok")
        assert r["sampling_passes"] == 5 - 2
        settings = read_png_text(png_path(out, rid).read_bytes())["ddim_edit:settings"]
        assert "num_steps=5 start_step=2" in settings and f"eta={eta}" in settings
    record = json.loads((out / "job.json").read_text())
    assert record["config"]["num_steps"] == 5 and record["config"]["start_step"] == 2
    assert record["config"]["model"] == str(tiny_model_path)
    # Rerun from the record: the same configuration, so every row is found done and kept as it was.
    assert main(["--config", str(out / "job.json")]) == 0
    assert {r["status"] for r in results(str(out)).values()} == {"ok"}
    rerun = json.loads((out / "job.json").read_text())
    assert (rerun["computed"], rerun["done_before"]) == (0, 2)
