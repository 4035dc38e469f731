"""TrainConfig's type checks and the command line's file errors: every field's type is checked with an error
naming the field, the value and the expected type; flags are never abbreviated; a config or task file that is
not UTF-8 and an out_dir that cannot be written are one-line errors naming the file."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import fields

import pytest

from fused_rlvr.train import config_from_args, make_config
from fused_rlvr.train.config import ConfigError, TrainConfig, ensure_out_dir, load_config_file


def _config_file(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_json_values_of_the_wrong_type_are_errors_naming_field_value_and_type(tmp_path):
    cases = {
        "resume": ("false", r"'resume' must be a bool \(true or false\), got 'false' \(str\)"),
        "steps": (1.5, r"'steps' must be an integer, got 1.5 \(float\)"),
        "group_size": (True, r"'group_size' must be an integer, got True \(bool\)"),
        "lr": (None, r"'lr' must be a number, got None \(NoneType\)"),
        "beta": ("0.1", r"'beta' must be a number, got '0.1' \(str\)"),
        "temperature": (False, r"'temperature' must be a number, got False \(bool\)"),
        "model": (3, r"'model' must be a string, got 3 \(int\)"),
        "dual_clip": ("2", r"'dual_clip' must be a number or null / None, got '2' \(str\)"),
        "steer": (1, r"'steer' must be a string or null / None, got 1 \(int\)"),
        "save_every": ([1], r"'save_every' must be an integer, got \[1\] \(list\)"),
    }
    for name, (value, msg) in cases.items():
        path = _config_file(tmp_path, {name: value})
        with pytest.raises(ConfigError, match=msg):
            config_from_args(["--preset", "tiny", "--config", path])
        with pytest.raises(ValueError, match=msg):  # (a ConfigError is a ValueError)
            make_config("tiny", {name: value})


def test_every_field_rejects_a_value_of_another_type():
    for f in fields(TrainConfig):
        hint = typing.get_type_hints(TrainConfig)[f.name]
        optional = type(None) in typing.get_args(hint)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        wrong = {bool: ["true", 1, 0.0], int: [1.5, True, "3"], float: ["1.0", True], str: [1, True, 2.5]}
        values = wrong[base] + ([] if optional else [None])
        for v in values:
            with pytest.raises(ConfigError, match=f"config field '{f.name}' must be .*got {v!r}"):
                TrainConfig(**{f.name: v}).validate()


def test_an_int_is_a_float_and_none_only_where_optional():
    cfg = make_config("tiny", {"lr": 1, "temperature": 2, "dual_clip": None, "steer": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.temperature, float)
    assert cfg.dual_clip is None and cfg.steer is None
    assert make_config("tiny", {"dual_clip": 3}).dual_clip == 3.0


def test_flags_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--preset", "tiny", "--save", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --save 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["--pre", "tiny"])
    assert config_from_args(["--preset", "tiny", "--save-every", "1"]).save_every == 1


def test_a_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{\n "system_prompt": "caf\xe9"\n}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file '{path}' is not UTF-8 text: line 2"):
        load_config_file(str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config_file(str(tmp_path))  # a folder


def test_a_task_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from fused_rlvr.train.tasks import load_jsonl

    path = tmp_path / "task.jsonl"
    path.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(ConfigError, match=rf"{path}:2: dataset file is not UTF-8 text"):
        load_jsonl(str(path))


def test_an_out_dir_that_cannot_be_written_names_the_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "run"):
        with pytest.raises(ConfigError, match=rf"config field 'out_dir': cannot write to the folder '{out}'"):
            ensure_out_dir(str(out))
    ensure_out_dir(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []  # (the write probe is gone)
    if os.geteuid() != 0:  # root writes through any mode bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="Permission denied"):
            ensure_out_dir(str(locked))


@pytest.mark.parametrize("what", ["config", "task", "out_dir"])
def test_the_command_line_reports_a_bad_file_in_one_line(tmp_path, capsys, what):
    pytest.importorskip("transformers")
    pytest.importorskip("math_verify")
    from fused_rlvr.train import main

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    flags = ["--preset", "tiny", "--out-dir", str(tmp_path / "run"), "--n-eval", "2", "--steps", "1"]
    if what == "config":
        flags += ["--config", str(bad)]
    elif what == "task":
        task = tmp_path / "t.jsonl"
        task.write_bytes(b"\xff\n")
        flags += ["--task", str(task), "--n-eval", "0"]
        bad = task
    else:
        flags[3] = str(bad / "run")
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fused-rlvr train: error:") and str(bad) in err[0], err
