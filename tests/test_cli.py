"""The command line a new user meets: input errors as one line naming the field (exit status 2) while real
failures keep their traceback, `export-model` on the tiny model, eval's legend, library progress bars."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fused_rlvr import cli  # noqa: E402
from fused_rlvr.train import models  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_progress_bars():
    """cli.main turns library progress bars off for the process (stderr is not a terminal under pytest)."""
    yield
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    enable_progress_bars()


def _one_error_line(capsys, prog="fused-rlvr train"):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err
    return lines[0]


def test_bad_config_value_is_one_line_naming_the_field(capsys, tmp_path):
    rc = cli.main(["train", "--preset", "tiny", "--steer", "foo", "--out-dir", str(tmp_path)])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "'steer'" in line and "'foo'" in line
    assert cli.main(["train", "--preset", "tiny", "--lr", "-1", "--out-dir", str(tmp_path)]) == 2
    assert "'lr'" in _one_error_line(capsys)
    assert cli.main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    rc = cli.main(["train", "--preset", "tiny", "--device", "cuda", "--out-dir", str(tmp_path)])
    assert rc == 2
    assert "'device'" in _one_error_line(capsys)


def test_unknown_model_names_hf_download_and_export(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    rc = cli.main(["train", "--preset", "tiny", "--model", missing, "--out-dir", str(tmp_path / "run")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert f"hf download {missing}" in line and "fused-rlvr export-model smollm2" in line
    assert "huggingface-cli" not in line


def test_real_failures_keep_their_traceback(monkeypatch, tmp_path):
    import fused_rlvr.train as train_pkg

    def builtin_failure(argv):
        return int("not a number")  # a bug in our code, raised by a builtin: not an input check

    monkeypatch.setattr(train_pkg, "main", builtin_failure)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["train"])

    def library_failure(argv):
        return json.loads("{")  # raised inside a library

    monkeypatch.setattr(train_pkg, "main", library_failure)
    with pytest.raises(json.JSONDecodeError):
        cli.main(["train"])

    def other_type(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_pkg, "main", other_type)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["train"])

    # an input error with FUSED_RLVR_TRACEBACK set: the traceback
    monkeypatch.undo()
    monkeypatch.setenv("FUSED_RLVR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="'steer'"):
        cli.main(["train", "--preset", "tiny", "--steer", "foo", "--out-dir", str(tmp_path)])


def test_export_model_tiny_random_loads_offline(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(tmp_path / "tiny-hf")
    assert cli.main(["export-model", "tiny-random", folder]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "from_pretrained" in out
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref, ref_tok = models.tiny_random_model(0)
    for (n, p), (n2, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    assert tok("12 + 3 = 15")["input_ids"] == ref_tok("12 + 3 = 15")["input_ids"]
    # a second export into the same folder is refused in one line
    assert cli.main(["export-model", "tiny-random", folder]) == 2
    assert "not empty" in _one_error_line(capsys, "fused-rlvr export-model")


def test_silence_library_progress_bars_only_off_a_terminal():
    from transformers.utils import logging as hf_logging

    class Term:
        def isatty(self):
            return True

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    hf_logging.enable_progress_bar()
    enable_progress_bars()
    real = sys.stderr
    sys.stderr = Term()
    try:
        assert models.silence_library_progress_bars() is False
    finally:
        sys.stderr = real
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert models.silence_library_progress_bars() is True  # pytest's stderr is not a terminal
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()


def test_quiet_loading_restores_the_library_switches():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = gguf_utils.tqdm
    with models.quiet_loading():
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_utils.tqdm is not bar and gguf_utils.tqdm(range(3)).disable
    assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is bar


def test_eval_prints_the_legend(monkeypatch, capsys, tmp_path):
    from fused_rlvr.train import evaluate as ev

    summary = {"base_avg@n": 0.25, "P": 1, "E": 2, "S": 0, "O": 3, "SRR": 1.0, "NDR": 2 / 3, "SDS": 0.8}
    summary.update(NSCR=2 / 3, files={"summary.json": str(tmp_path / "summary.json")})
    monkeypatch.setattr(ev, "run", lambda args: dict(summary))
    assert ev.main(["--base", "tiny-random"]) == 0
    out = capsys.readouterr().out
    legend = [ln for ln in out.splitlines() if ln.startswith("legend:")]
    assert len(legend) == 1 and "pass@k" in legend[0] and "avg@n" in legend[0]
    for term in ("P/E/S/O", "SRR = P/(P+S)", "NDR = E/(P+E)", "SDS", "NSCR = (E-S)/(P+E+S)"):
        assert term in legend[0], term
    summary.pop("P")
    assert ev.main(["--base", "tiny-random"]) == 0
    legend = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("legend:")]
    assert len(legend) == 1 and "SRR" not in legend[0]


def test_prepare_process_sets_threads_from_the_policy(monkeypatch):
    from fused_rlvr import _threads

    before, env = torch.get_num_threads(), dict(os.environ)
    monkeypatch.setattr(_threads, "default_threads", lambda: 1)
    monkeypatch.setattr(models, "silence_library_progress_bars", lambda **kw: False)
    try:
        assert cli.prepare_process() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert dict(os.environ) == env  # in-process (tests, library use): the environment is left alone


def test_the_installed_command_reexecutes_once_and_reports_input_errors_in_one_line():
    """main() as the installed command runs it (argv from the command line): without a wait policy in the
    environment the process restarts itself once (the pid printed before main() appears twice: os.execv
    keeps it), then the bad flag is one line on stderr and exit status 2; with the user's own policy, no
    restart."""
    import subprocess

    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    probe = (
        "import os, sys; from fused_rlvr.cli import main; print(os.getpid(), flush=True); sys.exit(main())"
    )
    cmd = [sys.executable, "-c", probe, "train", "--preset", "tiny", "--steer", "foo"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    pids = out.stdout.split()
    assert len(pids) == 2 and pids[0] == pids[1], out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fused-rlvr train: error: config field 'steer'"), (
        out.stderr
    )
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stdout.split()) == 1, out.stdout
