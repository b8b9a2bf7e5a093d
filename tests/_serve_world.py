"""What the serve tests share: a tiny world (checkpoint, collection, index, `convret search`'s run), servers on
127.0.0.1 (a `convret serve` subprocess, or an app in a uvicorn thread of the test process), bounded waits."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

from convret.cli import main as cli
from _retrieval_fixtures import tiny_checkpoint, write_eval_world

START_TIMEOUT = 90  # seconds for a server to load (the machine is shared)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_world(d, **checkpoint_config) -> dict:
    """A tiny checkpoint, an eval world, `convret encode` + `convret index` of its collection and `convret
    search`'s run of its sessions (top 5): the oracle of the service's answers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: more threads stall more than they help at this size
    try:
        ck = tiny_checkpoint(d / "ck", **checkpoint_config)
        write_eval_world(d / "w", n_conv=4, turns=4)
        assert cli(["encode", "--model", str(ck), "--collection", str(d / "w/collection.jsonl"), "--output",
                    str(d / "emb"), "--no-progress"]) == 0
        assert cli(["index", "--embeddings", str(d / "emb"), "--output", str(d / "idx"), "--cpu"]) == 0
        assert cli(["encode", "--model", str(ck), "--conversations", str(d / "w/eval.json"), "--output",
                    str(d / "q"), "--no-progress"]) == 0
        assert cli(["search", "--index", str(d / "idx"), "--queries", str(d / "q"), "--top_k", "5", "--output",
                    str(d / "run.trec")]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"dir": d, "model": str(ck), "index": str(d / "idx"), "collection": str(d / "w/collection.jsonl"),
            "eval": str(d / "w/eval.json"), "run": str(d / "run.trec"), "emb": str(d / "emb")}


def base_args(world, port):
    return ["--model", world["model"], "--index", world["index"], "--collection", world["collection"],
            "--port", str(port), "--log-level", "warning", "--threads", "1"]


class Server:
    """`convret serve ARGS` in a subprocess; its output kept in ``output``."""

    def __init__(self, args, port, env=None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "convret", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def wait_ready(self, headers=None):
        import httpx

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.output))
            try:
                if httpx.get(self.url + "/healthz", timeout=2, headers=headers).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready:\n" + "".join(self.output))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class AppServer:
    """An app served by uvicorn in a thread of this process on 127.0.0.1 (real HTTP, the app's lifespan run):
    ``with AppServer(app) as url: ...``."""

    def __init__(self, app, **config):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"log_level": "warning", "timeout_graceful_shutdown": 5, **config}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
