"""`ganbert synthesize` as a Ray job: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/synthesize.py --model models:/<id> --mri /shared/t1 --out /shared/pet`."""

# --mri is one T1 NIfTI (--out a .nii.gz) or a folder of them (--out a folder: <stem>_pet.nii.gz per input plus
# synthesis.csv, written by Ray Data actors); in folder mode both folders must be on storage every Ray node sees.

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("synthesize"))
