"""The options of the bundle commands mean what they say: checked before any work, a mistake named in one line.

``python -m monai.bundle run --config_file ... --key value`` hands every ``--key value`` to MONAI through ``fire``,
which merges it into the config whatever it is: a typo (``--strid 10``) became a new, unused key; ``--use_ema false``
reached the config as the string ``"false"``, which is true; ``--help`` ran the workflow. Here:

* :func:`flag` reads a boolean option (``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0`` in any case,
  or a real bool); the configs read every boolean option through it.
* :func:`check` refuses, before any work, an option the workflow's config files do not define (with the closest
  name: ``unknown option --strid (did you mean --stride?)``), a value of the wrong type (``--stride must be an
  integer, got 'ten'``) and a bad AnoFPDM option (``--median_kernel must be odd ...``, through
  :class:`~anofpdm_monai.settings.AnoFPDMSettings`).
* :func:`help_text` lists a workflow's options and their defaults (``--help``).
* :func:`check_command_line`, called first in each workflow's ``initialize``, does both for the bundle command: it
  reads the ``--key value`` options from ``sys.argv`` the way ``fire`` does (MONAI's ``run`` does not pass them on
  to the config). :func:`anofpdm_monai.apps.workflow.run_workflow` checks its keyword arguments with :func:`check`
  itself.

An option's type is its default's in the config files (``"seed": 0``: an integer), or :data:`OPTION_KINDS` where
the default does not tell (``null``, an expression). Values in MONAI's own syntax (``"$expr"``, ``"@id"``,
``"%file#id"``) are left to MONAI. Only top-level keys are checked: ``--network_def#dropout 0.2`` is accepted when
``network_def`` exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_ARGUMENTS",
    "HELP_KEYS",
    "OPTION_KINDS",
    "flag",
    "optional_flag",
    "config_defaults",
    "option_kind",
    "check",
    "wants_help",
    "help_text",
    "parse_command_line",
    "command_line",
    "check_command_line",
]

#: arguments of MONAI's ``run`` / ``run_workflow`` / ``ConfigWorkflow`` rather than config keys
RUN_ARGUMENTS = (
    "config_file",
    "meta_file",
    "logging_file",
    "run_id",
    "init_id",
    "final_id",
    "tracking",
    "args_file",
    "workflow_name",
    "workflow_type",
    "properties_path",
)
#: ``--help`` and ``-h`` (fire passes both on as keyword arguments: ``run`` takes ``**override``)
HELP_KEYS = ("help", "h")
#: keys that are not options a user sets
_STRUCTURE = ("imports", "initialize", "run", "finalize")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_ID_SEPARATORS = re.compile(r"::|#")

#: the type of each option whose default does not tell it (``null`` or an expression); ``?``: null allowed.
#: Kinds: bool, int, number, str, path (a string or os.PathLike), int_list, number_list, str_list, any.
OPTION_KINDS: dict[str, str] = {
    "amp": "bool",
    "device": "any",  # "cpu", "cuda:1" or a torch.device
    "datalist": "any",  # a file or a datalist mapping
    "tolerance": "number",
    "guidance_scale": "number?",
    "time_limit": "number?",
    "max_iterations": "int?",
    "num_steps": "int?",
    "train_max_timestep": "int?",
    "max_timestep": "int?",
    # AnoFPDM options (anofpdm_monai.settings.AnoFPDMSettings checks their values)
    "t_max": "int?",
    "stride": "int?",
    "timesteps": "int_list?",
    "median_kernel": "int?",
    "min_component_size": "int?",
    "quantile_range": "number_list?",
    "forward": "str?",
    "reference": "str?",
    "divergence": "str?",
    "end_step": "str?",
    "aggregation": "str?",
    "health_score": "str?",
    "divergence_baseline": "str?",
    "precision": "str?",
    "end_step_inclusive": "bool?",
    "inversion_eps": "str?",
    "inversion_timing": "str?",
    "measure_every": "int?",
    "calibration_subset": "int?",
    "calibration_subset_seed": "int?",
    "fixed_guidance_scale": "number?",
    "preset": "str",
    # files and folders
    "bundle_root": "path",
    "dataset_dir": "path",
    "output_dir": "path",
    "cache_dir": "path",
    "evaluation_dir": "path",
    "checkpoint": "path",
    "diffusion_checkpoint": "path",
    "calibration": "path",
    "calibration_file": "path",
    "input_dir": "path?",
    "classifier_checkpoint": "path?",
    "classifier_scales": "number_list",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _list_of(test):
    return lambda value: isinstance(value, (list, tuple)) and all(test(v) for v in value)


_KINDS = {
    "int": ("an integer", _is_int),
    "number": ("a number", _is_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "path": ("a path", _is_path),
    "int_list": ("a list of integers", _list_of(_is_int)),
    "number_list": ("a list of numbers", _list_of(_is_number)),
    "str_list": ("a list of strings", _list_of(lambda v: isinstance(v, str))),
    "list": ("a list", _list_of(lambda v: True)),
}


def flag(value: Any, name: str) -> bool:
    """The boolean option ``name``: a bool, ``0``/``1``, or ``true``/``false``, ``yes``/``no``, ``on``/``off``,
    ``1``/``0`` in any case (``fire`` passes ``--use_ema false`` as the string ``"false"``, which Python reads as
    true).

    Raises:
        ValueError: ``--name must be true or false, got 'maybe'``.
    """
    if isinstance(value, bool):
        return value
    if _is_int(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f"--{name} must be true or false, got {value!r}")


def optional_flag(value: Any, name: str) -> bool | None:
    """:func:`flag`, with None kept (an option left "as the preset or calibration says")."""
    return None if value is None else flag(value, name)


def _top(key: str) -> str:
    """The top-level part of a config id (``train#trainer#max_epochs`` and ``train::trainer`` -> ``train``)."""
    return _ID_SEPARATORS.split(str(key), maxsplit=1)[0]


def _monai_syntax(value: Any) -> bool:
    """An expression, a reference or a macro: its value is known only once MONAI resolves it."""
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def config_defaults(files: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The top-level keys of the config files merged in order (as MONAI merges them) with their raw values."""
    from monai.bundle import ConfigParser

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    return dict(ConfigParser.load_config_files([str(f) for f in files]))


def _is_option(key: str, default: Any) -> bool:
    """A key a user sets (a value or a list of values), not a component, a list of components or the workflow's
    own expressions; the keys of :data:`OPTION_KINDS` always."""
    if key in OPTION_KINDS:
        return True
    if key in _STRUCTURE or key.startswith("_") or _monai_syntax(default) or isinstance(default, dict):
        return False
    if isinstance(default, list):  # an empty one is a list of components to fill (evaluate.json's handlers)
        return bool(default) and all(not isinstance(v, (dict, list)) and not _monai_syntax(v) for v in default)
    return True


def option_kind(key: str, default: Any) -> str:
    """The kind of option ``key`` (see :data:`OPTION_KINDS`) from :data:`OPTION_KINDS`, else its default."""
    if key in OPTION_KINDS:
        return OPTION_KINDS[key]
    if isinstance(default, bool):
        return "bool"
    if _is_int(default):
        return "int"
    if _is_number(default):
        return "number"
    if isinstance(default, str) and not _monai_syntax(default):
        return "str"
    if isinstance(default, list) and _is_option(key, default):
        for kind in ("int_list", "number_list", "str_list"):
            if default and _KINDS[kind][1](default):
                return kind
        return "list"
    return "any"


def _check_value(key: str, value: Any, kind: str) -> None:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "any" or _monai_syntax(value) or (optional and value is None):
        return
    if kind == "bool":
        flag(value, key)
        return
    description, test = _KINDS[kind]
    if not test(value):
        raise ValueError(f"--{key} must be {description}, got {value!r}")


def _check_settings(given: Mapping[str, Any]) -> None:
    """The AnoFPDM options among ``given`` through :class:`AnoFPDMSettings` (the grid apart from the others, as
    :meth:`Calibration.inference_settings` does: each applies to the calibration's settings)."""
    from ..settings import AnoFPDMSettings

    names = {f.name for f in dataclasses.fields(AnoFPDMSettings)}
    options = {k: v for k, v in given.items() if k in names and v is not None and not _monai_syntax(v)}
    for key, value in options.items():  # flags from the command line are strings ("false")
        if OPTION_KINDS.get(key, "").rstrip("?") == "bool":
            options[key] = flag(value, key)
    grid = {k: options.pop(k) for k in ("t_max", "stride", "timesteps") if k in options}
    for part in (options, grid):
        try:
            AnoFPDMSettings().replace(**part)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            named = next((k for k in part if message.startswith(f"{k} ")), None)
            raise ValueError(f"--{message}" if named else message) from None


#: options of earlier versions that another option replaced (named in the "unknown option" line)
RENAMED = {"amp": "precision"}


def _suggestion(key: str, names: Sequence[str]) -> str:
    if RENAMED.get(key) in names:
        return f" (replaced by --{RENAMED[key]}: fp32, bf16 or fp16)"
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean --{close[0]}?)" if close else " (--help lists the options)"


def _tracking_keys(tracking: Any, defaults: Mapping[str, Any]) -> set[str]:
    """The keys that MONAI's ``--tracking`` settings (a built-in name, a settings file or a mapping) add to the config,
    settable like options. MONAI's built-in ``mlflow`` settings are refused for a training workflow: they read the
    loss from a decollated output and fail at the first iteration on the bundles' trainers (``decollate=False``)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    keys = {k for settings in DEFAULT_EXP_MGMT_SETTINGS.values() for k in settings.get("configs", {})}
    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        train = defaults.get("train")
        if tracking == "mlflow" and isinstance(train, Mapping) and "trainer" in train:
            from ..bundle import tracking_settings_file as settings_file

            settings = settings_file()
            raise ValueError(
                "--tracking mlflow: MONAI's default MLflow settings cannot read this trainer's loss (its output is "
                f"not decollated); use --tracking {settings} (docs/tracking.md)"
            )
        return keys
    if isinstance(tracking, Mapping):
        settings_ = tracking
    else:
        paths = [str(p) for p in tracking] if isinstance(tracking, (list, tuple)) else [str(tracking)]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            names = list(DEFAULT_EXP_MGMT_SETTINGS)
            raise ValueError(f"--tracking {missing[0]}: no such settings file (nor one of MONAI's: {names})")
        settings_ = ConfigParser.load_config_files(paths)
    return keys | set(settings_.get("configs", {}))


def check(files: Sequence[str | os.PathLike], overrides: Mapping[str, Any]) -> None:
    """Refuse, in one line, an option of ``overrides`` that the config ``files`` do not define, a value of the wrong
    type, or a bad AnoFPDM option; MONAI's own arguments (:data:`RUN_ARGUMENTS`) and ``--help`` pass.

    Raises:
        ValueError: ``unknown option --strid (did you mean --stride?)``, ``--stride must be an integer, got 'ten'``.
    """
    defaults = config_defaults(files)
    allowed = set(RUN_ARGUMENTS) | set(HELP_KEYS)
    if overrides.get("tracking") is not None:  # MONAI's tracking settings are passed as overrides too
        allowed |= _tracking_keys(overrides["tracking"], defaults)
    given = {k: v for k, v in overrides.items() if k not in allowed}
    names = sorted({_top(k) for k in defaults} | {"_meta_"})
    for key in given:
        if _top(key) not in names:
            raise ValueError(f"unknown option --{key}{_suggestion(_top(key), [*names, *RUN_ARGUMENTS])}")
    top_level = {k: v for k, v in given.items() if k in defaults}
    for key, value in top_level.items():
        _check_value(key, value, option_kind(key, defaults[key]))
    _check_settings(top_level)


def wants_help(overrides: Mapping[str, Any]) -> bool:
    return any(k in overrides for k in HELP_KEYS)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def help_text(files: Sequence[str | os.PathLike]) -> str:
    """The workflow's options with their defaults (from the config files), one a line, for ``--help``."""
    defaults = config_defaults(files)
    paths = [Path(f) for f in files]
    bundle = paths[0].parent.parent.name
    workflows = " + ".join(p.stem for p in paths[1:]) or paths[0].stem
    options = {k: v for k, v in defaults.items() if _is_option(k, v)}
    others = [k for k in defaults if k not in options and k not in _STRUCTURE and not k.startswith("_")]
    width = max((len(k) for k in options), default=0) + 4
    lines = [
        f"{bundle} {workflows}: python -m monai.bundle run --config_file <files> [--option value ...]",
        f"config files: {', '.join(str(p) for p in paths)}",
        "",
        "options (default):",
        *(f"  --{k:<{width}}{_shown(v)}" for k, v in options.items()),
        "",
        "booleans: true/false, yes/no, on/off or 1/0; a value starting with $ is a Python expression (MONAI), "
        "@key refers to another key",
    ]
    if others:
        example = next((k for k in others if isinstance(defaults[k], dict)), others[0])
        lines.append(f"components, overridable by MONAI id (e.g. --{example}#<key> value): {', '.join(others)}")
    lines.append(f"MONAI's run arguments: {', '.join(RUN_ARGUMENTS)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the bundle command
def _is_flag(argument: str) -> bool:
    """fire's rule: ``--x``, ``-x``, ``-x=...``, but not a negative number."""
    return argument.startswith("--") or re.match(r"^-[a-zA-Z]", argument) is not None


def parse_command_line(args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``(command, keyword arguments)`` of ``python -m monai.bundle <command> <args>`` as ``fire`` passes them to
    a function with ``**kwargs``: ``--key value`` and ``--key=value`` (``-`` in a key read as ``_``), ``--key``
    alone (followed by another option or nothing) as True and ``--nokey`` alone as ``key`` False, values parsed by
    fire's own parser; positional arguments bound to the command's parameters in order; fire's own flags after a
    ``--`` ignored."""
    from fire.parser import DefaultParseValue

    if not args:
        return "", {}
    command, rest = args[0], list(args[1:])
    if "--" in rest:
        rest = rest[: rest.index("--")]
    kwargs: dict[str, Any] = {}
    positional: list[Any] = []
    index = 0
    while index < len(rest):
        argument = rest[index]
        index += 1
        if not _is_flag(argument):
            positional.append(DefaultParseValue(argument))
            continue
        key, equals, value = argument.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if equals:
            kwargs[key] = DefaultParseValue(value)
        elif index == len(rest) or _is_flag(rest[index]):
            if key.startswith("no") and len(key) > 2:
                kwargs[key[2:]] = False
            else:
                kwargs[key] = True
        else:
            kwargs[key] = DefaultParseValue(rest[index])
            index += 1
    if positional:
        from monai.bundle import scripts

        function = getattr(scripts, command, None)
        if callable(function):
            parameters = inspect.signature(function).parameters.values()
            free = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in kwargs]
            kwargs.update(zip(free, positional))
    return command, kwargs


def command_line() -> tuple[list[str], dict[str, Any]] | None:
    """``(config files, keyword arguments)`` when this process is ``python -m monai.bundle run`` (or
    ``run_workflow``, also under ``torchrun``), with ``--args_file``'s arguments under the command line's; else
    None (a workflow run from Python)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) != "monai.bundle.__main__":
        return None
    command, kwargs = parse_command_line(sys.argv[1:])
    if command not in ("run", "run_workflow"):
        return None
    if kwargs.get("args_file"):
        from monai.bundle import ConfigParser

        kwargs = {**ConfigParser.load_config_file(kwargs["args_file"]), **kwargs}
    files = kwargs.get("config_file")
    if not files:
        return None
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    return [str(f) for f in files], kwargs


def check_command_line() -> None:
    """First in each workflow's ``initialize`` (after the one-line error hook): for the bundle command, print
    :func:`help_text` and exit 0 on ``--help``, else :func:`check` the command line's options. Nothing for a
    workflow run from Python (:func:`anofpdm_monai.apps.workflow.run_workflow` checks its own arguments)."""
    found = command_line()
    if found is None:
        return
    files, kwargs = found
    if wants_help(kwargs):
        print(help_text(files))
        sys.stdout.flush()
        raise SystemExit(0)
    check(files, kwargs)
