"""Ray job entry point for `pipeline finetune`: fine-tune a pretrained backbone with Ray Train; a
resubmitted job continues from the last checkpoint.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/finetune-local.yaml --set train.epochs=10

It takes exactly the flags of `pipeline finetune` (run `python jobs/finetune.py --help`), with the same
exit status: 0 done, 2 bad configuration (one line on stderr), 1 the run failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
