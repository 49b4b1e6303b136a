"""Does a durable subscriber receive everything framegrid's publisher had acknowledged across broker restarts?

framegrid's `Publisher` publishes numbered results at `--rate` per second to a real, persistent
Mosquitto that is restarted three times (down 4 s each); a durable paho subscriber (clean session
off, QoS 1) reconnects `--subscriber-delay` seconds after each restart, so the broker must queue
for it meanwhile. Prints the results the publisher counted as acknowledged that never arrived.

    .venv/bin/python -m tools.durable_delivery                                  # broker defaults
    .venv/bin/python -m tools.durable_delivery --broker-line "max_queued_messages 100000"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pipeline.config import MqttConfig
from pipeline.mqtt.publisher import Publisher
from tools.servers import Mosquitto


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="results per second")
    ap.add_argument("--subscriber-delay", type=float, default=3.0, help="seconds before the subscriber reconnects")
    ap.add_argument("--broker-line", action="append", default=[], help="a line added to mosquitto.conf")
    args = ap.parse_args()

    import paho.mqtt.client as paho

    broker = Mosquitto(Path(tempfile.mkdtemp(prefix="fg-durable-")), persistent=True)
    # the test broker raises the queue limit; start from Mosquitto's defaults plus the given lines
    conf = "\n".join(ln for ln in broker.conf.read_text().splitlines() if not ln.startswith("max_queued"))
    broker.conf.write_text(conf + "\n" + "".join(f"{ln}\n" for ln in args.broker_line))
    broker.start()
    got: set[int] = set()
    lock = threading.Lock()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"durable-{uuid.uuid4().hex[:8]}",
                      clean_session=False)
    sub.on_connect = lambda c, _u, _f, _rc, _p=None: c.subscribe("durable/#", qos=1)

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/detections"):
            with lock:
                got.add(json.loads(msg.payload)["seq"])

    sub.on_message = on_message
    sub.reconnect_delay_set(args.subscriber_delay, args.subscriber_delay + 1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()

    async def run() -> tuple[Publisher, int]:
        pub = Publisher(MqttConfig(url=broker.url, topic_prefix="durable", buffer=100_000, reconnect_cap=1.0))
        task = asyncio.create_task(pub.run())
        await asyncio.sleep(1)
        seq = 0

        async def produce() -> None:
            nonlocal seq
            while True:
                seq += 1
                pub.publish("durable/streams/cam/detections", {"seq": seq})
                await asyncio.sleep(1 / args.rate)

        producer = asyncio.create_task(produce())
        for _ in range(3):
            await asyncio.sleep(3)
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(4)
            await asyncio.to_thread(broker.start)
        await asyncio.sleep(args.subscriber_delay + 3)
        producer.cancel()
        await pub.close()
        await asyncio.wait_for(task, 15)
        return pub, seq

    try:
        pub, seq = asyncio.run(run())
        time.sleep(2)
    finally:
        sub.loop_stop()
        broker.stop()
    with lock:
        missing = sorted(set(range(1, seq + 1)) - got)
    acked = pub.published_by_kind.get("detections", 0)
    print(f"results {seq}, acknowledged {acked}, dropped by framegrid {pub.dropped_overflow}, "
          f"received {len(got)}, acknowledged but not received {len(missing)}")


if __name__ == "__main__":
    main()
