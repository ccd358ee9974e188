"""`python -m sidecar --policy FILE --service NAME --certs DIR --upstream HOST:PORT [--peer NAME=ADDR]...`"""

import os
import sys

# Before grpc loads (see sidecar.main.IOMGR_EXPERIMENTS); an operator's own value wins.
os.environ.setdefault("GRPC_EXPERIMENTS",
                      "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints")

from sidecar.main import main

sys.exit(main())
