"""``ddim-edit run``'s command line, built from the options' declarations, plus configuration files.

Precedence: an option's declared default < the ``--config`` file < the command line. Flags are the options' names
with dashes (``--num-steps``), the same names the manifest's per-row columns and config files use (with
underscores or dashes). ``--print-config`` prints the effective configuration as YAML; ``job.json`` records the same
mapping under ``config``, and ``--config OUT/job.json`` reruns a job from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ddim_worker.job.config import JobConfig, all_fields
from ddim_worker.core.settings import SettingError, field_kind

#: ``--help`` groups, in order, with a line each.
GROUPS = {
    "job": "job: what to run and where",
    "model": "model",
    "edit": "edit settings (defaults for every row; a manifest column of the same name overrides them per row)",
    "candidates": "candidates and the scorer: only edits that worked reach the dataset",
    "storage": "storage",
    "limits": "limits and URL policy (bad input fails its row only)",
    "performance": "performance",
}

#: Old flag names, accepted until release 0.3 and named in ``--help``.
ALIAS_NOTE = "old name {aliases}: kept until 0.3"

EXAMPLES = """\
examples:
  ddim-edit run manifest.parquet --output s3://bucket/edits --num-steps 50 --start-step 10
  ddim-edit run --config job.yaml --num-steps 20        # the file's values, the flag wins
  ddim-edit run --config job.yaml --print-config        # the effective configuration, as YAML
  ddim-edit run --config out/job.json                   # rerun a job from its record
  ray job submit --working-dir . -- python jobs/edit.py manifest.parquet --output s3://bucket/edits

exit codes:
  0  every manifest row is accounted for in OUTPUT/results (ok, filtered, or failed with its error_code)
  2  the job cannot run: bad manifest, model or output, another run holds the output (or took it
     from this run), no engine actor could start
     (one line on stderr; OUTPUT/job.json says why)
  3  stopped early (--max-failed-fraction); the rows not run are recorded as skipped
  4  rows of the manifest have no result row (the count is on the last line and in OUTPUT/job.json's "missing");
     rerun the same command
"""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _default_text(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = spec.default_factory()  # type: ignore[misc]
    else:
        return ""
    if default is None or default == {} or isinstance(default, bool):
        return ""
    return f" (default: {default!r})" if isinstance(default, str) else f" (default: {default})"


def add_field_argument(group: Any, name: str, spec: dataclasses.Field) -> None:
    """One option's flag (and old names) from its declaration: type, choices, help with the default."""
    meta, kind = spec.metadata, field_kind(spec)
    names = [meta.get("flag") or flag(name), *meta.get("aliases", ())]
    text = meta.get("help", "") + _default_text(spec)
    if meta.get("aliases"):
        text += "; " + ALIAS_NOTE.format(aliases=", ".join(meta["aliases"]))
    kwargs: dict[str, Any] = {"dest": name, "help": text}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = {int: int, float: float, str: str, dict: _json_mapping}[kind]
        kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X", str: "TEXT", dict: "JSON"}[kind]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
            del kwargs["metavar"]
        if meta.get("when_named") is not None:  # the flag alone means this value (``--cross-replace``)
            kwargs.update(nargs="?", const=meta["when_named"])
    group.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddim-edit run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Edit every row of a Parquet manifest with DDIM inversion on a Ray cluster: edited PNGs, cached "
                    "inversion latents and a results table under --output.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("manifest_pos", nargs="?", metavar="MANIFEST", help="the manifest (or --manifest / config)")
    parser.add_argument("--config", metavar="FILE", help="YAML (or JSON, e.g. a job's job.json) of options; the "
                                                         "command line overrides it")
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML, "
                                                                    "then exit")
    parser.add_argument("--smoke-test", action="store_true", help="one row only (same as --limit 1)")
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for name, spec in all_fields().items():
        add_field_argument(groups[spec.metadata.get("group", "job")], name, spec)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """A config file's options by their names (dashes or underscores; old flag names too).

    A ``job.json`` written by a job is accepted as it is: its ``config`` mapping is the job's configuration.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingError("config", f"cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise SettingError("config", f"{path} is not valid YAML: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "counts" in data:
        data = data["config"]
    if not isinstance(data, dict):
        raise SettingError("config", f"{path} must hold a mapping of option: value")
    aliases = {alias.lstrip("-").replace("-", "_"): name for name, spec in all_fields().items()
               for alias in spec.metadata.get("aliases", ())}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        out[aliases.get(name, name)] = value
    return out


def resolve(argv: list[str] | None = None) -> tuple[JobConfig, bool]:
    """The effective configuration and whether only to print it. Exits with status 2 on a bad option."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        values = read_config_file(args.pop("config")) if "config" in args else {}
        positional = args.pop("manifest_pos", None)
        print_only = args.pop("print_config", False)
        if args.pop("smoke_test", False):
            args["limit"] = 1
        values.update(args)
        if positional is not None:
            values["manifest"] = positional
        config = JobConfig.from_flat(values)
    except (SettingError, TypeError) as exc:
        parser.error(str(exc))
    missing = [name for name in ("manifest", "output") if not getattr(config, name)]
    if missing and not print_only:
        parser.error(f"{' and '.join(flag(m) for m in missing)} must be given (on the command line or in --config)")
    return config, print_only


def config_yaml(config: JobConfig) -> str:
    return yaml.safe_dump(config.flat(), sort_keys=False, default_flow_style=False)


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """The configuration, printing it and exiting when ``--print-config`` is given."""
    config, print_only = resolve(argv)
    if print_only:
        sys.stdout.write(config_yaml(config))
        raise SystemExit(0)
    return config
