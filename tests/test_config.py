"""tpfuse.config is the one reader of TPFUSE_* variables: all are declared there, read when used, and
a bad value says what is accepted."""

import os
import re

import pytest

from tpfuse import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
    for root, _, files in os.walk(os.path.join(REPO, "tpfuse")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, REPO), open(path).read()


def test_every_variable_the_package_names_is_declared_in_config():
    named = {v for _, text in _sources() for v in re.findall(r"TPFUSE_[A-Z0-9_]+", text)}
    assert named and named <= set(config.VARIABLES), sorted(named - set(config.VARIABLES))


def test_no_module_but_config_reads_the_environment_for_them():
    readers = [path for path, text in _sources()
               if re.search(r"os\.(environ|getenv)[^\n]*TPFUSE_", text) and not path.endswith("config.py")]
    assert readers == [], readers


def test_read_when_used_not_at_import(monkeypatch):
    monkeypatch.setenv("TPFUSE_PUSH_BLOCK_V", "128")
    assert config.get("TPFUSE_PUSH_BLOCK_V") == 128
    monkeypatch.delenv("TPFUSE_PUSH_BLOCK_V")
    assert config.get("TPFUSE_PUSH_BLOCK_V") == 256  # the default
    assert config.get("TPFUSE_FLAG_MAX_BYTES") is None  # unset, no default: the measured table decides


def test_a_bad_value_names_the_variable_and_what_it_is_for(monkeypatch):
    monkeypatch.setenv("TPFUSE_FLAG_NUM_WARPS", "-4")
    with pytest.raises(ValueError, match=r"TPFUSE_FLAG_NUM_WARPS='-4' must be a positive integer \(flag protocol"):
        config.get("TPFUSE_FLAG_NUM_WARPS")


def test_the_api_reference_lists_every_variable():
    api = open(os.path.join(REPO, "docs", "api.md")).read()
    missing = [name for name in config.VARIABLES if name not in api]
    assert missing == [], missing


def test_enable_options_live_here_with_their_precedence(monkeypatch):
    from tpfuse import config

    assert config.pass_config() == config.PassConfig()
    assert config.pass_config(patterns="split_cat").patterns == ("split_cat",)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fuse'\]; accepted are \['dry_run'"):
        config.pass_config(fuse=True)
    monkeypatch.delenv("TPFUSE_DUMP_DIR", raising=False)
    assert config.dump_dir(None) is None
    monkeypatch.setenv("TPFUSE_DUMP_DIR", "/from/env")
    assert config.dump_dir(None) == "/from/env"  # the variable beats the default
    assert config.dump_dir("/from/enable") == "/from/enable"  # the option beats the variable


def test_raw_values_follow_the_environment_as_it_changes(monkeypatch):
    from tpfuse import config

    monkeypatch.delenv("TPFUSE_BACKEND", raising=False)
    before = config.raw_dispatch_values()
    monkeypatch.setenv("TPFUSE_BACKEND", "nccl")
    after = config.raw_dispatch_values()
    assert before != after and config.get("TPFUSE_BACKEND") == "nccl"
    monkeypatch.delenv("TPFUSE_BACKEND")
    assert config.raw_dispatch_values() == before and config.get("TPFUSE_BACKEND") == "auto"
