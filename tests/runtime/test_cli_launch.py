"""The command's start: `edgediff export` starts itself again with glibc's huge-page tunable where it can gain,
and leaves every other command, and a user's own setting, alone."""

import os
import platform
import subprocess
import sys

import pytest

from edgediff.cli.launch import HUGETLB_TUNABLE, command, huge_page_environment, tuned_environment

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_tunable_added_where_glibc_and_huge_pages_allow():
    env = tuned_environment({"PATH": "/bin"}, GLIBC, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=1"}
    assert tuned_environment({}, GLIBC, "[always] madvise never")["GLIBC_TUNABLES"] == f"{HUGETLB_TUNABLE}=1"


def test_tunable_joins_the_users_other_tunables():
    env = tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, MADVISE)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}=1"


@pytest.mark.parametrize(
    "environ, libc, setting",
    [
        ({"GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=0"}, GLIBC, MADVISE),  # the user's opt-out
        ({"GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=1"}, GLIBC, MADVISE),  # set already: no second start
        ({}, ("glibc", "2.34"), MADVISE),  # before the tunable
        ({}, ("", ""), MADVISE),  # musl and others
        ({}, ("glibc", "unknown"), MADVISE),
        ({}, GLIBC, "always madvise [never]\n"),  # huge pages off
        ({}, GLIBC, None),  # no setting to read
    ],
)
def test_nothing_changes_where_nothing_is_gained(environ, libc, setting):
    assert tuned_environment(environ, libc, setting) is None


def test_the_command_is_the_first_word_not_an_option():
    assert command(["edgediff", "-v", "export", "SRC", "OUT"]) == "export"
    assert command(["edgediff", "generate", "a cat"]) == "generate"
    assert command(["edgediff", "--help"]) is None


def _starts(argv: list[str], env: dict) -> list[str]:
    """The lines a process prints each time it starts, running the command's start with `argv` (each line: its id and
    its GLIBC_TUNABLES)."""
    code = (
        "import os, sys\n"
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
        f"sys.argv = {argv!r}\n"
        "from edgediff.cli.launch import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return [line for line in result.stdout.splitlines() if line.split(" ")[0].isdigit()]


@pytest.mark.skipif(
    huge_page_environment({}) is None, reason="needs Linux, glibc 2.35 or newer and transparent huge pages on"
)
def test_export_starts_again_as_the_same_process_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    first, again = _starts(["edgediff", "export", "--help"], env)
    assert first.split(" ") == [first.split(" ")[0], "None"]
    assert again.split(" ") == [first.split(" ")[0], f"{HUGETLB_TUNABLE}=1"]  # same process id: os.execve
    # other commands, and the user's own setting, start once
    assert len(_starts(["edgediff", "generate", "--help"], env)) == 1
    assert len(_starts(["edgediff", "export", "--help"], {**env, "GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=0"})) == 1


@pytest.fixture
def linux_with_huge_pages(monkeypatch, tmp_path):
    """A Linux host with glibc 2.36 and huge pages on `madvise`, whatever runs the test."""
    from edgediff.cli import launch

    setting = tmp_path / "enabled"
    setting.write_text(MADVISE)
    monkeypatch.setattr(launch, "THP_SETTING", setting)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: GLIBC)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return launch


def test_the_restart_runs_this_interpreter_with_its_arguments(linux_with_huge_pages, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "edgediff.cli", "export", "SRC", "OUT"])
    linux_with_huge_pages.restart_with_huge_pages(["edgediff", "export", "SRC", "OUT"])
    ((path, args, env),) = calls
    assert path == sys.executable and args == [sys.executable, "-m", "edgediff.cli", "export", "SRC", "OUT"]
    assert env["GLIBC_TUNABLES"] == f"{HUGETLB_TUNABLE}=1"
    linux_with_huge_pages.restart_with_huge_pages(["edgediff", "generate", "a cat"])
    assert len(calls) == 1  # only the export restarts


def test_an_interpreter_that_cannot_start_again_runs_on_as_it_is(linux_with_huge_pages, monkeypatch):
    def refuse(*args):
        raise PermissionError("not allowed")

    monkeypatch.setattr(os, "execve", refuse)
    assert linux_with_huge_pages.restart_with_huge_pages(["edgediff", "export", "SRC", "OUT"]) is None
