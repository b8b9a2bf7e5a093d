"""Runs `convret mine` in its own process, each chunk slowed by CONVRET_TEST_CHUNK_SLEEP seconds, so that the
resume test can kill it with SIGKILL in the middle of the run.

    python tests/_mine_driver.py [convret mine flags]"""
import os
import sys
import time

from convret.retrieval import mine as mine_module

original = mine_module.choose_negatives


def slow(*args, **kwargs):
    time.sleep(float(os.environ.get("CONVRET_TEST_CHUNK_SLEEP", "0")))
    return original(*args, **kwargs)


mine_module.choose_negatives = slow

if __name__ == "__main__":
    sys.exit(mine_module.main(sys.argv[1:]))
