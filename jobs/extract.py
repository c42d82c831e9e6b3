"""Ray job entry point for `pipeline extract`: embed images with a pretrained backbone cut at a
layer; write Parquet.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/extract.py --config jobs/configs/s3-gpu.yaml --set source.uri=s3://photos/2026-11-27/

It takes exactly the flags of `pipeline extract` (run `python jobs/extract.py --help`), with the same
exit status: 0 done, 2 bad configuration (one line on stderr), 1 the run failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["extract", *sys.argv[1:]])
