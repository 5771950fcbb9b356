"""mDNS announce and `edge discover`, EDGE_<FLAG> variables, sd_notify readiness, and the
journald and JSON log formats.

The announce test runs real `edge worker` processes announcing on loopback and browses for
them; each run announces a cluster id of its own, so workers of other runs on this machine
never count.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge import cli
from edge.envvars import env_table
from edge.logs import JournalFormatter, JsonFormatter, under_journald
from edge.planning.cluster import load_cluster, load_profile
from edge.transport import systemd
from edge.transport.discovery import Announcement, browse, cluster_id
from edge.transport.security import Security
from edge.worker.launch import module_command, spawn_worker, stop_process

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("zeroconf")


def _browse_until(cluster: str, count: int, timeout: float = 20.0) -> list[Announcement]:
    """Browse until exactly ``count`` workers of ``cluster`` answer (mDNS probing takes
    about 1.7 s after a worker listens; a goodbye is heard at once)."""
    end = time.monotonic() + timeout
    found: list[Announcement] = []
    while time.monotonic() < end:
        found = browse(timeout=1.5, cluster=cluster)
        if len(found) == count:
            return found
    raise AssertionError(f"expected {count} workers of cluster {cluster}, found {found}")


# ---------------------------------------------------------------------- announce, discover


def test_workers_announce_and_discover_writes_a_cluster_edge_plan_accepts(tmp_path, monkeypatch,
                                                                          capsys):
    cid = "test-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("EDGE_LOG_FORMAT", "json")  # the workers log JSON lines
    workers = []
    try:
        # Named so that sorting by name differs from the start order, and pi-10 > pi-9.
        for name, device, budget in (("pi-10", "rpi4b-2gb", None),
                                     ("pi-9", "rpi-zero-2w", "300")):
            extra = ["--name", name, "--cluster-id", cid]
            extra += ["--memory-budget", budget] if budget else []
            workers.append(spawn_worker(tmp_path, name, device=device, announce=True,
                                        extra_args=extra))
        found = _browse_until(cid, 2)
        assert [a.name for a in found] == ["pi-9", "pi-10"]
        by_name = {a.name: a for a in found}
        assert by_name["pi-9"].port == workers[1].port
        assert by_name["pi-10"].port == workers[0].port
        assert by_name["pi-9"].addresses == ("127.0.0.1",)
        assert (by_name["pi-9"].profile, by_name["pi-9"].budget_mb) == ("rpi-zero-2w", 300)
        assert by_name["pi-10"].budget_mb == int(load_profile("rpi4b-2gb").memory_budget_mb)
        assert all(a.cluster == cid and a.proto == 1 and not a.tls for a in found)

        out = tmp_path / "cluster.yaml"
        assert cli.main(["discover", "--cluster", cid, "--timeout", "2.5",
                         "--write", str(out)]) == 0
        assert "pi-9" in capsys.readouterr().out
        cluster = load_cluster(out)  # what `edge plan --cluster` reads
        assert [(d.name, d.address, d.profile) for d in cluster.devices] == [
            ("pi-9", f"127.0.0.1:{workers[1].port}", "rpi-zero-2w"),
            ("pi-10", f"127.0.0.1:{workers[0].port}", "rpi4b-2gb")]
        assert cluster.devices[0].memory_mb == 300  # its --memory-budget, not the profile's
        assert "pipeline" in out.read_text()  # the header says the order matters

        # A worker that stops says goodbye: the next browse no longer lists it.
        assert workers[1].stop() == 0
        assert [a.name for a in _browse_until(cid, 1)] == ["pi-10"]
        lines = [json.loads(line) for line in workers[1].log().splitlines()
                 if line.startswith("{")]
        assert any(r["logger"] == "edge.worker.announce" and "announced pi-9" in r["message"]
                   and r["level"] == "INFO" and r["ts"].endswith("Z") for r in lines)
    finally:
        for w in workers:
            w.stop()


def test_discover_json_lists_nothing_of_an_unknown_cluster_and_write_refuses(tmp_path, capsys):
    assert cli.main(["discover", "--cluster", "nobody-" + uuid.uuid4().hex[:6], "--timeout",
                     "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    out = tmp_path / "c.yaml"
    assert cli.main(["discover", "--cluster", "nobody", "--timeout", "0.3",
                     "--write", str(out)]) == 1
    assert not out.exists()
    assert cli.main(["discover", "--cluster", "no/slash", "--timeout", "0.1"]) == 2
    assert "--cluster: expected letters" in capsys.readouterr().err


def test_an_announcement_that_fails_is_a_warning_not_an_error(caplog):
    from edge.worker.announce import announce

    # An address on no interface of this machine: zeroconf cannot open its socket there.
    announcer = announce("203.0.113.5", 50051, "nowhere", "rpi4b-2gb", 0, "c", False)
    announcer._thread.join(10)
    announcer.stop()
    assert not announcer.registered.is_set()
    assert "could not announce this worker" in caplog.text and "serves anyway" in caplog.text



def test_an_announcement_that_fails_after_zeroconf_started_closes_it(monkeypatch, caplog):
    import zeroconf

    from edge.worker.announce import announce

    opened = []

    class Recorded(zeroconf.Zeroconf):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    def refuse(*args, **kwargs):
        raise ValueError("a record zeroconf refuses")

    monkeypatch.setattr(zeroconf, "Zeroconf", Recorded)
    monkeypatch.setattr(zeroconf, "ServiceInfo", refuse)
    announcer = announce("127.0.0.1", 50051, "leak", "rpi4b-2gb", 0, "c", False)
    announcer._thread.join(10)
    assert "could not announce this worker" in caplog.text
    assert len(opened) == 1 and opened[0].done  # its sockets and threads closed
    announcer.stop()


def test_cluster_id_is_a_hash_of_the_ca_the_same_for_every_bundle(tmp_path):
    from edge.transport.certs import init_ca, issue

    init_ca(tmp_path)
    a = Security.from_dir(issue(tmp_path, "a"))
    b = Security.from_dir(issue(tmp_path, "b", role="client"))
    assert cluster_id(a) == cluster_id(b)
    assert re.fullmatch(r"[0-9a-f]{12}", cluster_id(a))
    assert cluster_id(Security()) == "default"
    assert cluster_id(a, explicit="lab") == "lab"
    init_ca(tmp_path / "other")
    assert cluster_id(Security.from_dir(issue(tmp_path / "other", "c"))) != cluster_id(a)


def test_announcement_txt_round_trip_and_best_address():
    import ipaddress

    a = Announcement("pi-1", ("127.0.0.1", "10.0.0.11"), 50051, "rpi4b-2gb", 1550, 1, "c1",
                     True, "0.1.0")
    txt = a.txt()
    assert Announcement.from_txt(txt, a.addresses, a.port, "x") == a
    assert a.best_address([ipaddress.ip_network("10.0.0.0/24")]) == "10.0.0.11:50051"
    assert a.best_address([]) == "10.0.0.11:50051"  # not loopback when there is another
    # Something else on _edge._tcp with a malformed TXT: defaults, not an exception.
    odd = Announcement.from_txt({"budget_mb": "lots", "proto": "inf"}, ("127.0.0.1",), 1,
                                "thing")
    assert (odd.name, odd.budget_mb, odd.proto, odd.profile) == ("thing", 0, 0, "unknown")


def test_browse_leaves_out_an_instance_without_an_address(monkeypatch):
    # Anyone on the LAN can announce: one that resolves to no address is left out, not an
    # IndexError in best_address for `edge discover`.
    from edge.transport import discovery

    class Info:
        port, properties = 50051, {b"name": b"ghost"}

        def parsed_addresses(self):
            return []

    class Conf:
        def __init__(self, **kwargs):
            pass

        def get_service_info(self, *args, **kwargs):
            return Info()

        def close(self):
            pass

    class Browser:
        def __init__(self, conf, kind, listener):
            listener.add_service(conf, kind, "ghost." + kind)

        def cancel(self):
            pass

    monkeypatch.setattr(discovery, "_zeroconf", lambda: (Conf, SimpleNamespace(V4Only=4),
                                                         Browser))
    assert discovery.browse(0.01) == []


# ---------------------------------------------------------------------- environment


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("EDGE_"):
            monkeypatch.delenv(var)
    return monkeypatch


def _parse(argv: list[str]):
    from edge.envvars import resolve

    return resolve(cli.build_parser().parse_args(argv))


def test_every_worker_flag_reads_its_variable_and_the_command_line_wins(clean_env):
    clean_env.setenv("EDGE_MAX_QUEUE", "7")
    clean_env.setenv("EDGE_MEMORY_BUDGET", "250.5")
    clean_env.setenv("EDGE_NO_ANNOUNCE", "yes")
    clean_env.setenv("EDGE_DEVICE", "rpi-zero-2w")
    clean_env.setenv("EDGE_BUNDLE", "/opt/edge/certs")  # --certs ($EDGE_CERTS is the CA dir)
    args = _parse(["worker"])
    assert (args.max_queue, args.memory_budget, args.no_announce, args.device, args.certs) == (
        7, 250.5, True, "rpi-zero-2w", "/opt/edge/certs")
    args = _parse(["worker", "--max-queue", "9", "--device", "rpi5-8gb"])
    assert (args.max_queue, args.device) == (9, "rpi5-8gb")
    clean_env.setenv("EDGE_NO_ANNOUNCE", "0")
    assert _parse(["worker"]).no_announce is False


def test_a_required_coordinator_flag_may_come_from_the_environment(clean_env):
    clean_env.setenv("EDGE_PLAN", "/srv/build/plan.json")
    clean_env.setenv("EDGE_NO_FAILOVER", "1")
    args = _parse(["coordinator"])
    assert (args.plan, args.no_failover, args.listen) == ("/srv/build/plan.json", True,
                                                          "0.0.0.0:50050")


@pytest.mark.parametrize("var, value, message", [
    ("EDGE_MAX_QUEUE", "lots",
     "$EDGE_MAX_QUEUE (for --max-queue): expected a whole number > 0, got 'lots'"),
    ("EDGE_NO_ANNOUNCE", "maybe",
     "$EDGE_NO_ANNOUNCE (for --no-announce): expected 1/true/yes/on or 0/false/no/off, "
     "got 'maybe'"),
    ("EDGE_NAME", "pi.1", "--name: expected a name of letters, digits"),
])
def test_a_bad_value_names_its_variable_and_exits_2(clean_env, capsys, var, value, message):
    clean_env.setenv(var, value)
    assert cli.main(["worker", "--listen", "127.0.0.1:0"]) == 2
    assert message in capsys.readouterr().err
    # Another command does not read it, so does not fail on it.
    assert cli.main(["discover", "--cluster", "none", "--timeout", "0.1", "--json"]) == 0


@pytest.mark.parametrize("var, value, message", [
    ("EDGE_LOG_FORMAT", "xml", "--log-format / $EDGE_LOG_FORMAT: expected text or json, got 'xml'"),
    ("EDGE_LOG", "loud", "--log-level / $EDGE_LOG: expected one of DEBUG, INFO, WARNING, ERROR, "
                         "CRITICAL, got 'loud'"),
])
def test_a_bad_log_variable_says_which(clean_env, capsys, var, value, message):
    clean_env.setenv(var, value)
    assert cli.main(["discover", "--cluster", "none", "--timeout", "0.1", "--json"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("var", ["EDGE_LOG", "EDGE_LOG_FORMAT"])
def test_an_empty_log_variable_counts_as_unset(clean_env, var):
    # As for every EDGE_* flag: an env file's `EDGE_LOG=` is the default, not an error.
    clean_env.setenv(var, "")
    args = cli.build_parser().parse_args(["devices"])
    assert (args.log_level, args.log_format) == ("WARNING", "text")


def test_the_readme_lists_every_variable():
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices
    table = env_table({"edge worker": subs["worker"], "edge coordinator": subs["coordinator"]})
    readme = (ROOT / "README.md").read_text()
    assert table in readme, ("README's table of environment variables is out of date; "
                             "paste this one:\n" + table)


# ---------------------------------------------------------------------- systemd, journald


def _datagram_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock


def test_notify_reaches_a_path_socket_and_an_abstract_one(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False  # not under systemd: nothing to do
    with _datagram_socket(str(tmp_path / "notify")) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert systemd.ready("serving")
        assert sock.recv(4096).decode().splitlines()[:2] == ["READY=1", "STATUS=serving"]
    name = "edge-test-" + uuid.uuid4().hex
    with _datagram_socket("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.stopping()
        assert sock.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=stopping"]
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.ready() is False  # logged, never raised


def test_a_real_worker_notifies_ready_after_it_binds_and_logs_for_journald(tmp_path):
    """`edge worker` configured from the environment only, as a systemd unit does, with
    stderr on a file that $JOURNAL_STREAM names."""
    sock = _datagram_socket(str(tmp_path / "notify"))
    stderr = open(tmp_path / "stderr", "wb")
    st = os.fstat(stderr.fileno())
    port_file = tmp_path / "port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify"), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
               EDGE_LISTEN="127.0.0.1:0", EDGE_PORT_FILE=str(port_file),
               EDGE_CACHE_DIR=str(tmp_path / "cache"), EDGE_NO_ANNOUNCE="1", EDGE_LOG="INFO")
    process = subprocess.Popen(module_command("edge", "worker"), env=env, stderr=stderr,
                               stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        ready = sock.recv(4096).decode().splitlines()
        assert ready[0] == "READY=1"
        assert port_file.exists()  # READY comes after the bind
        assert f"MAINPID={process.pid}" in ready
        assert stop_process(process, 20) == 0
        assert sock.recv(4096).decode().splitlines()[0] == "STOPPING=1"
    finally:
        stop_process(process, 5)
        sock.close()
        stderr.close()
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert "<6>edge.worker.server: stopping: no new requests, 5 s for calls in flight" in lines
    assert not any(re.match(r"\d{4}-\d\d-\d\d", line) for line in lines)  # no timestamps


def test_journald_is_detected_by_device_and_inode_only(tmp_path, monkeypatch):
    with open(tmp_path / "log", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(stream)
        assert not under_journald(other)  # inherited by a child whose stderr is elsewhere
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not under_journald(sys.stderr)


def test_journal_and_json_formatters():
    try:
        raise ValueError("bad")
    except ValueError:
        exc = sys.exc_info()
    record = logging.LogRecord("edge.x", logging.WARNING, __file__, 1, "hello %s", ("you",),
                               exc)
    lines = JournalFormatter().format(record).splitlines()
    assert lines[0] == "<4>edge.x: hello you"
    assert all(line.startswith("<4>") for line in lines) and "ValueError: bad" in lines[-1]
    out = json.loads(JsonFormatter().format(record))
    assert (out["level"], out["logger"], out["message"]) == ("WARNING", "edge.x", "hello you")
    assert "ValueError: bad" in out["exc"]
    error = logging.LogRecord("e", logging.ERROR, __file__, 1, "m", (), None)
    assert JournalFormatter().format(error) == "<3>e: m"
