"""Settings: flag > environment > config file > default, and the config file's rules."""
from __future__ import annotations

import shutil

import pytest

from engine.cli import config as cli_config

from .runner import ok, run

DEBUG_LINE = "modsync: debug: reading the message from standard input"


@pytest.fixture
def write_config(scratch):
    """write_config(text, name="modsync.toml") -> the path of a config file in scratch/etc."""
    def write(text: str, name: str = "modsync.toml"):
        path = scratch / "etc" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path
    return write


@pytest.fixture
def three_stores(templates, scratch):
    """Three stores (copies of the empty template) to tell which one a command used."""
    paths = {}
    for name in ("flag", "env", "config"):
        paths[name] = scratch / f"store-{name}"
        shutil.copytree(templates / "empty", paths[name])
    return paths


@pytest.mark.parametrize("given, used", [
    (("flag", "env", "config"), "flag"),
    (("flag", "config"), "flag"),
    (("env", "config"), "env"),
    (("config",), "config"),
])
def test_store_precedence(three_stores, write_config, monkeypatch, given, used):
    argv = ["status", "--json"]
    if "flag" in given:
        argv += ["--store", three_stores["flag"]]
    if "env" in given:
        monkeypatch.setenv("MODSYNC_STORE", str(three_stores["env"]))
    if "config" in given:
        argv += ["--config", write_config(f'store = "{three_stores["config"]}"\n')]
    assert ok(*argv).json["store"]["path"] == str(three_stores[used])


def test_relative_paths_are_relative_to_the_config_file(alice, write_config, scratch,
                                                        monkeypatch):
    monkeypatch.delenv("MODSYNC_STORE")
    config = write_config('store = "../alice"\n'
                          'log_file = "logs/modsync.log"\n'
                          'log_level = "debug"\n')
    (config.parent / "logs").mkdir()
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = ok("save", "--config", config, "-u", "alice", "-m", "INBOX", "--json", stdin=b"m")
    assert r.json["uid"] == 4
    assert DEBUG_LINE not in r.err
    assert "reading the message from standard input" in (config.parent / "logs" /
                                                          "modsync.log").read_text()
    assert list(elsewhere.iterdir()) == []


def test_config_from_the_environment(alice, write_config, monkeypatch):
    monkeypatch.delenv("MODSYNC_STORE")
    monkeypatch.setenv("MODSYNC_CONFIG", str(write_config(f'store = "{alice}"\n')))
    assert ok("status", "--json").json["store"]["path"] == str(alice)


def test_config_flag_beats_the_environment(alice, store, write_config, monkeypatch):
    monkeypatch.delenv("MODSYNC_STORE")
    monkeypatch.setenv("MODSYNC_CONFIG", str(write_config(f'store = "{store}"\n', "env.toml")))
    flag = write_config(f'store = "{alice}"\n', "flag.toml")
    assert ok("status", "--config", flag, "--json").json["store"]["path"] == str(alice)


def test_the_default_config_file_is_read_when_it_exists(alice, write_config, monkeypatch):
    monkeypatch.delenv("MODSYNC_STORE")
    monkeypatch.setattr(cli_config, "DEFAULT_PATH", write_config(f'store = "{alice}"\n'))
    assert ok("status", "--json").json["store"]["path"] == str(alice)


def test_a_missing_default_config_file_is_no_error(alice):
    assert not cli_config.DEFAULT_PATH.exists()
    assert ok("status").code == 0


def test_a_named_config_file_must_exist(alice, scratch, monkeypatch):
    r = run("status", "--config", scratch / "nope.toml", "--json")
    assert r.code == 1 and r.json["error"] == "config" and "does not exist" in r.error
    monkeypatch.setenv("MODSYNC_CONFIG", str(scratch / "also-nope.toml"))
    assert run("status").code == 1


def test_invalid_toml(alice, write_config):
    r = run("status", "--config", write_config("store = \n"), "--json")
    assert r.code == 1 and r.json["error"] == "config" and "not valid TOML" in r.error


