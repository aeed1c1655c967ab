"""A thin paho-mqtt 2.x client used by the server and by devices.

What it adds over paho: TLS + password login in one settings object, MQTT v5
persistent sessions (clean_start=False with a session expiry) so QoS 1
messages published while a device is away are delivered when it returns,
automatic reconnect with backoff and jitter, subscriptions that survive reconnects, and
per-topic-filter callbacks or inbox queues that are safe to use from any thread.

Callbacks run on paho's network thread: keep them short (enqueue, then return).

Every connection turns Nagle's algorithm off (TCP_NODELAY), as the broker does for its side
(server_sdk/fleet/broker_config.py): otherwise the tail of a message waits for the peer's delayed ACK, about
40 ms on Linux, before it leaves; a round's control and global adapter and every update would
each pay that once or twice.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.protocol import QOS

log = logging.getLogger(__name__)


class MqttConnectError(ConnectionError):
    """The broker could not be reached or refused this client."""


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # PEM CA that signed the broker cert; None = plaintext
    client_id: str = ""  # stable id required for a persistent session
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600  # how long the broker keeps our queue while we are away
    clean_start: bool = False
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    will_topic: str | None = None  # published by the broker if we vanish
    will_payload: bytes = b""
    will_retain: bool = True
    # published (retained, QoS 1) on every successful (re)connect: after a broker restart the broker may
    # have published our will, and this puts the record straight ("birth and will")
    birth_topic: str | None = None
    birth_payload: bytes = b""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


Callback = Callable[[Message], None]


def wait_published(info: paho.MQTTMessageInfo, timeout_s: float) -> bool:
    """True once the broker acknowledged a QoS 1 publish.

    paho's own `wait_for_publish` raises for a message queued while offline
    (rc=NO_CONN) even though paho sends it after reconnecting; this waits for it.
    """
    deadline = time.monotonic() + timeout_s
    with info._condition:  # paho 2.x internals: the flag set on PUBACK
        while not info._published:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            info._condition.wait(min(left, 0.1))
    return True


def _no_delay(client, userdata, sock) -> None:
    """Send each message's last bytes at once instead of holding them for the peer's delayed ACK (Nagle)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a unix socket, a websocket wrapper): nothing to do
        pass


def _subscription_id(topic_filter: str) -> int:
    """Stable MQTT v5 subscription identifier (1..268435455) for a filter."""
    return zlib.crc32(topic_filter.encode()) % 268_435_455 + 1


