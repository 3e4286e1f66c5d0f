"""The shared file primitives: the fault hook, the up-front writability and space check."""

import os
import subprocess
import sys

import pytest

from dtrak_core import io


def test_format_bytes_uses_powers_of_1024():
    assert io.format_bytes(512) == "512 B"
    assert io.format_bytes(1536) == "1.5 KB"
    assert io.format_bytes(3 * 1024 ** 3) == "3.0 GB"


def test_ensure_writable_accepts_a_missing_folder_under_a_writable_one(tmp_path):
    io.ensure_writable(tmp_path / "a" / "b", need_bytes=1)
    assert not (tmp_path / "a").exists()  # it checks, it creates nothing
    assert list(tmp_path.iterdir()) == []


def test_ensure_writable_names_the_folder_and_the_numbers_when_space_is_short(tmp_path):
    with pytest.raises(io.OutputError, match=rf"features in {tmp_path}: needs .* TB, .* free"):
        io.ensure_writable(tmp_path, need_bytes=10 ** 16, what="features")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_ensure_writable_refuses_a_read_only_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(io.OutputError, match=rf"cannot write the scores to {tmp_path}/out: Permission denied"):
            io.ensure_writable(tmp_path / "out", what="scores")
    finally:
        tmp_path.chmod(0o700)


def test_ensure_writable_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(io.OutputError, match="is not a folder"):
        io.ensure_writable(tmp_path / "f" / "out")


def _run_points(env_value: str | None, tmp_path) -> tuple[int, str]:
    code = ("from dtrak_core.io import fault_point\n"
            "for i in range(3):\n"
            "    fault_point('a'); print('a', i, flush=True)\n"
            "    fault_point('b'); print('b', i, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != io.FAULT_ENV}
    if env_value is not None:
        env[io.FAULT_ENV] = env_value
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    return done.returncode, done.stdout


def test_fault_point_kills_at_the_named_point_and_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.getcwd())
    rc, out = _run_points(None, tmp_path)
    assert rc == 0 and out.split("\n")[:-1] == [f"{p} {i}" for i in range(3) for p in "ab"]
    rc, out = _run_points("b@2", tmp_path)
    assert rc == -9 and out.split() == "a 0 b 0 a 1".split()
    rc, out = _run_points("a", tmp_path)
    assert rc == -9 and out == ""
    rc, out = _run_points("c", tmp_path)  # a point that is never reached: no effect
    assert rc == 0


def test_fault_point_stop_pauses_the_process_until_it_is_continued(tmp_path, monkeypatch):
    import signal

    monkeypatch.setenv("PYTHONPATH", os.getcwd())
    code = "from dtrak_core.io import fault_point\nprint('before', flush=True)\nfault_point('p')\nprint('after')\n"
    env = {**os.environ, io.FAULT_ENV: "p@1:stop"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "before\n"
    _, status = os.waitpid(child.pid, os.WUNTRACED)  # returns once the child has stopped itself
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
    child.send_signal(signal.SIGCONT)
    assert child.stdout.read() == "after\n" and child.wait() == 0
