"""``nano generate -i``: the session's commands (``stages/chat.py``), and the terminal loop driven in a real
pseudo-terminal (``commands/chat.py``: readline, the history file, ``\"\"\"`` blocks, /help, Ctrl-D)."""

import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from test_generate_cli import build_model, run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def session_factory(model_dir):
    """New sessions on one loaded model (loading is the slow part)."""
    from nanocli.stages.chat import ChatSession
    from nanocli.stages.generate import GenerateOptions, load

    options = GenerateOptions(model=str(model_dir), greedy=True, max_new_tokens=3)
    loaded = load(options)
    return lambda **kw: ChatSession(options, loaded, **kw)


# ------------------------------------------------------------------------------------------ the session
def test_set_checks_values_as_the_flags_do(session_factory):
    s = session_factory()
    assert s.send("/set temperature 0.3").note == "(temperature: 0.3, --greedy off)"
    assert s.options.temperature == 0.3 and not s.options.greedy and s.options.sampling_temperature == 0.3
    assert s.send("/set temperature abc").error == "/set temperature: 'abc' is not a number"
    assert s.send("/set temperature -1").error.startswith("/set temperature must be a finite number >= 0")
    assert s.send("/set top_p 2").error == "/set top_p must be in (0, 1], got 2.0"
    assert s.send("/set top-p 0.5").note == "(top_p: 0.5)"  # - or _
    assert s.send("/set top_k 2.5").error == "/set top_k: '2.5' is not an integer"
    assert s.send("/set top_k 4").note == "(top_k: 4)" and s.options.top_k == 4
    assert s.send("/set budget -2").error.startswith("/set budget must be at least 0")
    assert s.send("/set budget 0").note == "(thinking budget: 0)" and s.options.thinking_budget == 0
    assert s.send("/budget off").note == "(thinking budget: off)" and s.options.thinking_budget is None
    assert s.send("/set system Be brief.").note == "(system: Be brief.)" and s.options.system == "Be brief."
    assert s.send("/set system off").note == "(system: off)" and s.options.system is None
    assert s.send("/set colour red").error.startswith("/set colour: unknown setting; use one of temperature")
    assert s.send("/set temperature").error == "/set temperature needs a value"
    assert "temperature 0.3" in s.send("/set").note and "top_k 4" in s.send("/set").note
    assert s.options.top_p == 0.5  # the bad values left the settings as they were
    assert s.history == []  # and nothing went to the model


def test_commands_are_answered_locally(session_factory):
    s = session_factory()
    turn = s.send("/foo bar")
    assert turn.error == "unknown command /foo; /help lists them" and not turn.generated and s.history == []
    assert s.send("/think now").error == "/think takes no value" and s.history == []
    assert "/set NAME VALUE" in s.send("/help").note and "/save FILE" in s.send("/help").note
    assert s.send("/stats").note == "(figures line on)" and s.show_stats
    assert s.send("/stats").note == "(figures line off)" and not s.show_stats
    assert s.send("/save").error == "/save takes a file name"
    turn = s.say("/not a command")  # say() is always a user turn (a multi-line block)
    assert turn.generated and s.history[0] == {"role": "user", "content": "/not a command"}


def test_save_and_load_the_conversation(session_factory, tmp_path):
    s = session_factory()
    s.send("/set system Be brief.")
    s.send("hello")
    s.say("two\nlines")
    assert s.send(f"/save {tmp_path / 'c.json'}").note == f"(saved 5 messages to {tmp_path / 'c.json'})"
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == "Be brief." and saved["messages"][3]["content"] == "two\nlines"
    t = session_factory()
    assert t.send(f"/load {tmp_path / 'c.json'}").note.startswith("(loaded 4 messages from")
    assert t.options.system == "Be brief." and t.history == s.history
    assert t.send("again").result is not None and len(t.history) == 6  # the chat goes on from there
    (tmp_path / "list.json").write_text(json.dumps(saved["messages"][1:3]))  # a bare list of messages
    assert t.send(f"/load {tmp_path / 'list.json'}").note.startswith("(loaded 2 messages")
    assert t.options.system is None


