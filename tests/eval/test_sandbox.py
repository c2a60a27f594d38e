"""The code-execution sandbox contains hostile completions, and scores each as failed with its reason.

The signal attacks are built so that a broken sandbox cannot hurt anything: the program first checks that
it no longer runs as the evaluator's uid (if it does, it stops with an AssertionError before attacking,
and the test fails), and the targeted victim is a throwaway ``sleep`` started by the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from baichuan2.eval.sandbox import Limits, contained_uid, run_program, run_programs

FAST = Limits(timeout=3.0, cpu_seconds=3, memory_mb=1024)
root_only = pytest.mark.skipif(contained_uid() is None, reason="uid isolation needs root (CI runs as root)")
GUARD = f"import os\nassert os.getuid() != {os.getuid()} and os.geteuid() != {os.geteuid()}, 'still the evaluator'\n"


def test_a_correct_program_passes_and_a_wrong_one_fails_with_its_error():
    assert run_program("assert sum([1, 2]) == 3\nprint('ok')", FAST).passed
    v = run_program("def f():\n    return 1\nassert f() == 2, 'wrong answer'", FAST)
    assert v.status == "failed" and v.reason == "AssertionError: wrong answer"
    v = run_program("import sys\nsys.exit(3)", FAST)
    assert v.status == "failed" and "exit status 3" in v.reason


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    v = run_program("while True:\n    pass", FAST)
    assert v.status == "timeout" and "timed out" in v.reason and not v.passed
    assert time.monotonic() - start < 30


def test_running_out_of_cpu_time_is_a_timeout_too():
    # which limit fires first depends on the machine's load; an idle CPU hits the CPU-time one
    v = run_program("while True:\n    pass", Limits(timeout=120.0, cpu_seconds=1, memory_mb=1024))
    assert v.status == "timeout" and "timed out" in v.reason and not v.passed


def test_a_ten_gigabyte_allocation_fails_with_memory_error():
    v = run_program("x = bytearray(10 * 1024 ** 3)\nprint(len(x))", FAST)
    assert v.status == "failed" and "MemoryError" in v.reason


def test_a_fork_bomb_is_capped_and_every_fork_is_killed():
    v = run_program("import os\nwhile True:\n    os.fork()", FAST)
    assert not v.passed and v.reason
    time.sleep(0.2)
    uid_count = subprocess.run(["ps", "-e", "--no-headers"], capture_output=True, text=True).stdout.count("\n")
    assert uid_count < 2000  # the machine still has room (a live fork bomb would fill the process table)


@root_only
def test_a_process_that_leaves_the_process_group_is_still_killed():
    marker = f"escape-{os.getpid()}-{time.time_ns()}"
    prog = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    open('/proc/self/comm', 'w').write('{marker[:15]}')\n"
            "    time.sleep(300)\nelse:\n    time.sleep(300)")
    v = run_program(prog, FAST)
    assert v.status == "timeout"
    time.sleep(0.2)
    assert marker[:15] not in subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True).stdout


@root_only
def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "owned.txt"
    v = run_program(f"open({str(target)!r}, 'w').write('pwned')", FAST)
    assert v.status == "failed" and "PermissionError" in v.reason and not target.exists()
    # ... while its own working directory is writable
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'", FAST).passed


@root_only
def test_signals_cannot_reach_other_processes():
    victim = subprocess.Popen(["sleep", "60"])  # a throwaway process owned by the evaluator's uid
    try:
        v = run_program(GUARD + f"import signal\nos.kill({victim.pid}, signal.SIGKILL)", FAST)
        assert v.status == "failed" and "PermissionError" in v.reason
        # kill -9 -1 reaches only the sandbox's own uid (the guard stops it first if the uid were ours)
        v = run_program(GUARD + "os.system('kill -9 -1')\nimport time\ntime.sleep(1)\nprint('survived')", FAST)
        assert v.status == "failed" and "signal 9" in v.reason, v
        # a forked helper's kill(-1) takes down the program itself, nothing else
        v = run_program(GUARD + "import signal, time\nif os.fork() == 0:\n    os.kill(-1, signal.SIGKILL)\n"
                        "time.sleep(2)", FAST)
        assert v.status == "failed" and "signal 9" in v.reason, v
        assert victim.poll() is None  # the victim (and this test process) are alive
    finally:
        victim.kill()
        victim.wait()


def test_no_secrets_are_inherited_and_stdin_is_closed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    prog = ("import os, sys\nassert 'OPENAI_API_KEY' not in os.environ, 'leaked'\n"
            "assert sys.stdin is None or sys.stdin.read() == ''\n"
            "assert os.path.realpath(os.getcwd()) == os.path.realpath(os.environ['HOME'])\n"
            "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PYTHONDONTWRITEBYTECODE', "
            "'PYTHONIOENCODING', 'LC_CTYPE'}, sorted(os.environ)")
    v = run_program(prog, FAST)
    assert v.passed, v


def test_each_program_gets_a_fresh_directory_that_is_removed():
    progs = ["import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')\n"
             "open('left.txt', 'w').write('x')\nprint(os.getcwd())"] * 3
    assert all(v.passed for v in run_programs(progs, FAST, workers=2))


def test_the_evaluator_survives_a_batch_of_hostile_programs():
    hostile = ["while True: pass", "import os\nwhile True: os.fork()", "x = ' ' * (10 * 1024 ** 3)",
               "import sys\nsys.stdout.write('x' * (50 << 20))", "raise SystemExit(0)"]
    verdicts = run_programs(hostile, FAST, workers=2)
    assert [v.status for v in verdicts][:3] == ["timeout", verdicts[1].status, "failed"]
    assert not verdicts[1].passed and not verdicts[3].passed and verdicts[4].passed
    assert "File too large" in verdicts[3].reason  # output beyond the file-size limit (Python ignores SIGXFSZ)
    assert sys.executable  # still here
