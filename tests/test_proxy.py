"""The gRPC storage proxy: a real `hposvc storage serve` process on loopback, in front of
a real SQLite file and a real PostgreSQL database, driven through ``grpc://`` URLs.

What a worker does through the proxy (create a study, ask, report, tell, attributes, claim
a WAITING trial) must land in the database exactly as it would directly; a non-loopback
bind is refused without ``--allow-remote``; bad URLs and a missing proxy are named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState, create_trial

from hposvc.cli import main
from hposvc.errors import InvalidInputError, StorageError
from hposvc.proxy import is_loopback
from hposvc.storage import grpc_storage, open_storage
from tests.conftest import Proxy, free_port

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture
def proxy(sql_storage_url: str, tmp_path: Path) -> Iterator[Proxy]:
    """A proxy in front of a fresh storage, once per database (sqlite, postgres)."""
    p = Proxy(sql_storage_url, tmp_path / "proxy.log")
    try:
        yield p
    finally:
        p.stop()


def test_a_study_through_the_proxy_is_the_study_in_the_database(proxy: Proxy) -> None:
    remote = proxy.storage()
    study = optuna.create_study(study_name="via-proxy", storage=remote, direction="maximize")
    study.set_user_attr("hposvc.spec", {"task": "digits", "n_trials": 3})
    for i in range(3):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("optimizer", ["sgd", "adam"])
        for epoch in range(3):
            trial.report(0.5 + 0.1 * epoch + 0.01 * i, epoch)
        trial.set_user_attr("hposvc.config", {"lr": lr, "epochs": 3})
        study.tell(trial, 0.8 + 0.01 * i)

    # Read back directly from the database, bypassing the proxy and its caches.
    direct = optuna.load_study(study_name="via-proxy", storage=open_storage(proxy.storage_url))
    assert direct.direction == optuna.study.StudyDirection.MAXIMIZE
    assert direct.user_attrs == {"hposvc.spec": {"task": "digits", "n_trials": 3}}
    assert [t.state for t in direct.trials] == [TrialState.COMPLETE] * 3
    assert [t.value for t in direct.trials] == pytest.approx([0.80, 0.81, 0.82])
    assert direct.best_trial.number == 2
    assert direct.trials[1].intermediate_values == pytest.approx({0: 0.51, 1: 0.61, 2: 0.71})
    assert direct.trials[0].user_attrs == {"hposvc.config": {"lr": direct.trials[0].params["lr"], "epochs": 3}}
    assert set(direct.trials[0].params) == {"lr", "optimizer"}
    # ... and through the proxy again, as `best` and `trials` would read it.
    again = optuna.load_study(study_name="via-proxy", storage=proxy.storage())
    assert again.best_trial.params == direct.best_trial.params
    assert [s.study_name for s in optuna.get_all_study_summaries(remote, include_best_trial=False)] == ["via-proxy"]
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(study_name="via-proxy", storage=remote)


def test_a_waiting_trial_is_claimed_once_through_the_proxy(proxy: Proxy) -> None:
    # The queue's claim: WAITING -> RUNNING succeeds for one caller only, even when the
    # callers are a proxy client and a direct client of the same database.
    remote = proxy.storage()
    study = optuna.create_study(study_name="claims", storage=remote)
    study.add_trials([create_trial(state=TrialState.WAITING) for _ in range(2)])
    sid = remote.get_study_id_from_name("claims")
    direct = open_storage(proxy.storage_url)
    waiting = remote.get_all_trials(sid, states=(TrialState.WAITING,))
    assert [t.number for t in waiting] == [0, 1]
    first = waiting[0]._trial_id
    assert remote.set_trial_state_values(first, TrialState.RUNNING) is True
    assert direct.set_trial_state_values(first, TrialState.RUNNING) is False
    assert remote.set_trial_state_values(first, TrialState.RUNNING) is False
    assert [t.number for t in remote.get_all_trials(sid, states=(TrialState.WAITING,))] == [1]
    assert direct.set_trial_state_values(waiting[1]._trial_id, TrialState.RUNNING) is True
    assert remote.get_all_trials(sid, states=(TrialState.WAITING,)) == []
    assert remote.set_trial_state_values(first, TrialState.COMPLETE, [1.0]) is True
    assert direct.get_trial(first).state == TrialState.COMPLETE


SPEC = """\
[study]
name = "viaproxy"
task = "digits"
n_trials = 4
sampler = "random"
pruner = "none"
seed = 5

