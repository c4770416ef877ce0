"""`ray job submit` entrypoint: search fusion hyperparameters with Ray Tune.

Takes the arguments of `artfuse tune`: python jobs/tune.py --help
"""

import sys
from pathlib import Path

# Run the artfuse shipped beside this file (the job's working_dir), not an older installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artfuse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