@pytest.mark.parametrize("content,needle", [
    (None, "cannot be read (No such file or directory)"),
    ("{not json", "not valid JSON (line 1"),
    ('{"prompt": "x"}', 'expected {"messages": [...]}'),
    ('{"messages": [1]}', "messages[0]: a message must be an object"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
     "messages[1] has role 'system'"),
])
def test_load_refuses_a_bad_file_in_one_line(session_factory, tmp_path, content, needle):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    s = session_factory()
    s.send("hello")
    turn = s.send(f"/load {path}")
    assert turn.error.startswith(f"/load {path}: ") and needle in turn.error and "\n" not in turn.error
    assert len(s.history) == 2  # the conversation is left as it was


def test_save_to_a_missing_directory_is_one_line(session_factory, tmp_path):
    turn = session_factory().send(f"/save {tmp_path / 'no' / 'c.json'}")
    assert turn.error.startswith(f"/save {tmp_path / 'no' / 'c.json'}: cannot be written")


# ------------------------------------------------------------------------------------------ the loop, piped
def test_piped_chat_shows_stats_only_when_asked_and_hides_thinking(capsys, monkeypatch, model_dir):
    args = ("-m", model_dir, "-i", "--greedy", "--max-new-tokens", "4")
    code, out, err = run(capsys, monkeypatch, *args, stdin="hello\nagain\n")
    assert code == 0 and "tok/s" not in err and "<think>" in out  # no figures line by default
    code, out, err = run(capsys, monkeypatch, *args, "--stats", stdin="hello\n/foo\n")
    assert code == 0 and err.count(" tokens, generated ") == 1  # one answer, one line; /foo never reached the model
    code, out, err = run(capsys, monkeypatch, *args, stdin="hello\n/stats\nagain\n/stats\nthird\n")
    assert code == 0 and err.count(" tokens, generated ") == 1 and "(figures line on)" in out
    code, out, err = run(capsys, monkeypatch, *args, "--hide-thinking", stdin="hello\n")
    assert code == 0 and "<think>" not in out


def test_piped_block_is_one_turn(capsys, monkeypatch, model_dir, tmp_path):
    conv = tmp_path / "c.json"
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "-i", "--greedy", "--max-new-tokens", "2",
                         stdin=f'"""\n/first\n\nthird"""\n"""one line"""\n/save {conv}\n')
    assert code == 0, err
    users = [m["content"] for m in json.loads(conv.read_text())["messages"] if m["role"] == "user"]
    assert users == ["/first\n\nthird", "one line"]