@pytest.mark.parametrize("text, key", [
    ('stor = "/srv/modsync"\n', "'stor'"),
    ("[gc]\nretention = 3\n", "'gc.retention'"),
    ("[verify]\nblobs = true\nfast = true\n", "'verify.fast'"),
    ("[nosuchtable]\nx = 1\n", "'nosuchtable.x'"),
])
def test_unknown_keys_are_refused(alice, write_config, text, key):
    r = run("status", "--config", write_config(text), "--json")
    assert r.code == 1 and r.json["error"] == "config"
    assert f"unknown key {key}" in r.error
    assert "known: store, log_level" in r.error


@pytest.mark.parametrize("text, why", [
    ("store = 3\n", "store must be str"),
    ("log_level = true\n", "log_level must be str"),
    ('log_level = "loud"\n', "log_level 'loud'"),
    ('[gc]\nretention_days = "7"\n', "gc.retention_days must be int or float"),
    ("[gc]\nretention_days = true\n", "gc.retention_days must be int or float"),
    ("[verify]\nblobs = 1\n", "verify.blobs must be bool"),
    ("[init]\ncompression_level = 3.5\n", "init.compression_level must be int"),
    ("[init]\ncompression_level = true\n", "init.compression_level must be int"),
    ('gc = "often"\n', "unknown key 'gc'"),          # a table given as a value
])
def test_values_of_the_wrong_type_are_refused(alice, write_config, text, why):
    r = run("status", "--config", write_config(text), "--json")
    assert r.code == 1 and r.json["error"] == "config"
    assert why in r.error


@pytest.mark.parametrize("config_level, env_level, flags, debug", [
    ("debug", None, [], True),
    ("warning", "debug", [], True),
    ("debug", "warning", [], False),
    (None, "debug", ["-v"], False),          # -v is info: it beats the environment
    ("debug", None, ["-q"], False),
    ("warning", None, ["-vv"], True),
    ("DEBUG", None, [], True),                # level names are case-insensitive
])
def test_log_level_precedence(alice, write_config, monkeypatch, config_level, env_level,
                              flags, debug):
    text = f'log_level = "{config_level}"\n' if config_level else ""
    if env_level:
        monkeypatch.setenv("MODSYNC_LOG_LEVEL", env_level)
    r = ok("save", "--config", write_config(text), *flags, "-u", "alice", "-m", "INBOX",
           stdin=b"msg")
    assert (DEBUG_LINE in r.err) is debug


def test_a_bad_log_level_in_the_environment(alice, monkeypatch):
    monkeypatch.setenv("MODSYNC_LOG_LEVEL", "loud")
    r = run("status", "--json")
    assert r.code == 1 and r.json["error"] == "config" and "MODSYNC_LOG_LEVEL" in r.error


def test_init_compression_level(scratch, write_config):
    config = write_config("[init]\ncompression_level = 9\n")
    assert ok("init", "--store", scratch / "a", "--config", config,
              "--json").json["compression_level"] == 9
    assert ok("init", "--store", scratch / "b", "--config", config, "--compression-level", "1",
              "--json").json["compression_level"] == 1
    assert ok("init", "--store", scratch / "c", "--json").json["compression_level"] == 3
    bad = write_config("[init]\ncompression_level = 30\n", "bad.toml")
    r = run("init", "--store", scratch / "d", "--config", bad, "--json")
    assert r.code == 1 and r.json["error"] == "config"
    assert not (scratch / "d").exists()


def test_gc_retention_days(alice, write_config):
    config = write_config("[gc]\nretention_days = 30\n")
    assert ok("gc", "--config", config, "--json").json["retention_days"] == 30
    assert ok("gc", "--config", config, "--retention", "0", "--json").json["retention_days"] == 0
    assert ok("gc", "--json").json["retention_days"] == 7
    r = run("gc", "--config", write_config("[gc]\nretention_days = -1\n", "bad.toml"), "--json")
    assert r.code == 1 and r.json["error"] == "config"


def test_verify_blobs(alice, write_config):
    off = write_config("[verify]\nblobs = false\n", "off.toml")
    on = write_config("[verify]\nblobs = true\n", "on.toml")
    assert ok("verify", "--json").json["blobs_checked"] is True
    assert ok("verify", "--config", off, "--json").json["blobs_checked"] is False
    assert ok("verify", "--config", on, "--no-blobs", "--json").json["blobs_checked"] is False
    assert ok("verify", "--config", on, "--json").json["blobs"] == 3
