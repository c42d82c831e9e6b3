"""Ray job entry point for `pipeline heads train`: a linear or MLP head on stored embeddings, trained
in the job's driver process (`ray job submit --entrypoint-num-gpus 1` puts it on a GPU node).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_heads.py --config jobs/configs/heads-local.yaml --set head=mlp

It takes exactly the flags of `pipeline heads train` (run `python jobs/train_heads.py --help`), with the same
exit status: 0 done, 2 bad configuration (one line on stderr), 1 the run failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["heads", "train", *sys.argv[1:]])
