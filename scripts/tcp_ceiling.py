"""Loopback TCP ceiling: one stream, 1 MiB writes, 1 GiB, sender and receiver in two
processes. Prints {"tcp_ceiling_gbps": ...}."""
import json
import multiprocessing as mp
import socket
import time

TOTAL = 1 << 30
CHUNK = 1 << 20


def sender(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b"\0" * CHUNK
    for _ in range(TOTAL // CHUNK):
        s.sendall(buf)
    s.close()


def main():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    port = lst.getsockname()[1]
    p = mp.get_context("spawn").Process(target=sender, args=(port,))
    p.start()
    conn, _ = lst.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    t0 = time.perf_counter()
    while got < TOTAL:
        n = conn.recv_into(view)
        if n == 0:
            break
        got += n
    el = time.perf_counter() - t0
    p.join()
    print(json.dumps({"tcp_ceiling_gbps": got / el / 1e9}))


if __name__ == "__main__":
    main()
