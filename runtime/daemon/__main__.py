"""`python -m runtime.daemon --config config.yaml`: the main job."""

import sys

from runtime.daemon.lifecycle import main

sys.exit(main())