# ------------------------------------------------------------------------------------------ the loop, in a pty
def threads_taking_ctrl_c(pid: int) -> list[int]:
    """The threads of ``pid`` that do not block SIGINT (Linux's /proc; [pid] elsewhere). A Ctrl-C at the prompt
    goes to any one of them: one that is not the main thread swallows it and the prompt waits for the next key
    (the thread torch's import starts did, until nano imported torch with SIGINT blocked)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return [pid]
    taking = []
    for task in sorted(tasks.iterdir(), key=lambda p: int(p.name)):
        fields = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        if not int(fields["SigBlk"], 16) & (1 << (signal.SIGINT - 1)):
            taking.append(int(task.name))
    return taking


class Terminal:
    """A child process on a pseudo-terminal: type lines, wait for text (an ``expect`` on the stdlib's pty)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the command
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.exited = False
        self.seen = ""  # everything read so far
        self.pending = ""  # read but not yet matched

    def expect(self, needle: str, timeout: float = 30) -> str:
        """Wait for ``needle``; the text up to and including it."""
        deadline = time.monotonic() + timeout
        while needle not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {needle!r} within {timeout} s; the terminal shows:\n{self.seen[-3000:]}")
            try:
                data = os.read(self.fd, 65536).decode("utf-8", "replace")
            except OSError:  # EIO: the child closed the terminal
                data = ""
            if not data:
                raise AssertionError(f"the process ended before {needle!r}:\n{self.seen[-3000:]}")
            self.seen += data
            self.pending += data
        end = self.pending.index(needle) + len(needle)
        got, self.pending = self.pending[:end], self.pending[end:]
        return got

    def wait_until_reading(self, timeout: float = 10) -> None:
        """Wait until the child's main thread sleeps (Linux: /proc/PID/stat, three readings 20 ms apart), as it
        does in readline's wait for a key. A SIGINT that lands while readline is still handling the previous key
        sets Python's flag but interrupts no wait, and readline then waits for the next key before Python sees
        it (CPython's readline; a person's Ctrl-C comes far later than that instant, the test's came at once)."""
        stat = Path(f"/proc/{self.pid}/stat")
        if not stat.exists():
            time.sleep(0.5)
            return
        deadline, asleep = time.monotonic() + timeout, 0
        while asleep < 3 and time.monotonic() < deadline:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            asleep = asleep + 1 if state == "S" else 0
            time.sleep(0.02)

    def line(self, text: str) -> None:
        os.write(self.fd, text.encode() + b"\r")

    def wait(self, timeout: float = 30) -> int:
        """The exit code, reading what the child still writes (so it never blocks on a full terminal)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exited = True
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:
                    pass
        raise AssertionError(f"still running after {timeout} s:\n{self.seen[-3000:]}")

    def kill(self) -> None:
        if not self.exited:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.exited = True
        os.close(self.fd)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_chat_in_a_terminal(model_dir, tmp_path):
    cache = tmp_path / "cache"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "NANO_CACHE": str(cache), "HOME": str(tmp_path),
           "TERM": "xterm", "NO_COLOR": "1", "COLUMNS": "200", "LINES": "50"}
    term = Terminal([sys.executable, "-m", "nanocli", "generate", "-m", str(model_dir), "-i", "--greedy",
                     "--max-new-tokens", "4", "--stats"], env)
    try:
        term.expect("/help lists the commands")
        term.expect("you> ")
        term.line("/help")
        help_text = term.expect("you> ")
        for needle in ("/set NAME VALUE", "/save FILE", "/load FILE", "/stats", '"""', "Ctrl-D leaves"):
            assert needle in help_text, needle

        term.line("/set temperature 0.3")
        assert "(temperature: 0.3, --greedy off)" in term.expect("you> ")
        term.line("/set temperature abc")
        assert "/set temperature: 'abc' is not a number" in term.expect("you> ")  # the session goes on
        term.line("/set greedy")
        assert "unknown setting" in term.expect("you> ")
        term.line("/set temperature 0")  # back to argmax, so the answers below are reproducible
        term.expect("you> ")

        term.line("/foo")
        local = term.expect("you> ")
        assert "unknown command /foo; /help lists them" in local
        assert "tok/s" not in local and "<think>" not in local  # the model was not called

        term.line("hello")
        assert "tok/s" in term.expect("you> ")  # an answer, and its figures line (--stats)
        assert threads_taking_ctrl_c(term.pid) == [term.pid]  # only the main thread: see below
        term.line('"""')
        term.expect("... ")
        term.line("first line")
        term.expect("... ")
        term.line('second line"""')
        assert "tok/s" in term.expect("you> ")  # the block went to the model as one turn

        conv = tmp_path / "conv.json"
        term.line(f"/save {conv}")
        assert "(saved 4 messages" in term.expect("you> ")
        messages = json.loads(conv.read_text())["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[0]["content"] == "hello" and messages[2]["content"] == "first line\nsecond line"

        term.line("/reset")
        assert "(history cleared)" in term.expect("you> ")
        term.line(f"/load {conv}")
        assert "(loaded 4 messages" in term.expect("you> ")
        term.line(f"/save {tmp_path / 'again.json'}")
        term.expect("you> ")
        assert json.loads((tmp_path / "again.json").read_text())["messages"] == messages  # restored
        term.line(f"/load {tmp_path / 'missing.json'}")
        assert "cannot be read" in term.expect("you> ")

        term.line("/stats")
        assert "(figures line off)" in term.expect("you> ")
        term.line("one more")
        assert "tok/s" not in term.expect("you> ")

        term.line('"""')
        term.expect("... ")
        os.write(term.fd, b"half a block")
        term.expect("half a block")  # echoed: readline holds the line before the Ctrl-C arrives
        term.wait_until_reading()
        os.write(term.fd, b"\x03")  # Ctrl-C drops the line (here a block), not the chat
        assert "(Ctrl-D or /exit leaves)" in term.expect("you> ")
        term.line(f"/save {conv}")
        assert "(saved 6 messages" in term.expect("you> ")  # the dropped block never became a turn

        os.write(term.fd, b"\x04")  # Ctrl-D at an empty prompt
        assert term.wait() == 0
    finally:
        term.kill()
    history = (cache / "chat_history").read_text()
    assert "/set temperature 0.3" in history and "second line" in history  # readline's history, kept
    assert (cache / "chat_history").stat().st_mode & 0o077 == 0  # private to the user
