# SPDX-License-Identifier: BSD-2-Clause
"""Check the virtio test guests against QEMU's virtio devices (test-only tool).

    .venv/bin/python tests/guests/virtio_qemu.py rng [--accel kvm] [--append "n=65536"]
    .venv/bin/python tests/guests/virtio_qemu.py console [--ports 2] [--tx N] [--rx N]
        [--append "buf=65536 msix=0"] [--max-ports 1] [--mode verify|bench|counter]

``console`` gives port 0 (a virtconsole) a pipe chardev whose ``.out`` is a
regular file and whose ``.in`` is a FIFO the script feeds, because QEMU drops
console-port data that a chardev does not take at once; every other port gets
a unix-socket chardev (server, no wait) that the script connects to.  Each
port gets ``--rx`` bytes of random input; what the guest sends is checked
against the pattern, and the input against the guest's reported hashes.
``pattern`` and ``word_hash`` are the helpers a host-side test needs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from build import build_guest  # noqa: E402

MASK = 0xFFFFFFFF


def pattern(port: int, nbytes: int, start_word: int = 0) -> bytes:
    """The bytes virtio_console sends on ``port`` (mode=verify)."""
    c = ((port * 0x9E3779B9) ^ 0x5BD1E995) & MASK
    words = (nbytes + 3) // 4
    out = bytearray()
    for i in range(start_word, start_word + words):
        out += ((((i * 2654435761) & MASK) ^ c)).to_bytes(4, "little")
    return bytes(out[:nbytes])


def word_hash(data: bytes) -> int:
    """virtio_console's receive hash: FNV-1a-style over 32-bit LE words."""
    h = 0x811C9DC5
    data = data + b"\0" * (-len(data) % 4)
    for i in range(0, len(data), 4):
        h = ((h ^ int.from_bytes(data[i:i + 4], "little")) * 0x01000193) & MASK
    return h


def qemu_base(accel: str, elf: pathlib.Path, append: str, debug_out: pathlib.Path) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", accel, "-nographic", "-no-reboot", "-m", "128",
        "-kernel", str(elf), "-append", append,
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-chardev", f"file,id=dc,path={debug_out}",
        "-device", "isa-debugcon,iobase=0x402,chardev=dc",
    ]


def guest_output(debug_out: pathlib.Path) -> str:
    text = debug_out.read_text(errors="replace")
    # SeaBIOS logs to 0x402 too; the guest starts after its last boot line.
    idx = text.rfind("Booting from ")
    if idx >= 0:
        text = text[text.index("\n", idx) + 1:]
    return text


def run_rng(args: argparse.Namespace, work: pathlib.Path) -> int:
    elf = build_guest("virtio_rng", work)
    out = work / "debug.txt"
    cmd = qemu_base(args.accel, elf, args.append, out) + [
        "-device", "virtio-rng-pci,disable-legacy=on"]
    t0 = time.monotonic()
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        timeout=args.timeout).returncode
    print(f"qemu exit {rc} (guest value {(rc - 1) // 2 if rc & 1 else '?'}) "
          f"in {time.monotonic() - t0:.2f} s")
    print(guest_output(out), end="")
    return 0 if rc == 1 else 1


