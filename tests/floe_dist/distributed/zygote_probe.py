"""Runs in a process that has run no tensor op (the tests' forked server's child): start a zygote, launch through it,
print what came back as one JSON line.

    python tests/floe_dist/distributed/zygote_probe.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from floe_dist.distributed.forked_ranks import Zygote

out = Path(sys.argv[1])
zygote = Zygote.start()
env = dict(os.environ)
found = {"ready": zygote.ready(), "version": zygote.launch(["-m", "launcher.cli", "--version"], env, 1),
         "refused": zygote.launch(["-m", "launcher.cli", "train", "--model", "tiny", "--zero", "7", "--output",
                                   str(out / "refused")], env, 1),
         "one_rank_of_two_fails": zygote.launch(["-c", "import os, sys; sys.exit(int(os.environ['RANK']))"], env, 2),
         "past_its_time": zygote.launch(["-c", "import time; time.sleep(60)"], env, 1, timeout=1)}
sleeper = zygote.popen(["-c", "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"], env,
                       str(out / "sleeper.log"))
while not (out / "sleeper.log").is_file() or "pid" not in (out / "sleeper.log").read_text():
    time.sleep(0.05)
found["running"] = sleeper.poll()
found["own_group"] = os.getpgid(sleeper.pid) == sleeper.pid
os.killpg(sleeper.pid, signal.SIGTERM)
found["stopped"] = sleeper.wait(timeout=30)
found["log"] = (out / "sleeper.log").read_text().split()[:2] == ["pid", str(sleeper.pid)]
zygote.close()
print(json.dumps(found))
