"""Ray job entry point for `pipeline compare`: the classifier as is, features + heads and fine-tuning on one
labelled sample and split, with their cost; a resubmitted job reuses the feature passes and continues the
fine-tuning from its checkpoints.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/compare.py --config jobs/configs/compare-local.yaml --set sample=2000

It takes exactly the flags of `pipeline compare` (run `python jobs/compare.py --help`), with the same exit
status: 0 done, 2 bad configuration (one line on stderr), 1 the run failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["compare", *sys.argv[1:]])