def run_console(args: argparse.Namespace, work: pathlib.Path) -> int:
    elf = build_guest("virtio_console", work)
    out = work / "debug.txt"
    append = f"mode={args.mode} ports={args.ports} tx={args.tx} rx={args.rx} {args.append}"
    cmd = qemu_base(args.accel, elf, append, out)
    serial = "virtio-serial-pci,disable-legacy=on"
    if args.max_ports:
        serial += f",max_ports={args.max_ports}"
    cmd += ["-device", serial]
    socks = []
    to_send = [os.urandom(args.rx) for _ in range(args.ports)]
    sent_hash = [word_hash(d) for d in to_send]
    port0_out, port0_in = work / "port0.out", work / "port0.in"
    port0_out.write_bytes(b"")
    os.mkfifo(port0_in)
    for p in range(args.ports + args.extra_ports):
        if p == 0:
            cmd += ["-chardev", f"pipe,id=c0,path={work / 'port0'}"]
        else:
            path = work / f"port{p}.sock"
            socks.append(path)
            cmd += ["-chardev", f"socket,id=c{p},path={path},server=on,wait=off"]
        kind = "virtconsole" if p == 0 else "virtserialport"
        cmd += ["-device", f"{kind},chardev=c{p},nr={p},name=org.hvf.port{p}"]
    if args.rng:
        cmd += ["-device", "virtio-rng-pci,disable-legacy=on"]
    print(" ".join(cmd))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    conns = []
    try:
        # Port 0's input: a writer thread (opening the FIFO waits for QEMU).
        def feed_port0() -> None:
            with open(port0_in, "wb") as f:
                f.write(to_send[0])
        threading.Thread(target=feed_port0, daemon=True).start()
        for path in socks[:args.ports - 1]:
            for _ in range(200):
                if path.exists():
                    break
                time.sleep(0.05)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            s.setblocking(False)
            conns.append(s)
        # conns[k] is port k + 1; got[0] is read from port 0's file at the end.
        got = [bytearray() for _ in range(args.ports)]
        offs = [0] * args.ports
        deadline = time.monotonic() + args.timeout
        while proc.poll() is None and time.monotonic() < deadline:
            wlist = [s for k, s in enumerate(conns) if offs[k + 1] < len(to_send[k + 1])]
            r, w, _ = select.select(conns, wlist, [], 0.1)
            for s in r:
                k = conns.index(s) + 1
                try:
                    got[k] += s.recv(1 << 20)
                except BlockingIOError:
                    pass
            for s in w:
                k = conns.index(s) + 1
                try:
                    offs[k] += s.send(to_send[k][offs[k]:offs[k] + 65536])
                except BlockingIOError:
                    pass
            if args.mode == "counter" and args.counter_lines \
                    and port0_out.read_bytes().count(b"\n") >= args.counter_lines:
                proc.kill()
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        # Drain what is left in the sockets.
        for k, s in enumerate(conns):
            s.setblocking(True)
            s.settimeout(0.2)
            try:
                while data := s.recv(1 << 20):
                    got[k + 1] += data
            except (socket.timeout, OSError):
                pass
        got[0] = bytearray(port0_out.read_bytes())
    finally:
        if proc.poll() is None:
            proc.kill()
        for s in conns:
            s.close()
    elapsed = time.monotonic() - t0
    text = guest_output(out)
    print(f"qemu exit {rc} in {elapsed:.2f} s")
    print(text, end="")
    ok = True
    if args.mode == "verify":
        ok = rc == 1 and "console done" in text
        for i in range(args.ports):
            want = pattern(i, args.tx)
            if bytes(got[i]) != want:
                print(f"port {i}: host got {len(got[i])} bytes, pattern mismatch"
                      f" (want {len(want)})")
                ok = False
            m = re.search(rf"^port {i} rx (\d+) hash ([0-9a-f]{{8}})$", text, re.M)
            if not m or int(m.group(1)) != args.rx or int(m.group(2), 16) != sent_hash[i]:
                print(f"port {i}: rx hash mismatch, want {args.rx} {sent_hash[i]:08x}")
                ok = False
    elif args.mode == "bench":
        ok = rc == 1 and "bench done" in text
        unit = pattern(0, int(re.search(r"buf=(\d+)", append + " buf=4096").group(1)))
        n = len(got[0])
        if got[0] != unit * (n // len(unit)) or n != (args.tx // len(unit)) * len(unit):
            print(f"bench: host got {n} bytes, not the repeated pattern")
            ok = False
        print(f"bench: {n} bytes, {n / elapsed / 1e6:.1f} MB/s including boot")
    else:
        lines = bytes(got[0]).split(b"\n")
        complete = lines[:-1]
        want = [str(i).encode() for i in range(len(complete))]
        if complete != want:
            print("counter: lines are not 0, 1, 2, ...")
            ok = False
        print(f"counter: {len(complete)} lines")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("rng", "console"))
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--append", default="")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--ports", type=int, default=1)
    ap.add_argument("--extra-ports", type=int, default=0,
                    help="more QEMU ports than the guest uses")
    ap.add_argument("--max-ports", type=int, default=0, help="virtio-serial max_ports")
    ap.add_argument("--tx", type=int, default=65536)
    ap.add_argument("--rx", type=int, default=0)
    ap.add_argument("--mode", default="verify", choices=("verify", "bench", "counter"))
    ap.add_argument("--rng", action="store_true", help="add a virtio-rng device")
    ap.add_argument("--counter-lines", type=int, default=0,
                    help="counter mode: kill QEMU after this many lines")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hvf-virtio-") as tmp:
        work = pathlib.Path(tmp)
        return run_rng(args, work) if args.which == "rng" else run_console(args, work)


if __name__ == "__main__":
    sys.exit(main())
