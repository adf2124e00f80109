"""One rank of the two-process training test, launched the way users launch training:

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT [model.training.train arguments ...]

It trains exactly like ``python -m model.training.train`` and then leaves this rank's final weights and logged records in
OUT, so the test can check that the ranks stayed identical."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from model.training.train import main

# A rank stuck in a collective prints where it is stuck and exits, so torchrun stops the other rank and the test
# fails with both stacks instead of waiting forever.
faulthandler.dump_traceback_later(int(os.environ.get("DDP_WORKER_HANG_S", "300")), exit=True)

out, argv = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
result = main(argv)
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps(result.records))
