"""Mines a training file against a collection with a dense retriever whose encoder is a cheap stand-in (each text
embedded as a seeded random vector), then prints the process's peak RSS, so that the memory test can compare a
small and a large collection in fresh processes without the cost of a real model.

    python tests/_mine_memory_driver.py TRAIN CORPUS OUTPUT"""
import json
import resource
import sys
import zlib
from types import SimpleNamespace

import numpy as np

from convret.retrieval import mine as mine_module

DIM = 16


def _vector(text: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(text.encode("utf-8"))).standard_normal(DIM).astype(np.float32)


class CheapEncoder:
    """What DenseRetriever needs of an encoder: a passage's "tokens" are the crc32 of its text."""

    source = None
    dim = DIM
    config = SimpleNamespace(normalize=False)
    model = SimpleNamespace(parameters=lambda: iter(()))

    def passage_tokens(self, passage):
        return [zlib.crc32(passage.text.encode("utf-8")) & 0x7FFFFFFF]

    def embed_tokens(self, items, progress=None):
        out = np.stack([np.random.default_rng(int(np.asarray(i).reshape(-1)[0])).standard_normal(DIM)
                        for i in items]).astype(np.float32)
        if progress is not None:
            progress(len(items))
        return out

    def queries(self, queries):
        return np.stack([_vector(q) for _, q in queries])

    def passages(self, passages):
        return np.stack([np.random.default_rng(self.passage_tokens(p)[0]).standard_normal(DIM) for p in passages])


if __name__ == "__main__":
    train, corpus, output = sys.argv[1:4]
    import faiss, torch  # noqa: F401,E401  (imported by the run anyway: their memory is in both baselines)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # Linux: reset the peak (VmHWM) to the current RSS, so that the import's transient peak does not hide the run's
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    retriever = mine_module.DenseRetriever(CheapEncoder(), "cheap", shard_size=5000)
    report = mine_module.mine(train, corpus, retriever, output, mine_module.MineSettings(window=(2, 10)),
                              chunk_size=10, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as handle:
            peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    print(json.dumps({"maxrss_kb": peak, "imports_kb": before, "mined": report["mined"]}))
