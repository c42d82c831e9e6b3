"""Ray job entry point for `pipeline nightly`: the incremental extract, then the current head over
that night's rows.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/nightly.py --config jobs/configs/nightly-local.yaml --run-date 2026-11-28

It takes exactly the flags of `pipeline nightly` (run `python jobs/nightly.py --help`), with the same
exit status: 0 done, 2 bad configuration (one line on stderr), 1 the run failed (rerun to resume).
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["nightly", *sys.argv[1:]])
