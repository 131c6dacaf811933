"""`ganbert preprocess` as a Ray job: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/preprocess.py --raw /shared/adni --out /shared/shards --preset demo`."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("preprocess"))
