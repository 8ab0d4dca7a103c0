#!/usr/bin/env python3
"""Writes the payload fuzz target's seeds (see docs/fuzzing.md and
docs/payload.md): a small store packed as the packer would, with a frame size
of 64 bytes so that a file is cut into parts, as a whole payload file (first
byte 0) and as `MANIFEST_JSON 0xff FRAMES` (first byte 1, and 3 to extract).
Needs the `zstd` command. Run from fuzz/: python3 seeds/make_payload_seeds.py"""
import hashlib, json, struct, subprocess

FRAME = 64
files = [("a-hello/bin/hello", 0o555, b"#!/bin/sh\necho hello\n"),
         ("a-hello/share/empty", 0o444, b""),
         ("b-big/data", 0o444, bytes(range(150)))]
entries = [{"type": "dir", "path": "a-hello", "mode": 0o555},
           {"type": "dir", "path": "a-hello/bin", "mode": 0o555},
           {"type": "dir", "path": "a-hello/share", "mode": 0o555},
           {"type": "symlink", "path": "a-hello/bin/hi", "target": "hello"},
           {"type": "dir", "path": "b-big", "mode": 0o555}]
raw_frames = []  # uncompressed frames
for path, mode, data in files:
    e = {"type": "file", "path": path, "mode": mode, "size": len(data),
         "sha256": hashlib.sha256(data).hexdigest()}
    if len(data) == 0:
        pass
    elif len(data) <= FRAME:
        e["frame"], e["offset"] = len(raw_frames), 0
        raw_frames.append(data)
    else:
        e["frame"], e["offset"], e["chunks"] = len(raw_frames), 0, []
        for i in range(0, len(data), FRAME):
            part = data[i:i + FRAME]
            e["chunks"].append(hashlib.sha256(part).hexdigest())
            raw_frames.append(part)
    entries.insert(next(i for i, x in enumerate(entries) if x["path"] == path.rsplit("/", 1)[0]) + 1, e)

def zstd(b):
    return subprocess.run(["zstd", "-q", "-c", "-19"], input=b, capture_output=True, check=True).stdout

frames = [zstd(f) for f in raw_frames]
manifest = {"version": 2, "frame_size": FRAME,
            "frames": [{"len": len(c), "size": len(f), "sha256": hashlib.sha256(c).hexdigest()}
                       for c, f in zip(frames, raw_frames)],
            "entries": entries}
js = json.dumps(manifest).encode()
zm = zstd(js)
body = b"".join(frames)
header = b"NFPAYLD\0" + struct.pack("<IIQ", 2, FRAME, len(zm)) + hashlib.sha256(zm).digest() + struct.pack("<Q", len(body))
open("seeds/payload/whole.nfp", "wb").write(b"\0" + header + zm + body)
open("seeds/payload/assembled-verify", "wb").write(b"\1" + js + b"\xff" + body)
open("seeds/payload/assembled-extract", "wb").write(b"\3" + js + b"\xff" + body)
