#!/usr/bin/python3
"""Drives Debian's slixmpp (python3-slixmpp) against a running Tern server for tests/slixmpp.rs.

Prints exactly one JSON object on the last line of stdout; the Rust test asserts on it.

Modes:
  exchange  log in two clients, exchange messages (full JID and bare JID), ping and disco the server,
            fetch the roster, route an iq from one client to the other
  login     log in one client, ping the server
  receive   log in one client and collect --expect messages (pushes), in arrival order
"""

import argparse
import asyncio
import json
import logging
import sys
import traceback
from pathlib import Path

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca, mech):
        super().__init__(jid, password, sasl_mech=mech or None)
        if ca:
            # Trust exactly the server's generated certificate (server_hostname is the JID's domain).
            self.ca_certs = Path(ca)
        else:
            import ssl

            self.ssl_context.check_hostname = False
            self.ssl_context.verify_mode = ssl.CERT_NONE
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0092")
        self.register_plugin("xep_0199")
        self.started = asyncio.Event()
        self.failed = asyncio.Event()
        self.errors = []
        self.messages = asyncio.Queue()
        self.roster_items = None
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("failed_all_auth", self.on_fail("authentication failed"))
        self.add_event_handler("connection_failed", self.on_fail("connection failed"))
        self.add_event_handler("stream_error", self.on_fail("stream error"))
        self.add_event_handler("disconnected", self.on_disconnected)

    def on_fail(self, what):
        def handler(event):
            self.errors.append(f"{what}: {event}")
            self.failed.set()

        return handler

    def on_disconnected(self, event):
        if not self.started.is_set():
            self.errors.append(f"disconnected before session start: {event}")
            self.failed.set()

    async def on_session_start(self, _event):
        try:
            roster = await self.get_roster(timeout=10)
            self.roster_items = len(roster["roster"]["items"])
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            self.errors.append(f"roster get failed: {e!r}")
        self.send_presence()
        self.started.set()

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            self.messages.put_nowait(msg)


async def start(client, host, port, direct, timeout):
    client.connect((host, port), use_ssl=direct, force_starttls=not direct)
    started = asyncio.ensure_future(client.started.wait())
    failed = asyncio.ensure_future(client.failed.wait())
    done, pending = await asyncio.wait({started, failed}, timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
    for p in pending:
        p.cancel()
    if not client.started.is_set():
        raise RuntimeError(f"{client.boundjid.bare}: no session: {client.errors or 'timeout'}")


async def ping(client, domain):
    try:
        await client["xep_0199"].send_ping(jid=domain, timeout=10)
        return True
    except (IqError, IqTimeout) as e:
        client.errors.append(f"ping failed: {e!r}")
        return False


async def run(args):
    result = {"ok": False}
    clients = []
    try:
        a = Client(args.jid1, args.pw1, args.ca, args.mech)
        clients.append(a)
        await start(a, args.host, args.port, args.direct, args.timeout)
        result["a_jid"] = a.boundjid.full
        result["a_roster_items"] = a.roster_items
        result["ping_ok"] = await ping(a, args.domain)
        if args.mode == "login":
            result["ok"] = result["ping_ok"]
            return result
        if args.mode == "receive":
            received = []
            for _ in range(args.expect):
                msg = await asyncio.wait_for(a.messages.get(), args.timeout)
                received.append({"body": msg["body"], "from": msg["from"].full, "id": msg["id"]})
            result["received"] = received
            result["ok"] = True
            return result

        info = await a["xep_0030"].get_info(jid=args.domain, timeout=10)
        result["disco_identities"] = [list(map(str, i)) for i in info["disco_info"]["identities"]]
        result["disco_features"] = sorted(info["disco_info"]["features"])

        b = Client(args.jid2, args.pw2, args.ca, args.mech)
        clients.append(b)
        await start(b, args.host, args.port, args.direct, args.timeout)
        result["b_jid"] = b.boundjid.full

        # a -> b (full JID)
        a.send_message(mto=b.boundjid.full, mbody=args.body, mtype="chat")
        msg = await asyncio.wait_for(b.messages.get(), args.timeout)
        result["b_received_body"] = msg["body"]
        result["b_received_from"] = msg["from"].full

        # b -> a (bare JID; a sent available presence at session start)
        b.send_message(mto=a.boundjid.bare, mbody=args.body[::-1], mtype="chat")
        msg = await asyncio.wait_for(a.messages.get(), args.timeout)
        result["a_received_body"] = msg["body"]
        result["a_received_from"] = msg["from"].full

        # iq a -> b routed through the server, answered by b's XEP-0092 plugin
        version = await a["xep_0092"].get_version(b.boundjid.full, timeout=10)
        result["b_version_name"] = version["software_version"]["name"]
        result["ok"] = True
        return result
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        result["exception"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
        return result
    finally:
        result["errors"] = [err for c in clients for err in c.errors]
        for c in clients:
            try:
                c.disconnect(wait=1)
            except Exception:  # noqa: BLE001
                pass
        await asyncio.sleep(0.2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["exchange", "login", "receive"], default="exchange")
    p.add_argument("--expect", type=int, default=1, help="messages to collect in receive mode")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--direct", action="store_true", help="direct TLS instead of STARTTLS")
    p.add_argument("--domain", default="localhost")
    p.add_argument("--ca", default="", help="PEM to trust; empty disables verification")
    p.add_argument("--mech", default="")
    p.add_argument("--jid1", required=True)
    p.add_argument("--pw1", required=True)
    p.add_argument("--jid2", default="")
    p.add_argument("--pw2", default="")
    p.add_argument("--body", default="")
    p.add_argument("--timeout", type=float, default=15)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR,
                        stream=sys.stderr)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    result = loop.run_until_complete(asyncio.wait_for(run(args), args.timeout * 4))
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
