"""`taskq worker --processes N`, the supervisor's pure logic: restart delays, how a child's
exit is described, and the options each child gets."""

from __future__ import annotations

import signal

from taskq.worker.supervisor import child_argv, describe_exit, restart_delay


def test_restart_delay_doubles_up_to_a_ceiling() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_describe_exit_names_the_code_or_the_signal() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"


def test_a_childs_own_options_come_last_so_they_win() -> None:
    argv = ["worker", "app.tasks", "--processes", "4", "--metrics-port", "9100"]
    assert child_argv(argv, 2, 7, 9100) == [
        *argv, "--processes", "1", "--supervisor-fd", "7", "--metrics-port", "9102",
    ]  # fmt: skip
    assert child_argv(["worker", "--processes=3", "--", "app"], 0, 5, None) == [
        "worker", "--processes=3", "--processes", "1", "--supervisor-fd", "5", "--", "app",
    ]  # fmt: skip
    # Port 0 asks the system for a free port, in every child.
    assert child_argv(["worker", "app"], 1, 5, 0)[-2:] == ["--metrics-port", "0"]
