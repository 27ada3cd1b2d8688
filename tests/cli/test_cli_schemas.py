"""The contract around the commands: a schema per verb and action, help, the reference doc."""
from __future__ import annotations

import argparse
import functools
import json
import re

import jsonschema
import pytest

from engine.cli import build_parser
from engine.cli import config as cli_config

from .runner import DOCS, OTHER_VERBS, SCHEMAS, VERBS, run, schema, validate


def _actions(parser: argparse.ArgumentParser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


@functools.cache
def registered() -> dict[str, set[str]]:
    """verb -> the commands it runs ("mailbox create", ...; "seen" and "seen list")."""
    out = {}
    for verb, p in _actions(build_parser()).items():
        commands = {verb} if p.get_default("handler") else set()
        commands |= {f"{verb} {action}" for action in _actions(p)}
        out[verb] = commands
    return out


def schema_commands(name: str) -> set[str]:
    s = schema(name)
    branches = s.get("oneOf", [s])
    return {b["properties"]["command"]["const"] for b in branches}


def test_every_registered_verb_is_owned():
    """A new verb must join VERBS (with a schema, tests and docs) or OTHER_VERBS."""
    unknown = set(registered()) - set(VERBS) - set(OTHER_VERBS)
    assert not unknown, f"verbs nobody covers: {sorted(unknown)}"


@pytest.mark.parametrize("verb", VERBS)
def test_verb_has_a_schema_for_each_of_its_commands(verb):
    commands = registered()
    assert verb in commands, f"{verb} is not registered"
    assert (SCHEMAS / f"{verb}.schema.json").is_file()
    jsonschema.Draft202012Validator.check_schema(schema(verb))
    assert schema_commands(verb) == commands[verb]


def test_error_schema():
    jsonschema.Draft202012Validator.check_schema(schema("error"))
    validate({"command": "", "ok": False, "error": "usage", "message": "m", "exit_code": 2})
    with pytest.raises(AssertionError):
        validate({"command": "status", "ok": False, "error": "usage", "message": "m",
                  "exit_code": 0})


def test_schemas_are_strict():
    """A field the code adds without its schema fails the tests instead of going unnoticed."""
    with pytest.raises(AssertionError, match="surprise"):
        validate({"command": "state", "ok": True, "user": "alice", "token": "0",
                  "store_id": "0" * 32, "surprise": 1})
    with pytest.raises(AssertionError):
        validate({"command": "mailbox frobnicate", "ok": True, "user": "alice"})


def test_every_command_has_help_with_its_usage():
    for verb in VERBS:
        for command in sorted(registered()[verb]):
            r = run(*command.split(), "--help")
            assert r.code == 0, command
            assert f"modsync {command} [-h]" in r.out.partition("\n\n")[0], command
            assert "--json" in r.out      # the global options are listed after the verb


def test_seen_list_usage_names_the_command():
    r = run("seen", "list", "--help")
    assert r.out.startswith("usage: modsync seen list [-h]")
    r = run("seen", "list", "-u", "--json")        # -u without its value
    assert r.code == 2
    assert r.json["command"] == "seen list"


def test_top_level_help_lists_every_verb_and_the_exit_codes():
    r = run("--help")
    assert r.code == 0
    for verb in VERBS:
        assert re.search(rf"^\s+{verb}\s", r.out, re.MULTILINE), verb
    assert "141 stdout closed" in " ".join(r.out.split())


# -- docs/cli.md ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def doc() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_doc_covers_every_command(doc):
    for verb in VERBS:
        for command in registered()[verb]:
            assert f"modsync {command}" in doc, command


def test_doc_lists_the_exit_codes(doc):
    section = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in (0, 1, 2, 3, 4, 130, 141):
        assert re.search(rf"^\|\s*{code}\s*\|", section, re.MULTILINE), code


def own_keys() -> list[str]:
    """The config keys of the verbs covered here (others' verbs add theirs when registered)."""
    build_parser()
    return [k for k in cli_config.KEYS if k.partition(".")[0] not in OTHER_VERBS]


def test_doc_lists_the_config_keys_and_environment(doc):
    section = doc.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for key in own_keys():
        table, _, name = key.rpartition(".")
        assert f"`{name}`" in section, key
        if table:
            assert f"[{table}]" in section, key
    for var in (cli_config.ENV_STORE, cli_config.ENV_CONFIG, cli_config.ENV_LOG_LEVEL):
        assert var in section


def test_doc_examples_parse(doc):
    """Every `modsync ...` line in a code block is a command line the parser accepts."""
    parser = build_parser()
    seen = 0
    for block in re.findall(r"```sh\n(.*?)```", doc, re.DOTALL):
        for line in block.splitlines():
            line = line.strip()
            line = line.removeprefix("$ ")
            if not line.startswith("modsync ") or "$(" in line:
                continue
            argv = _split(line)[1:]
            if argv[0] in OTHER_VERBS:
                continue
            try:
                parser.parse_args(argv)
            except SystemExit:
                pass   # --help / --version
            seen += 1
    assert seen >= len(VERBS)


def _split(line: str) -> list[str]:
    import shlex
    words = shlex.split(line, comments=True)
    cut = next((i for i, w in enumerate(words) if w in ("|", "||", "&&", "<", ">")
                or w.startswith((">", "<"))), len(words))
    return words[:cut]


def test_json_examples_in_the_doc_match_their_schemas(doc):
    examples = [json.loads(m) for m in re.findall(r"```json\n(.*?)```", doc, re.DOTALL)]
    assert examples
    for data in examples:
        validate(data)


def test_the_config_example_in_the_doc_is_accepted(doc, scratch):
    example = re.search(r"```toml\n(.*?)```", doc, re.DOTALL).group(1)
    path = scratch / "modsync.toml"
    path.write_text(example)
    assert set(cli_config.load(str(path)).values) == set(own_keys())


def test_status_schema_takes_the_peers_of_a_replicating_store():
    """`status` adds "peers" once the store replicates (engine/cli/status.py, peer_view)."""
    peer = {"peer_id": "5f" * 16, "direction": "push", "address": "replica.example.org:7143",
            "software": "modsync", "version": "0.1.0", "last_contact": "2026-11-21T20:00:00Z",
            "last_error": None, "last_error_at": None, "users_queued": 1, "modseqs_behind": 4,
            "seconds_behind": 2.5,
            "users": [{"user": "alice", "queued": True, "modseqs_behind": 4,
                       "seconds_behind": 2.5, "acked_at": "2026-11-21T19:59:57Z",
                       "error": None}]}
    local = dict(peer, peer_id=None, direction="sync", address="", users=[],
                 last_error="1 range of alice's modseqs acknowledged only locally",
                 local_only={"user": "alice",
                             "ranges": [{"from": 3, "to": 9, "at": "2026-11-21T19:00:00Z"}]})
    validate({"command": "status", "ok": True, "store": {"path": "/srv/modsync", "id": "0" * 32},
              "users": [], "peers": [peer, local]})
