"""The command line's one convention: usage errors, lists, defaults, exit codes, files (no timing assertions)."""
import argparse
import json
import os
import stat
import sys

import pytest
import torch

from autonorm import cli, measure, tune
from autonorm.cli import args as args_module
from autonorm.cli import tune as tune_cli
from autonorm.db import TuningDB


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `autonorm ARGV`."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,message", [
    (["check", "--backends", "nope"], "unknown backend(s) nope"),
    (["check", "--hidden", "abc"], "'abc' is not a positive integer"),
    (["check", "--dtypes", "float64"], "unknown dtype 'float64'"),
    (["bench", "--shapes", "4096"], "ROWSxHIDDEN"),
    (["bench", "--backends", "numba-cpu,torch"], "one autonorm backend at a time"),
    (["tune", "--ops", "rms"], "'rms' is not one of rmsnorm, layernorm"),
    (["tune", "--directions", "forward"], "'forward' is not one of fwd, bwd"),
    (["tune", "--hidden", "0"], "'0' is not a positive integer"),
    (["tune", "--hidden", "abc"], "'abc' is not a positive integer"),
    (["tune", "--ops", "rmsnorm", "--features", "bias"], "valid for none of --ops rmsnorm"),
    (["tune", "--features", "weight+bais"], "unknown feature bais"),
    (["tune", "--dtypes", "float64"], "unknown dtype 'float64'"),
    (["tune", "--backends", "nope"], "unknown backend 'nope'"),
    (["tune", "--dtype", "fp32"], "unrecognized arguments: --dtype"),  # no prefix matching to --dtypes
    (["render", "--backend", "torch", "--hidden", "64", "--dir", "bwd"], "unrecognized arguments: --dir"),
])
def test_usage_errors_name_the_command_and_exit_2(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert f"autonorm {argv[0]}: error: " in err and message in err
    assert "Traceback" not in err + out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only build")
@pytest.mark.parametrize("command", ["check", "bench", "tune"])
def test_device_cuda_on_a_cpu_build_is_a_usage_error(capsys, command):
    rc, _, err = run(capsys, command, "--device", "cuda")
    assert rc == 2 and f"autonorm {command}: error: --device cuda: this torch build has no CUDA" in err


def test_device_defaults_to_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.device_arg(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.device_arg(None) == torch.device("cpu")


def test_tune_without_optuna_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now fails as if not installed
    rc, _, err = run(capsys, "tune", "--quick")
    assert rc == 2 and 'pip install "autonorm[tune]"' in err and "Traceback" not in err


def test_one_list_syntax_across_commands():
    parser, _, _ = cli._parser(["tune"])
    for argv in (["--ops", "rmsnorm,layernorm"], ["--ops", "rmsnorm", "layernorm"], ["--ops", "rmsnorm,", "layernorm"]):
        assert parser.parse_args(["tune", *argv]).ops == ["rmsnorm", "layernorm"]
    for command in ("tune", "bench", "check"):
        parser, _, _ = cli._parser([command])
        args = parser.parse_args([command, "--dtypes", "fp32,bf16", "float16", "--backends", "torch"])
        assert args.dtypes == ["fp32", "bf16", "float16"] and args.backends == ["torch"]
    parser, _, _ = cli._parser(["bench"])
    assert parser.parse_args(["bench", "--backend", "torch"]).backends == ["torch"]  # the old name still works


def test_help_shows_defaults(capsys):
    for command, expected in (("check", "(default: 4)"), ("tune", "default 768,1024,2048"),
                              ("bench", "(default: 20)")):
        assert cli.main([command, "--help"]) == 0
        assert expected in capsys.readouterr().out


def _subparsers(parser):
    """`parser` and every parser below it (db's actions)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _subparsers(child)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_default_is_in_help(command):
    """Every option with a real default shows it, options without a help text of their own included."""
    _, _, sub = cli._parser([command])
    for parser in _subparsers(sub):
        text = " ".join(parser.format_help().split())  # (argparse wraps lines)
        for action in parser._actions:
            shown = args_module.shown_default(action)
            if shown is not None:
                line = " ".join(parser._get_formatter()._format_action(action).split())
                assert "default" in line and line in text, (parser.prog, action.option_strings, line)
                if "(default:" in line:
                    assert f"(default: {shown})" in line, (parser.prog, line)


def test_tune_specs_cover_torch_modules_and_quick_has_one_backward():
    parser, _, _ = cli._parser(["tune"])
    specs = tune_cli.specs_from_args(parser.parse_args(["tune"]))
    assert {(s.op, s.features) for s in specs} == {("rmsnorm", "weight"), ("layernorm", "weight+bias")}
    quick = tune_cli.specs_from_args(parser.parse_args(["tune", "--quick"]))
    assert [(s.op, s.hidden) for s in quick if s.direction == "bwd"] == [("rmsnorm", 1024)]
    assert len([s for s in quick if s.direction == "fwd"]) == 4
    only_fwd = tune_cli.specs_from_args(parser.parse_args(["tune", "--quick", "--directions", "fwd"]))
    assert all(s.direction == "fwd" for s in only_fwd)


def test_long_tune_prints_its_size_before_starting(capsys, monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop  # right after the announcement: nothing is measured
    monkeypatch.setattr(measure, "timer_for", stop)
    with pytest.raises(Stop):
        cli.main(["tune", "--out", str(tmp_path), "--backends", "torch"])
    err = capsys.readouterr().err
    assert "autonorm tune: 360 studies of up to 60 trials; at most 1800 min" in err


def _tiny_tune(tmp_path, *extra):
    return ["tune", "--ops", "rmsnorm", "--directions", "fwd", "--dtypes", "fp32", "--hidden", "64,96", "--rows", "8",
            "--trials", "2", "--backends", "torch", "--no-compile-baseline", "--out", str(tmp_path / "db"), *extra]


def test_ctrl_c_during_tune_saves_and_says_how_to_resume(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: 10.0)
    real_run, calls = tune.StudyRunner.run, []

    def run_then_interrupt(self):
        calls.append(self.spec.hidden)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self)
    monkeypatch.setattr(tune.StudyRunner, "run", run_then_interrupt)
    rc, out, err = run(capsys, *_tiny_tune(tmp_path))
    assert rc == 130 and "Traceback" not in err
    assert "interrupted after 1 of 2 studies" in err and "Run the same command again to resume" in err
    (db_file,) = (tmp_path / "db").glob("*.json")
    assert [k.hidden for k in TuningDB.load(db_file).records] == [64]
    # Files: the database is readable by others (umask 022 here), journals and locks are kept apart, git-ignored.
    assert stat.S_IMODE(os.stat(db_file).st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == [".autonorm-journal", db_file.name]
    side = tmp_path / "db" / ".autonorm-journal"
    assert (side / ".gitignore").read_text().splitlines()[-1] == "*"
    assert any(p.name.endswith(".optuna.journal") for p in side.iterdir())


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_tune_output_without_a_terminal_has_no_progress_bars(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: 10.0)
    rc, out, err = run(capsys, *_tiny_tune(tmp_path))  # capsys: stderr is not a TTY
    assert rc == 0
    assert "\r" not in err and "\x1b[" not in err and "studies:" not in err
    assert "set AUTONORM_DB_PATH=" in out.splitlines()[-1]  # --out elsewhere: how to use it


def test_check_with_every_backend_skipped_fails(capsys, monkeypatch):
    from autonorm.backends import get_backend

    monkeypatch.setattr(type(get_backend("torch")), "unavailable_reason", lambda self: "switched off by the test")
    rc, out, err = run(capsys, "check", "--backends", "torch", "--hidden", "8", "--dtypes", "fp32")
    assert rc == 1 and "0 passed, 0 failed" in out and "nothing ran" in err


def test_db_validate_folders_stale_records_and_diff_exit(capsys, tmp_path):
    from test_db import entry, numba_cpu_config, record, sample_db

    pytest.importorskip("numba")
    folder = tmp_path / "dbs"
    folder.mkdir()
    db = sample_db(1)
    db.upsert(record(hidden=4096, winner=entry("numba-cpu", numba_cpu_config(), us=3.0)))
    db.save(folder / "a.json")
    (folder / "bench.json").write_text(json.dumps({"rows": []}))  # a stray non-database JSON
    rc, out, err = run(capsys, "db", "validate", str(folder))
    assert rc == 0 and "a.json: OK" in out and "bench.json: skipped" in err
    doc = json.loads((folder / "a.json").read_text())
    for rec in doc["records"]:
        rec["template_hash"] = "0" * 64  # tuned for kernels that no longer exist
    (folder / "a.json").write_text(json.dumps(doc))
    rc, out, _ = run(capsys, "db", "validate", str(folder))
    assert rc == 0 and "stale template hash" in out
    rc, out, _ = run(capsys, "db", "validate", "--strict", str(folder))
    assert rc == 1 and "STALE" in out
    sample_db(1).save(tmp_path / "same.json")
    assert run(capsys, "db", "diff", str(tmp_path / "same.json"), str(tmp_path / "same.json"))[0] == 0
    assert run(capsys, "db", "diff", str(tmp_path / "same.json"), str(folder / "a.json"))[0] == 1


def test_non_database_json_in_a_database_folder_is_skipped(tmp_path, monkeypatch):
    import autonorm
    from autonorm import db_sources

    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    monkeypatch.setenv("AUTONORM_DB_PATH", str(tmp_path))
    autonorm.reset()
    try:
        with pytest.warns(RuntimeWarning, match="notes.json.*not a tuning database"):
            assert db_sources.files() == [] or all("notes" not in str(p) for p, _ in db_sources.files())
        (tmp_path / "broken.json").write_text('{"schema_version": 1')  # a corrupt database: named, then skipped
        autonorm.reset()
        with pytest.warns(RuntimeWarning) as warned:  # after reset(): the notes again, and the corrupt file
            db_sources.files()
        messages = sorted(str(w.message) for w in warned)
        assert len(messages) == 2 and "ignoring tuning database" in messages[0] and "broken.json" in messages[0]
        assert "notes.json" in messages[1]
        with pytest.raises(autonorm.DatabaseError, match="broken.json"):  # load_db stays strict
            autonorm.load_db(tmp_path)
    finally:
        monkeypatch.delenv("AUTONORM_DB_PATH")
        autonorm.reset()


def test_creating_a_study_prints_no_optuna_info(capfd):
    """AUTONORM_TUNE_ON_MISS tunes inside the user's program: Optuna's INFO lines must not reach its output."""
    import optuna

    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.spec import NormSpec

    optuna.logging.set_verbosity(optuna.logging.INFO)  # what a program that uses Optuna itself may have set
    try:
        runner = tune.StudyRunner(NormSpec("rmsnorm", "fwd", "float32", "float32", 8), 8, {"torch": TorchBackend()},
                                   None, storage=optuna.storages.InMemoryStorage(), name="quiet")
        runner._study()
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # the program's own setting is kept
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert "A new study created" not in capfd.readouterr().err


def test_a_bad_storage_fails_before_the_bandwidth_probe(capsys, monkeypatch, tmp_path):
    def probe(device):
        raise AssertionError("the bandwidth probe ran before the storage was checked")
    monkeypatch.setattr(measure, "copy_bandwidth", probe)
    rc, _, err = run(capsys, *_tiny_tune(tmp_path, "--storage", "nosuchdriver://localhost/x"))
    assert rc == 2 and "autonorm tune: error: --storage nosuchdriver://localhost/x:" in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_module_of_autonorm_itself_is_a_traceback_not_an_extra_to_install(monkeypatch):
    from autonorm import cli

    monkeypatch.setitem(cli.COMMANDS, "check", ("autonorm.cli.no_such_module", "help"))
    with pytest.raises(ModuleNotFoundError, match="autonorm.cli.no_such_module"):
        cli.main(["check"])
