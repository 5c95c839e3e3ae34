#!/usr/bin/env python3
"""Print harnessd's events as they happen: a script client of the harness protocol.

Usage: harness_events.py [--since SEQ] [--topic service|daemon]... [--stack NAME] [--count N]

Finds the daemon through daemon.json in the state directory ($HARNESS_STATE_DIR, else
$XDG_STATE_HOME/harness, else ~/.local/state/harness), trusts only the daemon's own CA,
authenticates with the token, subscribes and prints one JSON event per line.
Needs the `websockets` library (pip install websockets).
"""

import argparse
import asyncio
import json
import os
import ssl
import sys

import websockets


def state_dir():
    if os.environ.get("HARNESS_STATE_DIR"):
        return os.environ["HARNESS_STATE_DIR"]
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "harness")


async def call(ws, request_id, method, params, early_events):
    """Sends a request and returns its result. Events can arrive before the answer (a
    replay is queued while `subscribe` runs): they go to `early_events`, in order."""
    await ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
    while True:
        message = json.loads(await ws.recv())
        if "event" in message:
            early_events.append(message)
        elif message.get("id") == request_id and ("result" in message or "error" in message):
            if "error" in message:
                error = message["error"]
                sys.exit(f"{method}: {error['code']}: {error['message']}")
            return message["result"]


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=int, help="replay journaled events from this seq")
    parser.add_argument("--topic", action="append", default=[], help="service or daemon")
    parser.add_argument("--stack", help="only this stack's service events")
    parser.add_argument("--count", type=int, help="exit after this many events")
    args = parser.parse_args()

    with open(os.path.join(state_dir(), "daemon.json")) as f:
        daemon = json.load(f)
    with open(daemon["token_file"]) as f:
        token = f.read().strip()
    # Verify the daemon's certificate against its own CA, and nothing else.
    tls = ssl.create_default_context(cafile=daemon["ca"])

    async with websockets.connect(daemon["url"], ssl=tls, max_size=1 << 20) as ws:
        events = []
        hello = await call(ws, 1, "hello", {"token": token, "protocol": 1, "client": "harness_events.py"}, events)
        print(f"connected to {hello['daemon']} (latest seq {hello['seq']})", file=sys.stderr)
        params = {"topics": args.topic, "stack": args.stack, "since": args.since}
        await call(ws, 2, "subscribe", params, events)
        seen = 0

        def show(event):
            nonlocal seen
            print(json.dumps(event), flush=True)
            seen += 1
            return args.count is not None and seen >= args.count

        for event in events:
            if show(event):
                return
        async for text in ws:
            message = json.loads(text)
            if "event" in message and show(message):
                return


if __name__ == "__main__":
    asyncio.run(main())
