"""Encrypted, authenticated MQTT against a real Mosquitto: TLS with certificates made here, no
anonymous access, a password file and an ACL. Each refusal (wrong CA, expired certificate, bad
password) is one clear, redacted error, a distinct state and a slow retry."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from pipeline import parse_config
from pipeline.mqtt.publisher import Publisher
from tests.support.procs import Mosquitto
from tests.support.tls import PASSWORD, PREFIX, Pki, secure_broker, shared_subdir


@pytest.fixture(scope="module")
def broker(shared_dir: Path, pki: Pki) -> Iterator[Mosquitto]:
    b = secure_broker(shared_subdir(shared_dir, "mqtts"), pki, pki.server)
    yield b
    b.stop()


def watch(broker: Mosquitto, pki: Pki, topic: str) -> tuple[paho.Client, list[bytes]]:
    got: list[bytes] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}")
    c.tls_set(ca_certs=str(pki.ca))
    c.username_pw_set("watcher", "watch-it")
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    c.on_connect = lambda cl, _u, _f, _rc, _p=None: cl.subscribe(topic, qos=1)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c, got


async def run_publisher(
    mqtt: dict[str, object], tmp_path: Path, seconds: float, env: dict[str, str] | None = None
) -> Publisher:
    config = parse_config({"mqtt": {"topic_prefix": PREFIX, "reconnect_cap": 1.0, **mqtt}}, tmp_path, env=env or {})
    pub = Publisher(config.mqtt, secrets=config.secrets())
    task = asyncio.create_task(pub.run())
    pub.publish(f"{PREFIX}/hello", b"over tls", qos=1)
    await asyncio.sleep(seconds)
    await pub.close()
    await asyncio.wait_for(task, 10)
    return pub


async def test_tls_with_a_password_from_the_environment_delivers(broker: Mosquitto, pki: Pki, tmp_path: Path) -> None:
    client, got = watch(broker, pki, f"{PREFIX}/hello")
    try:
        await asyncio.sleep(0.5)
        pub = await run_publisher(
            {"url": broker.url, "ca_file": str(pki.ca), "username": "framegrid", "password": "${MQTT_PASSWORD}"},
            tmp_path,
            1.5,
            env={"MQTT_PASSWORD": PASSWORD},
        )
        assert got == [b"over tls"]
        assert pub.connects == 1
        assert pub.last_error is None
    finally:
        client.loop_stop()
        client.disconnect()


async def test_credentials_in_the_url_work_and_are_redacted(
    broker: Mosquitto, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from urllib.parse import quote

    client, got = watch(broker, pki, f"{PREFIX}/hello")
    url = f"mqtts://framegrid:{quote(PASSWORD, safe='')}@127.0.0.1:{broker.port}"
    try:
        await asyncio.sleep(0.5)
        with caplog.at_level(logging.DEBUG):
            pub = await run_publisher({"url": url, "ca_file": str(pki.ca)}, tmp_path, 1.5)
        assert got == [b"over tls"]
        assert pub.connects == 1
        # with a client certificate too (the broker does not require one; it must still load)
        ccert, ckey = pki.client
        pub = await run_publisher(
            {"url": url, "ca_file": str(pki.ca), "cert_file": str(ccert), "key_file": str(ckey)}, tmp_path, 1.5
        )
        assert got == [b"over tls", b"over tls"]
        assert pub.connects == 1
    finally:
        client.loop_stop()
        client.disconnect()
    text = caplog.text
    assert PASSWORD not in text
    assert quote(PASSWORD, safe="") not in text


@pytest.mark.parametrize("case", ["wrong_ca", "bad_password", "expired_certificate"])
async def test_a_refusal_is_one_clear_error_a_state_and_a_slow_retry(
    case: str,
    broker: Mosquitto,
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    shared_dir: Path,
) -> None:
    target = broker
    mqtt: dict[str, object] = {"url": broker.url, "ca_file": str(pki.ca), "username": "framegrid", "password": PASSWORD}
    if case == "wrong_ca":
        mqtt["ca_file"] = str(pki.other_ca)
    elif case == "bad_password":
        mqtt["password"] = "not-" + PASSWORD
    else:
        target = secure_broker(shared_subdir(shared_dir, "expired"), pki, pki.expired)
        mqtt["url"] = target.url
    try:
        with caplog.at_level(logging.DEBUG):
            pub = await run_publisher(mqtt, tmp_path, 4.0)  # the retry cap is 1 s: about four attempts
    finally:
        if target is not broker:
            target.stop()
    want = "unauthorized" if case == "bad_password" else "tls_error"
    assert pub.state == want
    assert pub.connects == 0
    assert pub.counters()["state"] == want
    refusals = [r for r in caplog.records if "refused us" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]  # said once, not at every retry
    assert refusals[0].levelno == logging.ERROR
    message = refusals[0].getMessage()
    assert ("credentials" in message) if want == "unauthorized" else ("ca_file" in message)
    assert PASSWORD not in caplog.text
    # the message and the `offline` said at close wait for a connection: nothing is lost
    assert sorted(m.topic for m in pub._buffer) == [f"{PREFIX}/availability", f"{PREFIX}/hello"]


def test_config_refuses_credentials_given_twice_and_tls_files_without_tls(tmp_path: Path) -> None:
    from pipeline.config import ConfigError

    cases = {
        "mqtt://framegrid:x@h:1883": ({"password": "y"}, "the password is given twice"),
        "mqtt://framegrid@h:1883": ({"username": "other"}, "the user name is given twice"),
        "mqtt://h:1883": ({"ca_file": "ca.pem"}, "need TLS"),
        "mqtts://h:8883": ({"cert_file": "c.pem"}, "go together"),
    }
    for url, (extra, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            parse_config({"mqtt": {"url": url, **extra}}, tmp_path)
        assert "mqtt" in str(err.value)
        assert "x@" not in str(err.value)
    ok = parse_config({"mqtt": {"url": "mqtts://framegrid@h", "ca_file": "ca.pem"}}, tmp_path)
    assert ok.mqtt.user == "framegrid"
    assert ok.mqtt.ca_file == tmp_path / "ca.pem"
    assert ok.mqtt.port == 8883


async def test_an_acl_denial_is_one_clear_error_and_a_state(
    broker: Mosquitto, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ACL lets framegrid's user write only under its prefix: with another prefix every publish is
    refused, and MQTT 5 says so (PUBACK reason codes). (Mosquitto grants a subscription its ACL will
    not deliver to, so the talk subscription is not refused here.)"""
    client, got = watch(broker, pki, "#")
    config = parse_config(
        {
            "mqtt": {
                "url": broker.url,
                "ca_file": str(pki.ca),
                "username": "framegrid",
                "password": PASSWORD,
                "topic_prefix": "elsewhere",
            }
        },
        tmp_path,
    )
    pub = Publisher(config.mqtt, secrets=config.secrets())
    try:
        with caplog.at_level(logging.DEBUG):
            task = asyncio.create_task(pub.run())
            for i in range(5):
                pub.publish("elsewhere/hello", f"{i}".encode(), qos=1)
                await asyncio.sleep(0.3)
            await pub.close()
            await asyncio.wait_for(task, 10)
    finally:
        client.loop_stop()
        client.disconnect()
    assert pub.state == "unauthorized"
    assert pub.denied >= 6
    assert not {b"0", b"1", b"2", b"3", b"4"} & set(got)  # nothing got through
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # said once, not for every message
    assert all("ACL" in r.getMessage() and "elsewhere/#" in r.getMessage() for r in refusals)
    assert PASSWORD not in caplog.text