class MqttClient:
    """One MQTT connection. Subscribe (before or after `connect`), then publish."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
        )
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.ca_file is not None:
            self._client.tls_set(ca_certs=settings.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if settings.will_topic is not None:
            self._client.will_set(settings.will_topic, settings.will_payload, qos=QOS, retain=settings.will_retain)
        self._client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_socket_open = _no_delay
        self._lock = threading.Lock()
        self.payload_bytes_received = 0  # every delivered message, matched by a subscription or not
        self._subs: dict[str, tuple[int, Callback | None]] = {}
        self._unsent: set[str] = set()  # filters added while disconnected
        # SUBSCRIBEs sent whose SUBACK has not come (mid -> filter): a connection that drops first may have lost
        # them (a restarting broker), and a reconnect with the session present resubscribes nothing else
        self._unacked: dict[int, str] = {}
        self._inbox: dict[str, queue.Queue[Message]] = {}
        self._connected = threading.Event()
        self._first_result = threading.Event()
        self._refusal: str | None = None
        self._suback: dict[int, tuple[threading.Event, list]] = {}
        self._initial_subs: list[int] = []
        self.reconnects = 0
        self.connected_at: float | None = None  # wall-clock time of the last successful (re)connect
        self.session_present = False
        self._pending_topics: dict[int, str] = {}  # QoS 1 publishes awaiting their PUBACK: mid -> topic
        self._early_acks: dict[int, object] = {}  # refusals that came before `publish` noted their topic
        self._ack_lock = threading.Lock()  # guards both; never held while calling paho (see _note_topic)
        self.refused: list[tuple[str, str]] = []  # (topic, reason) of publishes the broker refused, newest last

    # -- connection ------------------------------------------------------------

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and wait for the broker to accept us, retrying until `timeout_s`.

        A refused login (bad password, unknown user) fails at once; an unreachable
        broker is retried with backoff until the timeout.
        """
        s = self.settings
        self._first_result.clear()
        self._refusal = None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry_s
        last_error: OSError | None = None
        try:
            self._client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=s.clean_start, properties=props)
        except ssl.SSLError as exc:  # a wrong CA or hostname does not heal by retrying
            raise MqttConnectError(
                f"TLS handshake with {s.host}:{s.port} failed: {exc}. Is {s.ca_file} the fleet CA, "
                f"and is {s.host!r} one of the hostnames in the broker certificate?"
            ) from exc
        except OSError as exc:
            last_error = exc  # broker not up yet: paho's loop keeps retrying with backoff
        except ValueError as exc:
            raise MqttConnectError(f"bad MQTT settings for {s.host}:{s.port}: {exc}") from exc
        self._client.loop_start()
        if not self._first_result.wait(timeout_s) or not self._connected.is_set():
            self._client.disconnect()
            self._client.loop_stop()
            why = self._refusal or f"no CONNACK (broker down or wrong port; last error: {last_error})"
            raise MqttConnectError(
                f"could not connect to {s.host}:{s.port} as {s.username!r} within {timeout_s}s: {why}"
            )
        for mid in list(self._initial_subs):
            self._await_suback(mid, timeout_s)

    def close(self) -> None:
        """Disconnect cleanly; the broker keeps our session for `session_expiry_s`."""
        self._connected.clear()
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # -- publish / subscribe ---------------------------------------------------

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = QOS, retain: bool = False, wait_s: float | None = None
    ) -> paho.MQTTMessageInfo:
        """Queue a message; with `wait_s`, block until the broker acknowledged it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            self._note_topic(info.mid, topic)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttConnectError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if wait_s is not None and not wait_published(info, wait_s):
            raise TimeoutError(f"broker did not acknowledge publish to {topic!r} within {wait_s}s")
        return info

    def subscribe(
        self, topic_filter: str, callback: Callback | None = None, qos: int = QOS, wait_s: float | None = 10.0
    ) -> None:
        """Deliver matching messages to `callback`, or to an inbox read with `get`.

        When connected, waits up to `wait_s` for the broker's SUBACK so that a
        message published right after this call is not missed; raises
        `PermissionError` if the broker (ACL) refuses the subscription.
        """
        with self._lock:
            self._subs[topic_filter] = (qos, callback)
            if callback is None:
                self._inbox.setdefault(topic_filter, queue.Queue())
            connected = self._connected.is_set()
            if not connected:
                self._unsent.add(topic_filter)  # sent by _on_connect
        if connected:
            mids = self._send_subscribe([topic_filter])
            if wait_s is not None:
                for mid in mids:
                    self._await_suback(mid, wait_s)

    def _await_suback(self, mid: int, wait_s: float) -> None:
        with self._lock:
            entry = self._suback.get(mid)
        if entry is None:
            return
        event, result = entry
        arrived = event.wait(wait_s)
        with self._lock:
            self._suback.pop(mid, None)
        if not arrived:
            raise TimeoutError(f"no SUBACK from the broker for {result[0]!r} within {wait_s}s")
        topic_filter, codes = result
        bad = [c for c in codes if c.is_failure]
        if bad:
            raise PermissionError(f"broker refused subscription to {topic_filter!r}: {bad[0]} (check the ACL)")

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._inbox.pop(topic_filter, None)
            self._unsent.discard(topic_filter)
        self._client.unsubscribe(topic_filter)

    def get(self, topic_filter: str, timeout_s: float | None = None) -> Message:
        """Next inbox message for a filter subscribed without a callback; raises queue.Empty."""
        with self._lock:
            q = self._inbox.get(topic_filter)
        if q is None:
            raise KeyError(f"no inbox for {topic_filter!r}: subscribe to it without a callback first")
        return q.get(timeout=timeout_s)

    def drain(self, topic_filter: str) -> list[Message]:
        """All inbox messages waiting for a filter, without blocking."""
        out = []
        while True:
            try:
                out.append(self.get(topic_filter, 0))
            except queue.Empty:
                return out

    # -- paho callbacks (network thread) ----------------------------------------

    def _send_subscribe(self, filters: list[str], track: bool = True) -> list[int]:
        """SUBSCRIBE with default options, so retained control/global state is (re)sent.

        Each filter carries a subscription identifier derived from its text, so a
        message matching two overlapping filters (which mosquitto sends once per
        filter) lands once in each, even when queued for a previous process.
        """
        with self._lock:
            wanted = [(f, self._subs[f][0]) for f in filters if f in self._subs]
            mids = []
            for f, qos in wanted:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = _subscription_id(f)
                rc, mid = self._client.subscribe(f, qos=qos, properties=props)
                if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._unacked[mid] = f
                if track and rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._suback[mid] = (threading.Event(), [f, []])
                    mids.append(mid)
        return mids

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self._unacked.pop(mid, None)
            entry = self._suback.get(mid)
        if entry is None:
            return
        event, result = entry
        result[1] = list(reason_codes)
        for code in reason_codes:
            if code.is_failure:
                log.error("broker refused subscription to %s: %s", result[0], code)
        event.set()

    def _note_topic(self, mid: int, topic: str) -> None:
        """Remember which topic a QoS 1 publish went to, for its PUBACK; the PUBACK may have come already.

        Never called with paho's locks held, and paho's thread calls `_on_publish` with them held, so
        `_ack_lock` is only ever taken last: no lock-order inversion."""
        with self._ack_lock:
            early = self._early_acks.pop(mid, None)
            if early is None:
                self._pending_topics[mid] = topic
                if len(self._pending_topics) > 4096:  # acks lost with a session: forget the oldest
                    del self._pending_topics[next(iter(self._pending_topics))]
        if early is not None:
            self._check_ack(topic, early)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """A PUBACK (MQTT 5 carries a reason code): say clearly when the broker refused a publish."""
        with self._ack_lock:
            topic = self._pending_topics.pop(mid, None)
            if topic is None:  # QoS 0 (written out), or acked before `publish` could note the topic
                if reason_code.is_failure:
                    self._early_acks[mid] = reason_code
                if len(self._early_acks) > 4096:
                    del self._early_acks[next(iter(self._early_acks))]
                return
        self._check_ack(topic, reason_code)

    def _check_ack(self, topic: str, reason_code) -> None:
        if not reason_code.is_failure:
            return
        self.refused = [*self.refused[-15:], (topic, str(reason_code))]
        hint = (" (devices may publish only their own topics, and only under runs registered with the fleet: "
                "`devft serve` registers its run; `python -m server_sdk.fleet.broker register-run FLEET RUN` does it by "
                "hand; check --run)") if reason_code.value == 0x87 else ""
        log.error("the broker refused the publish to %s: %s%s", topic, reason_code, hint)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = f"broker refused the connection: {reason_code}"
            log.error("MQTT %s:%s %s", self.settings.host, self.settings.port, self._refusal)
            if not self._first_result.is_set() and reason_code.value in (0x86, 0x87, 0x8C, 0x85):
                client.disconnect()  # bad credentials: retrying will not help
            self._first_result.set()
            return
        first = not self._first_result.is_set()
        self.connected_at = time.time()
        if not first:
            self.reconnects += 1
        self.session_present = bool(flags.session_present)
        self._refusal = None
        # A new process always subscribes (the broker then resends retained state it
        # has not seen); a reconnect only if the broker lost our session, plus any
        # filter added while we were offline.
        with self._lock:
            lost = {f for f in self._unacked.values() if f in self._subs}  # sent on the old connection, never acked
            self._unacked.clear()
            filters = list(self._subs) if first or not self.session_present else sorted(self._unsent | lost)
            self._unsent.clear()
            self._connected.set()
        self._initial_subs = self._send_subscribe(filters, track=first)
        if self.settings.birth_topic is not None:
            client.publish(self.settings.birth_topic, self.settings.birth_payload, qos=QOS, retain=True)
        self._first_result.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            log.warning("MQTT %s:%s disconnected: %s", self.settings.host, self.settings.port, reason_code)
            # jitter: paho's backoff (min, 2 min, 4 min, ... max) is the same for every client, so a thousand
            # devices dropped by one broker restart would knock again all in the same instant; each starts from
            # its own first delay (0.5-1.5 x min) and keeps that offset as the delay doubles. Only when a
            # connection that was up drops: a failed attempt keeps doubling
            s = self.settings
            client.reconnect_delay_set(s.reconnect_min_s * random.uniform(0.5, 1.5), s.reconnect_max_s)
        self._connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        message = Message(topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain))
        sub_ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        with self._lock:
            self.payload_bytes_received += len(message.payload)
            targets = [
                (f, cb)
                for f, (_, cb) in self._subs.items()
                if paho.topic_matches_sub(f, msg.topic) and (not sub_ids or _subscription_id(f) in sub_ids)
            ]
            inboxes = {f: self._inbox.get(f) for f, cb in targets if cb is None}
        if not targets:
            log.debug("message on %s matches no local subscription; dropped", msg.topic)
        for f, cb in targets:
            if cb is None:
                q = inboxes.get(f)
                if q is not None:
                    q.put(message)
                continue
            try:
                cb(message)
            except Exception:
                log.exception("callback for %s failed on message %s", f, msg.topic)
