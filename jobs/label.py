"""`ray job submit` entrypoint: label a collection, writing Parquet predictions.

Takes the arguments of `artfuse label`: python jobs/label.py --help
"""

import sys
from pathlib import Path

# Run the artfuse shipped beside this file (the job's working_dir), not an older installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artfuse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