[train]
epochs = 150

[model]
depth = 1
width = 32

[space]
optimizer = ["adam", "momentum"]
lr = { low = 1e-3, high = 1e-1, log = true }
"""


@pytest.mark.slow
def test_two_workers_through_the_proxy_one_killed(tmp_path: Path, postgres_url: str, mlflow_server) -> None:
    # The many-worker recipe: workers know only grpc://; one dies with kill -9 mid-trial, the
    # other notices its heartbeat stop, fails and re-queues its trial, and finishes the study.
    proxy = Proxy(postgres_url, tmp_path / "proxy.log")
    try:
        proxy.storage()
        (tmp_path / "viaproxy.toml").write_text(SPEC)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HPOSVC_HEARTBEAT_INTERVAL": "1", "HPOSVC_GRACE_PERIOD": "3"}
        cli = [sys.executable, "-m", "hposvc.cli"]
        common = ["--storage", proxy.url, "--tracking-uri", mlflow_server.uri]
        created = subprocess.run([*cli, "study", "create", str(tmp_path / "viaproxy.toml"), *common, "--json"], capture_output=True, text=True, timeout=180, env=env)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["waiting"] == 4  # the whole study: LOOKAHEAD is 4 too

        def worker(name: str) -> subprocess.Popen:
            with open(tmp_path / f"{name}.stderr", "wb") as log:
                return subprocess.Popen([*cli, "worker", "viaproxy", *common, "--quiet", "--json", "--worker-id", name], env=env, stdout=subprocess.PIPE if name == "survivor" else subprocess.DEVNULL, stderr=log)

        def trials() -> list[optuna.trial.FrozenTrial]:  # straight from PostgreSQL
            return optuna.load_study(study_name="viaproxy", storage=postgres_url).trials

        victim, survivor = worker("victim"), worker("survivor")
        deadline = time.monotonic() + 300
        while not any(t.state == TrialState.RUNNING and t.user_attrs.get("hposvc.worker") == "victim" and t.intermediate_values for t in trials()):
            assert victim.poll() is None, (tmp_path / "victim.stderr").read_text()
            assert time.monotonic() < deadline, "the victim never got into the middle of a trial"
            time.sleep(0.25)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed = [t for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("hposvc.worker") == "victim"]
        assert len(killed) == 1, killed

        out, _ = survivor.communicate(timeout=500)
        assert survivor.returncode == 0, (tmp_path / "survivor.stderr").read_text()
        final = trials()
        done = [t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == 4, [(t.number, t.state.name) for t in final]
        assert not [t for t in final if t.state == TrialState.RUNNING]
        # two workers topping the queue up at the same moment can leave a queued trial that never ran
        assert not [t for t in final if t.state == TrialState.WAITING and (t.params or t.user_attrs)]
        assert next(t for t in final if t.number == killed[0].number).state == TrialState.FAIL
        retry = [t for t in final if t.system_attrs.get("failed_trial") == killed[0].number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == killed[0].params
        # `best` through the proxy reads what PostgreSQL holds
        best = subprocess.run([*cli, "best", "viaproxy", "--storage", proxy.url, "--json"], capture_output=True, text=True, timeout=180, env=env)
        assert best.returncode == 0, best.stderr
        study = optuna.load_study(study_name="viaproxy", storage=postgres_url)
        assert json.loads(best.stdout)["value"] == pytest.approx(study.best_value)
    finally:
        proxy.stop()


def _serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["storage", "serve", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_a_non_loopback_bind_is_refused_without_allow_remote(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    # Addresses on no interface first: were the check broken, binding them fails at once
    # instead of serving (CliRunner runs in this process).
    for host in ("192.0.2.1", "2001:db8::1", "0.0.0.0", "::"):
        code, out = _serve("--storage", db, "--host", host)
        assert code == 2, out
        assert out == (
            "Error: hposvc storage serve: the 'host' parameter must be a loopback address such as "
            f"'127.0.0.1' unless allow_remote=True (--allow-remote). Got {host!r} instead. Beyond "
            "loopback the proxy needs a credential as well (--token-file FILE, or --tls-client-ca); keep it on a private network.\n"
        )
    # --allow-remote alone is not enough: beyond loopback a credential is required.
    code, out = _serve("--storage", db, "--host", "192.0.2.1", "--allow-remote")
    assert (code, out) == (2, (
        "Error: hposvc storage serve: the 'token_file' parameter must be a file holding the shared token (--token-file FILE, "
        "or HPOSVC_STORAGE_TOKEN) when the proxy listens beyond loopback without client certificates (--tls-client-ca). "
        "Got None instead. Generate one with: "
        "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token\n"
    ))
    (tmp_path / "short").write_text("secret\n")
    code, out = _serve("--storage", db, "--host", "192.0.2.1", "--allow-remote", "--token-file", str(tmp_path / "short"))
    assert (code, out) == (2, (
        "Error: hposvc storage serve: the 'token' parameter must be at least 16 characters. Got "
        f"'<6 characters from --token-file {tmp_path / 'short'}>' instead. Generate one with: "
        "python -c 'import secrets; print(secrets.token_urlsafe(32))'\n"
    ))
    code, out = _serve("--storage", db, "--host", "192.0.2.1", "--allow-remote", "--token-file", str(tmp_path / "missing"))
    assert (code, out) == (2, (
        f"Error: the 'token_file' parameter must be a readable file with a token on its first line. Got "
        f"'{tmp_path / 'missing'}' instead. (No such file or directory).\n"
    ))
    assert not (tmp_path / "x.db").exists(), "the database was opened before the input was checked"
    # With --allow-remote and a token the checks pass and binding is tried: 192.0.2.1
    # (TEST-NET-1) is on no interface here, so it fails as a failure (1), not as bad input.
    (tmp_path / "token").write_text("a-token-long-enough-for-the-check\n")
    code, out = _serve("--storage", db, "--host", "192.0.2.1", "--allow-remote", "--token-file", str(tmp_path / "token"))
    assert code == 1, out
    assert out.startswith("Error: the storage proxy cannot listen on 192.0.2.1:13000: Cannot assign requested address."), out
    code, out = _serve("--storage", db, "--host", "192.0.2.1", "--allow-remote", "--tls-cert", str(tmp_path / "token"))
    assert (code, out) == (2, (
        "Error: hposvc storage serve: the 'tls_cert' parameter must be given together with --tls-key (and both with "
        f"--tls-client-ca). Got '{tmp_path / 'token'}' instead. A TLS server needs its certificate and its key.\n"
    ))


def test_a_busy_port_is_a_failure_not_a_second_proxy(proxy: Proxy, tmp_path: Path) -> None:
    proxy.storage()  # listening
    # A subprocess, not CliRunner: if the check were broken this would serve forever.
    cmd = [sys.executable, "-m", "hposvc.cli", "storage", "serve", "--storage", f"sqlite:///{tmp_path / 'y.db'}", "--port", str(proxy.port)]
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a second proxy started on a port that was in use")
    assert second.returncode == 1, second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"Error: the storage proxy cannot listen on 127.0.0.1:{proxy.port}: Address already in use. Pick another port with --port."
    )


def test_bad_serve_input_is_exit_2(tmp_path: Path) -> None:
    code, out = _serve("--storage", f"sqlite:///{tmp_path / 'x.db'}", "--port", "70000")
    assert (code, out) == (2, "Error: hposvc storage serve: the 'port' parameter must be a whole number from 1 to 65535. Got 70000 instead.\n")


@pytest.mark.parametrize("url", ["grpc://", "grpc://host:port", "grpc://host:70000", "grpc://host:0", "grpc://host:13000/db", "grpc://u:p@host:1", "http://host:13000"])
def test_a_malformed_grpc_url_is_named(url: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        grpc_storage(url)
    assert str(e.value) == (
        f"the 'storage' parameter must be a URL of the form 'grpc://HOST:PORT', e.g. 'grpc://127.0.0.1:13000'. Got {url!r} instead."
    )


def test_no_proxy_at_the_url_is_a_storage_error() -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"no storage proxy answered at {url} within 1 s\. Start one with `hposvc storage serve"):
        grpc_storage(url, ready_timeout=1)
    assert time.monotonic() - started < 10


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["", "0.0.0.0", "::", "192.0.2.1", "10.0.0.1"]))


TOKEN, NEW_TOKEN = "hposvc-test-token-0123456789", "hposvc-rotated-token-9876543210"


def test_an_authenticated_proxy_refuses_clients_without_its_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback with --allow-remote and a token file, as a proxy on a pod address would run.
    import grpc

    from hposvc.storage import TokenSource

    monkeypatch.delenv("HPOSVC_STORAGE_TOKEN", raising=False)
    monkeypatch.delenv("HPOSVC_STORAGE_TOKEN_FILE", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    proxy = Proxy(db, tmp_path / "proxy.log", args=("--allow-remote", "--token-file", str(token_file)))
    try:
        right = proxy.storage(tokens=TokenSource(value=TOKEN))  # answers: it is up
        refused = f"the storage proxy at {proxy.url} refused this client: "
        hint = ". Set HPOSVC_STORAGE_TOKEN (or HPOSVC_STORAGE_TOKEN_FILE, a file) to the token the proxy was started with."
        # 1) No token and a wrong one: refused when the client connects, with the reason.
        with pytest.raises(StorageError) as e:
            grpc_storage(proxy.url, ready_timeout=30)
        assert str(e.value) == refused + "no storage token was sent" + hint
        with pytest.raises(StorageError) as e:
            grpc_storage(proxy.url, ready_timeout=30, tokens=TokenSource(value="not-the-token-0123456789"))
        assert str(e.value) == refused + "the storage token is wrong" + hint
        # ... through the CLI (exit 1, the same message) and from a plain Optuna client.
        result = CliRunner().invoke(main, ["best", "anything", "--storage", proxy.url], env={"HPOSVC_STORAGE_TOKEN": "wrong-wrong-wrong-wrong"})
        assert (result.exit_code, result.output) == (1, "Error: " + refused + "the storage token is wrong" + hint + "\n")
        plain = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=proxy.port)
        for call in (lambda: optuna.create_study(study_name="stranger", storage=plain), plain.get_all_studies):
            with pytest.raises(grpc.RpcError) as rpc:
                call()
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        plain.close()
        assert open_storage(db).get_all_studies() == []  # nothing was written
        # 2) The right token reads and writes.
        study = optuna.create_study(study_name="mine", storage=right)
        study.tell(study.ask(), 1.0)
        assert [t.value for t in optuna.load_study(study_name="mine", storage=open_storage(db)).trials] == [1.0]
        # 3) Rotation without a restart: the proxy re-reads its file and accepts every line.
        token_file.write_text(f"{TOKEN}\n{NEW_TOKEN}\n")
        rotated = grpc_storage(proxy.url, ready_timeout=30, tokens=TokenSource(value=NEW_TOKEN))
        assert [s.study_name for s in rotated.get_all_studies()] == ["mine"]
        token_file.write_text(f"{NEW_TOKEN}\n")
        with pytest.raises(StorageError, match="the storage token is wrong"):
            right.get_all_studies()
        assert len(rotated.get_all_trials(rotated.get_study_id_from_name("mine"))) == 1
    finally:
        proxy.stop()


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, the proxy's certificate for 127.0.0.1 signed by it, a client certificate signed by
    it, and a stranger's client certificate signed by another CA: PEM files in ``folder``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, Path] = {}

    def issue(name: str, issuer: tuple | None, *, ca: bool = False, ip: str | None = None) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer[0].subject if issuer else subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if ip:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
        files[f"{name}.crt"] = folder / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = folder / f"{name}.key"
        files[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cert, key

    ca = issue("ca", None, ca=True)
    issue("proxy", ca, ip="127.0.0.1")
    issue("client", ca)
    issue("stranger", issue("other-ca", None, ca=True))
    return files


def test_a_proxy_with_client_certificates_refuses_clients_without_one(tmp_path: Path) -> None:
    from hposvc.storage import TlsFiles

    f = _certificates(tmp_path)
    db = f"sqlite:///{tmp_path / 'tls.db'}"
    tls = ("--tls-cert", str(f["proxy.crt"]), "--tls-key", str(f["proxy.key"]), "--tls-client-ca", str(f["ca.crt"]))
    proxy = Proxy(db, tmp_path / "proxy.log", args=("--allow-remote", *tls))
    ca = f["ca.crt"].read_bytes()
    mine = TlsFiles(ca=ca, cert=f["client.crt"].read_bytes(), key=f["client.key"].read_bytes())
    try:
        deadline = time.monotonic() + 120
        while True:  # the proxy starts: then the client with a certificate gets in
            try:
                storage = grpc_storage(proxy.url, ready_timeout=2, tls=mine)
                break
            except StorageError:
                assert proxy.proc.poll() is None and time.monotonic() < deadline, (tmp_path / "proxy.log").read_text()
        optuna.create_study(study_name="tls", storage=storage).tell(optuna.load_study(study_name="tls", storage=storage).ask(), 2.0)
        assert [t.value for t in optuna.load_study(study_name="tls", storage=open_storage(db)).trials] == [2.0]
        # Without a client certificate, or with one another CA signed: refused at once, named.
        stranger = TlsFiles(ca=ca, cert=f["stranger.crt"].read_bytes(), key=f["stranger.key"].read_bytes())
        for tls_files in (TlsFiles(ca=ca), stranger):
            started = time.monotonic()
            with pytest.raises(StorageError) as e:
                grpc_storage(proxy.url, ready_timeout=20, tls=tls_files)
            assert str(e.value) == (
                f"the storage proxy at {proxy.url} closed every TLS connection: it requires a client certificate signed by "
                "its CA. Set HPOSVC_STORAGE_TLS_CERT and HPOSVC_STORAGE_TLS_KEY to one (and HPOSVC_STORAGE_TLS_CA to the CA "
                "of the proxy's certificate)."
            )
            assert time.monotonic() - started < 10
        # A client that does not trust the proxy's certificate, and a plaintext one, get nothing either.
        with pytest.raises(StorageError, match="the TLS handshake with the storage proxy at .* failed: .*CERTIFICATE_VERIFY_FAILED"):
            grpc_storage(proxy.url, ready_timeout=20, tls=TlsFiles(ca=f["other-ca.crt"].read_bytes(), cert=f["client.crt"].read_bytes(), key=f["client.key"].read_bytes()))
        with pytest.raises(StorageError, match="no storage proxy answered"):
            grpc_storage(proxy.url, ready_timeout=3)
        assert [s.study_name for s in open_storage(db).get_all_studies()] == ["tls"]
    finally:
        proxy.stop()


def test_time_the_storage_was_away_does_not_count_toward_the_grace_period(tmp_path: Path) -> None:
    # A trial whose heartbeat could not land during an outage is not stale when the storage
    # comes back: the grace period starts again then. Only a heartbeat that stays still
    # for a whole grace period after the outage makes it stale.
    from hposvc import queue

    proxy = Proxy(f"sqlite:///{tmp_path / 'grace.db'}", tmp_path / "proxy.log")
    try:
        study = optuna.create_study(study_name="grace", storage=proxy.storage())
        queue.top_up(study, 1)
        trial = queue.claim(study)  # beats once; nobody beats again (its beats "cannot land")
        watch = queue.StaleWatch(grace=1.0)
        assert watch.stale(study) == []
        proxy.kill()
        time.sleep(2.0)  # longer than the grace period
        proxy.start()
        assert watch.stale(study) == []  # blocked until the proxy is back, then: not stale
        time.sleep(1.2)
        assert [t.number for t in watch.stale(study)] == [trial.number]  # a whole grace period later
    finally:
        proxy.stop()


def test_a_result_whose_answer_was_lost_is_stored_once(tmp_path: Path) -> None:
    # The proxy dies after storing a trial's result but before answering (here: the result
    # lands directly while the client's call waits for the proxy to come back). The retried
    # call finds the trial finished with that very result: success, not a conflict.
    import threading

    db = f"sqlite:///{tmp_path / 'lost.db'}"
    proxy = Proxy(db, tmp_path / "proxy.log")
    try:
        remote = proxy.storage()
        study = optuna.create_study(study_name="lost", storage=remote)
        tid = study.ask()._trial_id
        other = study.ask()._trial_id
        proxy.kill()
        answers: dict[str, object] = {}

        def tell(key: str, trial_id: int, value: float) -> None:
            try:
                answers[key] = remote.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
            except Exception as e:  # noqa: BLE001 (the assertion below shows it)
                answers[key] = e

        calls = [threading.Thread(target=tell, args=("same", tid, 1.0)), threading.Thread(target=tell, args=("different", other, 2.0))]
        for c in calls:
            c.start()
        time.sleep(1.0)  # both are retrying now
        direct = open_storage(db)
        direct.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])  # "the first attempt landed"
        direct.set_trial_state_values(other, TrialState.COMPLETE, [3.0])  # someone else's result
        proxy.start()
        for c in calls:
            c.join(timeout=120)
        assert answers["same"] is True
        assert isinstance(answers["different"], optuna.exceptions.UpdateFinishedTrialError)  # a real conflict stays one
        assert [t.values for t in direct.get_all_trials(direct.get_study_id_from_name("lost"))] == [[1.0], [3.0]]
    finally:
        proxy.stop()
