"""`python -m runtime.daemon --config config.yaml`: the main job."""

import sys

from runtime.daemon.command import main

# The guard matters: the policy publisher is a spawned process, and spawn may import the
# main module again under another name.
if __name__ == "__main__":
    sys.exit(main())
